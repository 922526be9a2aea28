//! Which `Host` headers the metrics listener answers. A web page can make a
//! browser send requests to a name it controls that it then resolves to
//! 127.0.0.1 (DNS rebinding) and read the answers: the service map among
//! them. Such a request carries the attacker's name in `Host`, so only
//! names that cannot be rebound are answered: an IP address (the browser
//! connected to that address itself), `localhost`, and whatever the
//! operator lists in `[metrics] allowed_hosts` (a proxy's name). The port
//! is not compared: it carries no protection, and a proxy may rewrite it.

use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Lower-case names, without a port.
    extra: Vec<String>,
}

impl AllowedHosts {
    #[must_use]
    pub fn new(extra: &[String]) -> Self {
        Self {
            extra: extra.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether a request whose `Host` header is `host` is answered; a
    /// request without one (or with one that is not text) is not.
    #[must_use]
    pub fn allows(&self, host: Option<&[u8]>) -> bool {
        let Some(host) = host.and_then(|h| std::str::from_utf8(h).ok()) else {
            return false;
        };
        let host = host.trim().to_ascii_lowercase();
        let Some(name) = name_of(&host) else {
            return false;
        };
        name == "localhost"
            || name.parse::<Ipv4Addr>().is_ok()
            || name
                .strip_prefix('[')
                .and_then(|n| n.strip_suffix(']'))
                .is_some_and(|n| n.parse::<Ipv6Addr>().is_ok())
            || self.extra.iter().any(|e| e == name)
    }
}

/// `host` without its port: `name`, `name:port`, `[v6]`, `[v6]:port`.
fn name_of(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        let end = host.find(']')?;
        let rest = &host[end + 1..];
        return (rest.is_empty() || port_ok(rest.strip_prefix(':')?)).then(|| &host[..=end]);
    }
    match host.split_once(':') {
        Some((name, port)) if port_ok(port) => Some(name),
        Some(_) => None,
        None => Some(host),
    }
}

fn port_ok(port: &str) -> bool {
    port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(hosts: &AllowedHosts, host: &str) -> bool {
        hosts.allows(Some(host.as_bytes()))
    }

    #[test]
    fn addresses_and_localhost_with_or_without_a_port() {
        let hosts = AllowedHosts::default();
        for ok in [
            "127.0.0.1:9469",
            "127.0.0.1",
            "LOCALHOST:9469",
            "localhost",
            "[::1]:9469",
            "[::1]",
            "10.1.2.3:9469",
        ] {
            assert!(allows(&hosts, ok), "{ok}");
        }
    }

    #[test]
    fn names_are_refused_unless_listed() {
        let hosts = AllowedHosts::default();
        for refused in [
            "attacker.example:9469",
            "attacker.example",
            "127.0.0.1.nip.io:9469",
            "localhost.attacker.example",
            "127.0.0.1:notaport",
            "[::1",
            "[::1]x",
            "::1",
            "",
        ] {
            assert!(!allows(&hosts, refused), "{refused}");
        }
        assert!(!hosts.allows(None), "no Host header");
        assert!(!hosts.allows(Some(b"127.0.0.1\xff")), "not text");
        let hosts = AllowedHosts::new(&["Metrics.Example".to_string()]);
        assert!(allows(&hosts, "metrics.example:443"));
        assert!(allows(&hosts, "METRICS.example"));
        assert!(!allows(&hosts, "other.example"));
    }
}
