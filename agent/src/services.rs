//! Which cgroup each service is in right now. Services whose cgroup does
//! not exist yet are waiting; a restarted unit gets a new cgroup (same
//! path, new id). The tracker re-resolves every service periodically and
//! tells the kernel maps what changed.

use std::path::{Path, PathBuf};

use agent_common::ServiceEntry;
use tracing::info;

use crate::{cgroup, kernel::CompiledPolicy};

/// How often cgroups are re-resolved.
pub const RESCAN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedService {
    pub name: String,
    pub cgroup_path: String,
    pub entry: ServiceEntry,
    /// The cgroup id in the SERVICES map, None while waiting.
    pub cgroup_id: Option<u64>,
}

/// One change to apply to the SERVICES map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Add { cgroup_id: u64, entry: ServiceEntry },
    Remove { cgroup_id: u64 },
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
                    cgroup_path: s.cgroup_path.clone(),
                    entry: s.entry,
                    cgroup_id: None,
                })
                .collect(),
        }
    }

    /// The cgroup2 mount the paths are relative to.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Re-resolves every service; returns the map changes (adds before
    /// removes, so a service is never briefly unmanaged).
    pub fn rescan(&mut self) -> Vec<Change> {
        let mut adds = Vec::new();
        let mut removes = Vec::new();
        for s in &mut self.services {
            let now = cgroup::cgroup_id(&self.mount, &s.cgroup_path);
            if now == s.cgroup_id {
                continue;
            }
            match now {
                Some(id) => {
                    info!(service = %s.name, cgroup = %s.cgroup_path, cgroup_id = id, "service managed");
                    adds.push(Change::Add {
                        cgroup_id: id,
                        entry: s.entry,
                    });
                }
                None => {
                    info!(service = %s.name, cgroup = %s.cgroup_path, "cgroup gone; service waiting for it")
                }
            }
            if let Some(old) = s.cgroup_id {
                removes.push(Change::Remove { cgroup_id: old });
            }
            s.cgroup_id = now;
        }
        adds.extend(removes);
        adds
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
                .find(|o| o.cgroup_path == s.cgroup_path)
                .and_then(|o| o.cgroup_id);
            if let Some(cgroup_id) = known {
                changes.push(Change::Add {
                    cgroup_id,
                    entry: s.entry,
                });
            }
            self.services.push(TrackedService {
                name: s.name.clone(),
                cgroup_path: s.cgroup_path.clone(),
                entry: s.entry,
                cgroup_id: known,
            });
        }
        for o in &old {
            let kept = policy
                .services
                .iter()
                .any(|s| s.cgroup_path == o.cgroup_path);
            if let (false, Some(cgroup_id)) = (kept, o.cgroup_id) {
                info!(service = %o.name, "service removed from the policy; no longer managed");
                changes.push(Change::Remove { cgroup_id });
            }
        }
        changes.extend(self.rescan());
        changes
    }

    pub fn managed(&self) -> usize {
        self.services
            .iter()
            .filter(|s| s.cgroup_id.is_some())
            .count()
    }
}
