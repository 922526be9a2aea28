//! Which cgroups each service is in right now. A `cgroup = "/path"`
//! service has at most one; a `unit = "..."` service is found by name
//! wherever systemd puts it (`crate::cgroup::units`), a template's
//! instances each in their own. A service with none is waiting; a restarted
//! unit gets a new cgroup (same path, new id). The tracker re-resolves
//! every service periodically and tells the kernel maps what changed; a
//! cgroup is counted as enforced only once its SERVICES entry is written.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use agent_common::{unit_of_path, ServiceEntry, UnitKey, UNIT_EXACT, UNIT_TEMPLATE};
use tracing::{error, info};

use crate::{
    cgroup,
    kernel::{Change, CompiledPolicy},
    policy::{Closeness, Selector},
};

/// How often cgroups are re-resolved.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedService {
    pub name: String,
    pub selector: Selector,
    pub entry: ServiceEntry,
    /// Its cgroups, by path, as last found.
    pub cgroups: Vec<ServiceCgroup>,
}

/// One cgroup of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCgroup {
    /// Relative to the cgroup2 mount, without a leading `/`.
    pub path: String,
    pub id: u64,
    /// Why its SERVICES entry could not be written, while it could not:
    /// the kernel does not enforce the service there.
    pub unenforced: Option<String>,
}

/// What `status` and `bulkhead_services{state}` say about a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Every cgroup found is enforced.
    Managed,
    /// No cgroup found yet.
    Waiting,
    /// A cgroup was found that the kernel does not enforce.
    Unenforced,
}

impl ServiceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Managed => "managed",
            Self::Waiting => "waiting",
            Self::Unenforced => "unenforced",
        }
    }
}

impl TrackedService {
    pub fn state(&self) -> ServiceState {
        if self.cgroups.is_empty() {
            ServiceState::Waiting
        } else if self.cgroups.iter().any(|c| c.unenforced.is_some()) {
            ServiceState::Unenforced
        } else {
            ServiceState::Managed
        }
    }

    /// Its enforced cgroups.
    pub fn enforced(&self) -> impl Iterator<Item = &ServiceCgroup> {
        self.cgroups.iter().filter(|c| c.unenforced.is_none())
    }

    /// A sentence for `status`: where it was looked for, or what failed.
    pub fn explain(&self, mount: &Path) -> String {
        if let Some(c) = self.cgroups.iter().find(|c| c.unenforced.is_some()) {
            let why = c.unenforced.as_deref().unwrap_or_default();
            return format!("cgroup /{} is NOT enforced: {why}", c.path);
        }
        if !self.cgroups.is_empty() {
            return String::new();
        }
        let mount = mount.display();
        match &self.selector {
            Selector::Cgroup(path) => format!("waiting: no cgroup {mount}/{path}"),
            Selector::Unit(u) if u.is_template() => format!(
                "waiting: no instance of {} in the slices under {mount}",
                u.name
            ),
            Selector::Unit(u) => match u.user {
                None => format!("waiting: no cgroup for {} in the slices under {mount}", u.name),
                Some(uid) => format!(
                    "waiting: no cgroup for {} under {mount}/user.slice/user-{uid}.slice/user@{uid}.service",
                    u.name
                ),
            },
        }
    }
}

/// Adds first, then the removes of cgroups no add is for: a cgroup that
/// moves to another service (or stays) is never briefly unmanaged.
fn in_order(changes: Vec<Change>) -> Vec<Change> {
    let added: std::collections::HashSet<u64> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Add { cgroup_id, .. } => Some(*cgroup_id),
            Change::Remove { .. } => None,
        })
        .collect();
    let (mut adds, removes): (Vec<Change>, Vec<Change>) = changes
        .into_iter()
        .partition(|c| matches!(c, Change::Add { .. }));
    adds.extend(
        removes
            .into_iter()
            .filter(|c| !matches!(c, Change::Remove { cgroup_id } if added.contains(cgroup_id))),
    );
    adds
}

pub struct ServiceTracker {
    mount: PathBuf,
    pub services: Vec<TrackedService>,
}

