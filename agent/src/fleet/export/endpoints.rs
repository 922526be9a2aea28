//! The `endpoints` rows: this host's addresses (service "") and its
//! services' listeners, each with when this agent first and last saw it.
//! Looked at every batch interval (one netlink dump of listening sockets
//! and one of addresses); sent when something changed, and at least every
//! [`REFRESH`] so that the fleet knows they are still there.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
};

use tracing::warn;

use crate::fleet::{
    host::HostView,
    inventory::{self, Listening},
    EndpointRow, HostIdentity,
};

/// (kind, service, protocol, address, port).
type Key = (&'static str, String, &'static str, String, u16);

/// Unchanged endpoints are sent again this often (the fleet's listener
/// resolution allows two minutes of slack, `model::CURRENT_SLACK_SECS`).
pub const REFRESH: u32 = 60;

#[derive(Debug, Default)]
pub struct Endpoints {
    first_seen: HashMap<Key, u32>,
    /// When the current set was last sent.
    sent_at: Option<u32>,
    warned: bool,
}

impl Endpoints {
    /// Every endpoint seen now, as rows, when the set changed or
    /// [`REFRESH`] passed; else none. A failed look is logged once and
    /// gives no rows: the fleet keeps what it last heard.
    pub fn rows(
        &mut self,
        id: &HostIdentity,
        view: &HostView,
        mount: &Path,
        now: u32,
    ) -> Vec<EndpointRow> {
        let addresses = match inventory::host_addresses() {
            Ok(a) => a,
            Err(e) => return self.failed("the host's addresses", &e),
        };
        let mut owners = HashMap::new();
        for s in &view.services {
            for cgroup in &s.cgroups {
                inventory::cgroup_owners(mount, cgroup, &s.name, &mut owners);
            }
        }
        let listening = match inventory::listening(&owners, &addresses) {
            Ok(l) => l,
            Err(e) => return self.failed("the listening sockets", &e),
        };
        let mut keys: BTreeSet<Key> = addresses
            .iter()
            .map(|a| ("address", String::new(), "ip", a.to_string(), 0))
            .collect();
        keys.extend(listening.into_iter().map(
            |Listening {
                 service,
                 protocol,
                 addr,
                 port,
             }| ("listener", service, protocol, addr.to_string(), port),
        ));
        let changed = keys.len() != self.first_seen.len()
            || keys.iter().any(|k| !self.first_seen.contains_key(k));
        if !changed
            && self
                .sent_at
                .is_some_and(|t| now < t.saturating_add(REFRESH))
        {
            return Vec::new();
        }
        self.sent_at = Some(now);
        // Forget what is gone, so that the map stays as small as the host.
        self.first_seen.retain(|k, _| keys.contains(k));
        keys.into_iter()
            .map(|k| {
                let first = *self.first_seen.entry(k.clone()).or_insert(now);
                let (kind, service, protocol, addr, port) = k;
                EndpointRow {
                    host: id.host.clone(),
                    host_id: id.host_id.clone(),
                    service,
                    kind: kind.to_string(),
                    protocol: protocol.to_string(),
                    addr,
                    port,
                    first_seen: first,
                    last_seen: now,
                    ..EndpointRow::default()
                }
            })
            .collect()
    }

    fn failed(&mut self, what: &str, e: &std::io::Error) -> Vec<EndpointRow> {
        if !self.warned {
            warn!("fleet export: cannot list {what}: {e}");
            self.warned = true;
        }
        Vec::new()
    }
}
