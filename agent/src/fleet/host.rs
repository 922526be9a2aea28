//! What the engine tells the fleet exporter about this host: each
//! service's policy as applied (for the `policies` table) and the cgroups
//! it runs in (to find its listeners). Published on a watch channel after
//! every applied change and rescan; the exporter sends a policy snapshot
//! when it differs from the last one sent.

use super::model::Rule;
use crate::{
    policy::{EgressRule, PolicySet, RuleRef, Section, Service},
    reload::Snapshot,
    services::TrackedService,
};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub mode: String,
    pub file: String,
    pub file_sha256: String,
    pub rules: Vec<Rule>,
    /// Its cgroups, relative to the cgroup2 mount.
    pub cgroups: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    pub services: Vec<ServiceView>,
}

fn rule(s: &Service, r: &EgressRule) -> Rule {
    Rule {
        rule: RuleRef {
            service: s.name.clone(),
            file: s.file.clone(),
            section: Section::Egress,
            index: r.index,
        }
        .to_string(),
        to: r.to.clone(),
        names: r.names.iter().map(ToString::to_string).collect(),
        ports: r.ports.iter().map(|p| (p.lo, p.hi)).collect(),
        protocol: r.protocol.to_string(),
        description: r.description.clone(),
    }
}

impl HostView {
    /// The view of the policy in force and the services as last found.
    #[must_use]
    pub fn new(set: &PolicySet, snapshot: &Snapshot, tracked: &[TrackedService]) -> Self {
        let services = set
            .services
            .iter()
            .map(|s| ServiceView {
                name: s.name.clone(),
                mode: s.mode.to_string(),
                file: s.file.display().to_string(),
                file_sha256: snapshot
                    .files
                    .get(&s.file)
                    .map(|f| f.sha256.clone())
                    .unwrap_or_default(),
                rules: s.egress.iter().map(|r| rule(s, r)).collect(),
                cgroups: tracked
                    .iter()
                    .filter(|t| t.name == s.name)
                    .flat_map(|t| t.cgroups.iter().map(|c| c.path.clone()))
                    .collect(),
            })
            .collect();
        Self { services }
    }
}