impl ServiceTracker {
    pub fn new(mount: &Path, policy: &CompiledPolicy) -> Self {
        Self {
            mount: mount.to_path_buf(),
            services: policy
                .services
                .iter()
                .map(|s| TrackedService {
                    name: s.name.clone(),
                    selector: s.selector.clone(),
                    entry: s.entry,
                    cgroups: Vec::new(),
                })
                .collect(),
        }
    }

    /// The cgroup2 mount the paths are relative to.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Re-resolves every service; returns the map changes (adds before
    /// removes, so a service is never briefly unmanaged). Cgroups whose
    /// entry could not be written are added again.
    pub fn rescan(&mut self) -> Vec<Change> {
        let found = self.find();
        let mut adds = Vec::new();
        let mut removes = Vec::new();
        for (i, s) in self.services.iter_mut().enumerate() {
            let mut now: Vec<ServiceCgroup> = found
                .get(&i)
                .into_iter()
                .flatten()
                .map(|(path, id)| ServiceCgroup {
                    path: path.clone(),
                    id: *id,
                    unenforced: None,
                })
                .collect();
            for c in &mut now {
                match s.cgroups.iter().find(|old| old.id == c.id) {
                    Some(old) if old.unenforced.is_none() => continue,
                    Some(old) => c.unenforced.clone_from(&old.unenforced),
                    None => {
                        info!(service = %s.name, cgroup = %c.path, cgroup_id = c.id, "service cgroup found")
                    }
                }
                adds.push(Change::Add {
                    cgroup_id: c.id,
                    entry: s.entry,
                });
            }
            for old in &s.cgroups {
                if !now.iter().any(|c| c.id == old.id) {
                    info!(service = %s.name, cgroup = %old.path, cgroup_id = old.id, "service cgroup gone");
                    removes.push(Change::Remove { cgroup_id: old.id });
                }
            }
            now.sort_by(|a, b| a.path.cmp(&b.path));
            s.cgroups = now;
        }
        adds.extend(removes);
        in_order(adds)
    }

    /// The removes that undo adds in `changes` of cgroups gone (or made
    /// anew under the same path) before the add was written: the kernel
    /// forgets a cgroup at rmdir, but an add the agent wrote after that
    /// rmdir would stay behind. An add of a cgroup the tracker no longer
    /// holds (a reload re-pointing a cgroup its rescan then found gone) is
    /// undone too. Called once the adds are written; a cgroup removed after
    /// that is the kernel's to forget.
    pub fn gone_before_written(&self, changes: &[Change]) -> Vec<Change> {
        changes
            .iter()
            .filter_map(|change| {
                let Change::Add { cgroup_id, .. } = *change else {
                    return None;
                };
                let path = self
                    .services
                    .iter()
                    .flat_map(|s| &s.cgroups)
                    .find(|c| c.id == cgroup_id)
                    .map(|c| c.path.as_str());
                let live =
                    path.is_some_and(|p| cgroup::cgroup_id(&self.mount, p) == Some(cgroup_id));
                (!live).then_some(Change::Remove { cgroup_id })
            })
            .collect()
    }

    /// Records what applying `changes` gave: a failed add leaves its
    /// cgroup unenforced (and retried by the next rescan).
    pub fn applied(&mut self, failed: &[(Change, String)]) {
        for s in &mut self.services {
            for c in &mut s.cgroups {
                let failure = failed.iter().find_map(|(change, e)| match change {
                    Change::Add { cgroup_id, .. } if *cgroup_id == c.id => Some(e),
                    _ => None,
                });
                match (failure, &c.unenforced) {
                    (Some(e), None) => {
                        error!(service = %s.name, cgroup = %c.path, "the kernel does NOT enforce this service's cgroup: {e}; retrying");
                        c.unenforced = Some(e.clone());
                    }
                    (None, Some(_)) => {
                        info!(service = %s.name, cgroup = %c.path, "service cgroup enforced");
                        c.unenforced = None;
                    }
                    (Some(e), Some(_)) => c.unenforced = Some(e.clone()),
                    (None, None) => {}
                }
            }
        }
    }

