//! Which probe each line of the daemon's decision log came from, so the
//! lines per call can be read per probe: the UDP connect() and sendto()
//! probes repeat one flow, and a repeated flow should cost (almost) no line.

use std::collections::BTreeMap;

use super::loadgen::Probe;

/// Lines per probe, and lines that belong to none (a policy change, say).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub per_probe: BTreeMap<Probe, u64>,
    pub other: u64,
}

/// Counts the lines of a JSON-lines decision log by probe.
pub fn count(text: &str) -> Counts {
    let mut counts = Counts::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match classify(line) {
            Some(probe) => *counts.per_probe.entry(probe).or_default() += 1,
            None => counts.other += 1,
        }
    }
    counts
}

/// By the line's fields, whatever its type (verdict, tcp_established,
/// tcp_closed, flow summaries): any TCP line is the TCP probe's (only it
/// makes TCP sockets), a sendmsg line the sendto probe's, a UDP connect
/// line the UDP connect probe's. A line that does not parse counts as
/// other.
fn classify(line: &str) -> Option<Probe> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| v.get(name).and_then(serde_json::Value::as_str);
    let (hook, protocol) = (field("hook"), field("protocol"));
    if protocol == Some("tcp") {
        Some(Probe::TcpConnect)
    } else if hook == Some("sendmsg") {
        Some(Probe::UdpSendto)
    } else if hook == Some("connect") && protocol == Some("udp") {
        Some(Probe::UdpConnect)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_go_to_their_probe() {
        let log = r#"{"type":"verdict","hook":"connect","protocol":"udp","verdict":"allow"}
{"type":"verdict","hook":"connect","protocol":"udp","verdict":"deny"}
{"type":"verdict","hook":"sendmsg","protocol":"udp"}
{"type":"flow","hook":"sendmsg","protocol":"udp"}
{"type":"verdict","hook":"connect","protocol":"tcp"}
{"type":"tcp_established","hook":"sockops","protocol":"tcp"}
{"type":"tcp_closed","hook":"sockops","protocol":"tcp"}
{"type":"flow","hook":"connect","protocol":"tcp"}
{"type":"policy_change","hook":"","protocol":null}
not json

"#;
        let c = count(log);
        assert_eq!(c.per_probe.get(&Probe::UdpConnect), Some(&2));
        assert_eq!(c.per_probe.get(&Probe::UdpSendto), Some(&2));
        assert_eq!(c.per_probe.get(&Probe::TcpConnect), Some(&4));
        assert_eq!(c.other, 2);
    }
}
