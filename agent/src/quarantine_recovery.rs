//! The quarantines in force at start. A damaged `quarantine.json` must not
//! release a quarantine: the previous agent's programs, still pinned and
//! enforcing, carry `FLAG_QUARANTINE` in the SERVICES entry of every cgroup
//! of a quarantined service, so those services stay quarantined, with no
//! exceptions (the exceptions were in the file: fail closed), until an
//! operator releases them or quarantines them again with exceptions.

use std::{collections::BTreeSet, path::Path};

use agent_common::{ServiceEntry, FLAG_QUARANTINE};
use aya::maps::{HashMap, Map, MapData};
use tracing::{error, warn};

use crate::{
    kernel::CompiledPolicy,
    quarantine::{Quarantines, FILE},
    services::ServiceTracker,
    state_file,
};

/// Reads `state_dir/quarantine.json`; when it is damaged, sets it aside
/// and takes the quarantined services from the pinned SERVICES map under
/// `pins` (the current pin directory), resolving cgroups with `policy`.
pub fn at_start(
    state_dir: &Path,
    pins: &Path,
    mount: &Path,
    policy: &CompiledPolicy,
) -> Quarantines {
    let problem = match Quarantines::load(state_dir) {
        Ok(q) => return q,
        Err(problem) => problem,
    };
    let (quarantines, consequence) = match pinned(pins, mount, policy) {
        Ok(names) if names.is_empty() => (
            Quarantines::default(),
            "the pinned programs quarantine no service, so none is".to_string(),
        ),
        Ok(names) => {
            let consequence = format!(
                "the services the pinned programs quarantine stay quarantined WITHOUT exceptions: {} (release or quarantine them again to change that)",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            );
            let q = Quarantines {
                services: names.into_iter().map(|n| (n, Vec::new())).collect(),
            };
            (q, consequence)
        }
        Err(why) => (
            Quarantines::default(),
            format!("no quarantine can be recovered ({why}): no service is quarantined; quarantine again what should be"),
        ),
    };
    state_file::set_aside(state_dir, FILE, &problem, &consequence);
    if !quarantines.services.is_empty() {
        // The next agent and `bulkhead release` work from the file again.
        if let Err(e) = quarantines.save(state_dir) {
            error!("{e}");
        }
    }
    quarantines
}

/// The services of `policy` with a cgroup the pinned SERVICES map marks
/// quarantined.
fn pinned(pins: &Path, mount: &Path, policy: &CompiledPolicy) -> Result<BTreeSet<String>, String> {
    let path = pins.join("maps").join(agent_common::maps::SERVICES);
    let map = MapData::from_pin(&path)
        .map_err(|e| format!("no pinned SERVICES map at {}: {e}", path.display()))?;
    let map = HashMap::<MapData, u64, ServiceEntry>::try_from(Map::HashMap(map))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut cgroups = BTreeSet::new();
    for entry in map.iter() {
        let (cgroup_id, service) = entry.map_err(|e| format!("{}: {e}", path.display()))?;
        if service.flags & FLAG_QUARANTINE != 0 {
            cgroups.insert(cgroup_id);
        }
    }
    let mut tracker = ServiceTracker::new(mount, policy);
    tracker.rescan();
    let mut names = BTreeSet::new();
    for s in &tracker.services {
        for c in &s.cgroups {
            if cgroups.remove(&c.id) {
                names.insert(s.name.clone());
            }
        }
    }
    if !cgroups.is_empty() {
        warn!(
            ?cgroups,
            "quarantined cgroups in the pinned state belong to no service of the policy now loaded; they are not quarantined"
        );
    }
    Ok(names)
}