    /// Every cgroup each service owns now, by service index: a cgroup
    /// named by several services belongs to the closest (an exact path,
    /// then a unit, then a template).
    fn find(&self) -> HashMap<usize, Vec<(String, u64)>> {
        let mut owner: HashMap<String, (Closeness, usize)> = HashMap::new();
        let mut claim = |path: String, closeness: Closeness, i: usize| {
            let e = owner.entry(path).or_insert((closeness, i));
            if closeness > e.0 {
                *e = (closeness, i);
            }
        };
        for (i, s) in self.services.iter().enumerate() {
            if let Selector::Cgroup(path) = &s.selector {
                claim(path.clone(), Closeness::Path, i);
            }
        }
        // By key: one scan of each path, whatever the number of services.
        let units: HashMap<UnitKey, usize> = self
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.selector {
                Selector::Unit(u) => Some((u.key(), i)),
                Selector::Cgroup(_) => None,
            })
            .collect();
        if !units.is_empty() {
            for path in cgroup::units::candidates(&self.mount) {
                let Some(found) = unit_of_path(format!("/{path}").as_bytes()) else {
                    continue;
                };
                let key = |kind, hash| UnitKey {
                    manager: found.manager,
                    kind,
                    hash,
                };
                if let Some(&i) = units.get(&key(UNIT_EXACT, found.exact)) {
                    claim(path.clone(), Closeness::Unit, i);
                }
                if let Some(&i) = found
                    .template
                    .and_then(|t| units.get(&key(UNIT_TEMPLATE, t)))
                {
                    claim(path.clone(), Closeness::Template, i);
                }
            }
        }
        let mut found: HashMap<usize, Vec<(String, u64)>> = HashMap::new();
        for (path, (_, i)) in owner {
            if let Some(id) = cgroup::cgroup_id(&self.mount, &path) {
                found.entry(i).or_default().push((path, id));
            }
        }
        found
    }

    /// Takes the services of a newly placed policy. Cgroups already known
    /// are pointed at their new entries at once (the switch); services
    /// gone from the policy are unmanaged; new ones are resolved.
    pub fn reload(&mut self, policy: &CompiledPolicy) -> Vec<Change> {
        let old = std::mem::take(&mut self.services);
        let mut changes = Vec::new();
        for s in &policy.services {
            let known = old
                .iter()
                .find(|o| o.selector == s.selector)
                .map(|o| o.cgroups.clone())
                .unwrap_or_default();
            for c in &known {
                changes.push(Change::Add {
                    cgroup_id: c.id,
                    entry: s.entry,
                });
            }
            self.services.push(TrackedService {
                name: s.name.clone(),
                selector: s.selector.clone(),
                entry: s.entry,
                cgroups: known,
            });
        }
        for o in &old {
            let kept = policy.services.iter().any(|s| s.selector == o.selector);
            if !kept {
                info!(service = %o.name, "service removed from the policy; no longer managed");
                changes.extend(o.cgroups.iter().map(|c| Change::Remove { cgroup_id: c.id }));
            }
        }
        changes.extend(self.rescan());
        in_order(changes)
    }

    /// Every cgroup each service owns now (a fresh look, not the last
    /// rescan's), with the entry SERVICES must hold for it.
    pub fn current(&self) -> Vec<(u64, ServiceEntry)> {
        self.find()
            .into_iter()
            .flat_map(|(i, cgroups)| {
                let entry = self.services[i].entry;
                cgroups.into_iter().map(move |(_, id)| (id, entry))
            })
            .collect()
    }

    /// Each service's state, for the metrics.
    pub fn statuses(&self) -> Vec<crate::metrics::ServiceStatus> {
        self.services
            .iter()
            .map(|s| crate::metrics::ServiceStatus {
                id: s.entry.service_id,
                state: s.state().as_str(),
                enforced_cgroups: s.enforced().count(),
            })
            .collect()
    }
}
