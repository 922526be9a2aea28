//! Quarantine: one command cuts a service off (every connection in and out
//! denied, established ones included as far as the kernel allows) except a
//! few listed exceptions. It is an overlay on the policy set, applied like
//! any reload (atomically) and kept in the state directory, so that it
//! survives reloads and agent restarts until released.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, str::FromStr};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::policy::{EgressRule, IngressRule, PolicySet, PortRange, Protocol, SocketsPolicy};

/// A destination (and source) a quarantined service may still talk to:
/// `CIDR[:PORT]`, e.g. `192.0.2.10:514`, `198.51.100.0/24`, `[2001:db8::1]:514`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Exception {
    pub net: IpNetwork,
    pub port: Option<u16>,
}

impl FromStr for Exception {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("{s:?} is not CIDR[:PORT] (like 192.0.2.10:514, 198.51.100.0/24 or [2001:db8::1]:514)")
        };
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad()),
            };
            (net, port)
        } else if s.matches(':').count() == 1 {
            let (net, port) = s.split_once(':').ok_or_else(bad)?;
            (net, Some(port))
        } else {
            (s, None)
        };
        let net = IpNetwork::from_str(net).map_err(|_| bad())?;
        if net.network() != net.ip() {
            return Err(format!("{s:?} has host bits set"));
        }
        let port = port
            .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad))
            .transpose()?;
        Ok(Self { net, port })
    }
}

impl TryFrom<String> for Exception {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Exception> for String {
    fn from(e: Exception) -> Self {
        e.to_string()
    }
}

impl fmt::Display for Exception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.net, self.port) {
            (IpNetwork::V6(n), Some(p)) if n.prefix() == 128 => write!(f, "[{}]:{p}", n.ip()),
            (IpNetwork::V6(n), Some(p)) => write!(f, "[{n}]:{p}"),
            (n, Some(p)) if n.prefix() == 32 => write!(f, "{}:{p}", n.ip()),
            (n, Some(p)) => write!(f, "{n}:{p}"),
            (n, None) if matches!(n.ip(), IpAddr::V4(_)) && n.prefix() == 32 => {
                write!(f, "{}", n.ip())
            }
            (n, None) => write!(f, "{n}"),
        }
    }
}

/// The quarantined services and their exceptions, persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantines {
    pub services: BTreeMap<String, Vec<Exception>>,
}

pub const FILE: &str = "quarantine.json";

impl Quarantines {
    /// Reads `quarantine.json` (none: no quarantine). An error is the
    /// problem with the file: see `quarantine_recovery` for what then.
    pub fn load(state_dir: &Path) -> Result<Self, String> {
        match crate::state_file::read(state_dir, FILE) {
            Ok(Some(bytes)) => Self::parse(&bytes),
            Ok(None) => Ok(Self::default()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Parses the file's bytes.
    ///
    /// # Errors
    /// Not JSON, or not a quarantine file (bad exceptions among them).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("not a valid quarantine file: {e}"))
    }

    /// Written atomically (temporary file, then rename).
    pub fn save(&self, state_dir: &Path) -> Result<(), String> {
        let write = || -> std::io::Result<()> {
            let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
            crate::state_file::write_atomic(state_dir, FILE, &bytes, 0o644)
        };
        write().map_err(|e| format!("cannot save {}: {e}", state_dir.join(FILE).display()))
    }

    /// The policy set with every quarantined service replaced by its
    /// exceptions only: egress to them, ingress from them, no raw or packet
    /// sockets, and the quarantine flag that makes the kernel judge every
    /// packet (established connections too).
    pub fn overlay(&self, set: &PolicySet) -> PolicySet {
        let mut out = set.clone();
        for s in &mut out.services {
            let Some(exceptions) = self.services.get(&s.name) else {
                continue;
            };
            s.quarantined = true;
            s.sockets = SocketsPolicy::default();
            s.egress = exceptions
                .iter()
                .enumerate()
                .map(|(index, e)| EgressRule {
                    index,
                    line: 0,
                    description: Some("quarantine exception".to_string()),
                    to: vec![e.net],
                    names: Vec::new(),
                    ports: e
                        .port
                        .map_or(vec![PortRange::ALL], |p| vec![PortRange { lo: p, hi: p }]),
                    protocol: Protocol::Any,
                    exe: Vec::new(),
                    uid: Vec::new(),
                })
                .collect();
            // Replies from an exception on an established connection come
            // from its port; new inbound connections from it may reach any
            // local port.
            s.ingress = Some(
                exceptions
                    .iter()
                    .enumerate()
                    .map(|(index, e)| IngressRule {
                        index,
                        line: 0,
                        description: Some("quarantine exception".to_string()),
                        from: vec![e.net],
                        ports: vec![PortRange::ALL],
                        protocol: Protocol::Any,
                        exe: Vec::new(),
                        uid: Vec::new(),
                    })
                    .collect(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_parse_with_and_without_ports() {
        let e: Exception = "192.0.2.10:514".parse().expect("v4 with port");
        assert_eq!(
            (e.net.to_string().as_str(), e.port),
            ("192.0.2.10/32", Some(514))
        );
        let e: Exception = "198.51.100.0/24".parse().expect("v4 CIDR");
        assert_eq!(e.port, None);
        let e: Exception = "[2001:db8::1]:514".parse().expect("v6 with port");
        assert_eq!(e.port, Some(514));
        let e: Exception = "2001:db8::/64".parse().expect("v6 CIDR");
        assert_eq!(e.to_string(), "2001:db8::/64");
        assert!("192.0.2.10:0".parse::<Exception>().is_err());
        assert!("192.0.2.1/24".parse::<Exception>().is_err());
        assert!("nonsense".parse::<Exception>().is_err());
    }
}
