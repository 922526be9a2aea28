//! The fleet as its rows describe it: service instances (`api@h2`) with
//! their policies, who listened where and when, and the flows between
//! them. Pure: the fleet queries read the rows, the blast radius and the
//! graph are answered from them.

mod blast;
mod input;
mod listeners;
#[cfg(test)]
mod tests;
mod view;

use std::collections::HashMap;

use ipnetwork::IpNetwork;

pub use blast::{Allowance, FleetBlastRadius, Reached};
pub use input::{Flow, Instance, Listener, Rule};
pub use listeners::{Listeners, CURRENT_SLACK_SECS};

/// The fleet's rows, indexed for the questions below.
pub struct Fleet {
    instances: Vec<Instance>,
    by_name: HashMap<(String, String), usize>,
    listeners: Listeners,
    flows: HashMap<usize, Vec<Flow>>,
}

impl Fleet {
    /// Flows of services without a policy snapshot are kept out: nothing
    /// asks for their blast radius.
    pub fn new(instances: Vec<Instance>, listeners: Vec<Listener>, flows: Vec<Flow>) -> Self {
        let by_name: HashMap<(String, String), usize> = instances
            .iter()
            .enumerate()
            .map(|(i, s)| ((s.service.clone(), s.host.clone()), i))
            .collect();
        let mut by_instance: HashMap<usize, Vec<Flow>> = HashMap::new();
        for f in flows {
            if let Some(&i) = by_name.get(&(f.service.clone(), f.host.clone())) {
                by_instance.entry(i).or_default().push(f);
            }
        }
        Self {
            instances,
            by_name,
            listeners: Listeners::new(listeners),
            flows: by_instance,
        }
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// `web` means every instance of it; `web@h1` the one on h1. A
    /// template instance's name has an `@` of its own
    /// (`postgresql@14-main`): a whole-name match comes first.
    fn select(&self, asked: &str) -> Vec<usize> {
        let matching = |service: &str, host: Option<&str>| -> Vec<usize> {
            (0..self.instances.len())
                .filter(|&i| {
                    let s = &self.instances[i];
                    s.service == service && host.is_none_or(|h| s.host == h)
                })
                .collect()
        };
        let mut out = matching(asked, None);
        if out.is_empty() {
            if let Some((service, host)) = asked.rsplit_once('@') {
                out = matching(service, Some(host));
            }
        }
        out.sort_by(|&a, &b| self.instances[a].host.cmp(&self.instances[b].host));
        out
    }

    fn flows_of(&self, i: usize) -> &[Flow] {
        self.flows.get(&i).map_or(&[], Vec::as_slice)
    }

    /// `api@h2`, for a listener.
    fn owner_name(l: &Listener) -> String {
        format!("{}@{}", l.service, l.host)
    }

    /// Current listeners that `rule`'s `net` of instance `s` lets it reach.
    fn reachable<'a>(
        &'a self,
        s: &'a Instance,
        rule: &'a Rule,
        net: &'a IpNetwork,
    ) -> impl Iterator<Item = &'a Listener> + 'a {
        self.listeners.current_in(net, &s.host, move |l| {
            rule.port_allowed(l.port) && rule.protocol_allowed(&l.protocol)
        })
    }

    /// Who listened at a flow's destination while it ran.
    fn owner_of(&self, s: &Instance, f: &Flow) -> Option<&Listener> {
        self.listeners.owner_at(
            f.remote_addr,
            f.remote_port,
            &f.protocol,
            &s.host,
            (f.first_seen, f.last_seen),
        )
    }
}

/// Whether `net` of `rule` lets flow `f` through.
fn covers(rule: &Rule, net: &IpNetwork, f: &Flow) -> bool {
    net.contains(f.remote_addr)
        && rule.port_allowed(f.remote_port)
        && rule.protocol_allowed(&f.protocol)
}
