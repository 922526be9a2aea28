//! The decision log's encoder: the exact bytes `serde_json` would write for
//! a [`FlowEvent`], faster. The keys are constants (serde_json escapes
//! every key of every event), numbers go through `itoa`, and only strings
//! that need escaping (or the nested `change`/`anomaly` objects) are handed
//! to serde_json. A test holds it byte for byte to serde_json's output.

use std::{io::Write, net::IpAddr};

use super::model::{Direction, EventType, FlowEvent, Verdict};

/// Appends `ev` as one JSON object (no newline) to `out`.
///
/// # Errors
/// Only from serde_json, for the nested change or anomaly records.
pub fn encode(ev: &FlowEvent, out: &mut Vec<u8>) -> serde_json::Result<()> {
    out.extend_from_slice(b"{\"schema\":");
    string(out, &ev.schema);
    out.extend_from_slice(b",\"type\":\"");
    out.extend_from_slice(kind(ev.kind));
    out.extend_from_slice(b"\",\"time\":");
    string(out, &ev.time);
    out.extend_from_slice(b",\"host\":");
    string(out, &ev.host);
    out.extend_from_slice(b",\"ktime_ns\":");
    number(out, ev.ktime_ns);
    out.extend_from_slice(b",\"service\":");
    opt_string(out, ev.service.as_deref());
    out.extend_from_slice(b",\"mode\":");
    opt_string(out, ev.mode.as_deref());
    out.extend_from_slice(b",\"cgroup_id\":");
    number(out, ev.cgroup_id);
    out.extend_from_slice(b",\"pid\":");
    number(out, ev.pid);
    out.extend_from_slice(b",\"tid\":");
    number(out, ev.tid);
    out.extend_from_slice(b",\"uid\":");
    number(out, ev.uid);
    out.extend_from_slice(b",\"gid\":");
    number(out, ev.gid);
    out.extend_from_slice(b",\"comm\":");
    string(out, &ev.comm);
    out.extend_from_slice(b",\"exe\":");
    opt_string(out, ev.exe.as_deref());
    out.extend_from_slice(b",\"traffic_direction\":");
    match ev.traffic_direction {
        Some(Direction::Egress) => out.extend_from_slice(b"\"egress\""),
        Some(Direction::Ingress) => out.extend_from_slice(b"\"ingress\""),
        None => null(out),
    }
    out.extend_from_slice(b",\"hook\":");
    string(out, &ev.hook);
    out.extend_from_slice(b",\"protocol\":");
    opt_string(out, ev.protocol.as_deref());
    out.extend_from_slice(b",\"src_ip\":");
    opt_ip(out, ev.src_ip);
    out.extend_from_slice(b",\"src_port\":");
    opt_number(out, ev.src_port);
    out.extend_from_slice(b",\"dst_ip\":");
    opt_ip(out, ev.dst_ip);
    out.extend_from_slice(b",\"dst_port\":");
    opt_number(out, ev.dst_port);
    out.extend_from_slice(b",\"dst_name\":");
    opt_string(out, ev.dst_name.as_deref());
    out.extend_from_slice(b",\"verdict\":");
    match ev.verdict {
        Some(Verdict::Allow) => out.extend_from_slice(b"\"allow\""),
        Some(Verdict::Deny) => out.extend_from_slice(b"\"deny\""),
        Some(Verdict::Audit) => out.extend_from_slice(b"\"audit\""),
        None => null(out),
    }
    out.extend_from_slice(b",\"rule\":");
    opt_string(out, ev.rule.as_deref());
    out.extend_from_slice(b",\"suppressed\":");
    opt_number(out, ev.suppressed);
    out.extend_from_slice(b",\"calls\":");
    opt_number(out, ev.calls);
    out.extend_from_slice(b",\"socket_cookie\":");
    number(out, ev.socket_cookie);
    out.extend_from_slice(b",\"bytes_sent\":");
    opt_number(out, ev.bytes_sent);
    out.extend_from_slice(b",\"bytes_received\":");
    opt_number(out, ev.bytes_received);
    out.extend_from_slice(b",\"duration_ns\":");
    opt_number(out, ev.duration_ns);
    out.extend_from_slice(b",\"change\":");
    serde_json::to_writer(&mut *out, &ev.change)?;
    out.extend_from_slice(b",\"anomaly\":");
    serde_json::to_writer(&mut *out, &ev.anomaly)?;
    out.push(b'}');
    Ok(())
}

fn kind(k: EventType) -> &'static [u8] {
    match k {
        EventType::Verdict => b"verdict",
        EventType::TcpEstablished => b"tcp_established",
        EventType::TcpClosed => b"tcp_closed",
        EventType::PolicyChange => b"policy_change",
        EventType::Anomaly => b"anomaly",
        EventType::Flow => b"flow",
    }
}

fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

/// A JSON string: copied as is when nothing in it needs escaping (the
/// usual case), else escaped by serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => null(out),
    }
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn opt_number(out: &mut Vec<u8>, n: Option<impl itoa::Integer>) {
    match n {
        Some(n) => number(out, n),
        None => null(out),
    }
}

fn opt_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        // Display of an address never needs escaping; writing to a Vec
        // cannot fail.
        Some(ip) => {
            let _ = write!(out, "\"{ip}\"");
        }
        None => null(out),
    }
}

#[cfg(test)]
mod tests {
    use std::{borrow::Cow, sync::Arc};

    use super::*;
    use crate::events::{AnomalyRecord, ChangeRecord, Evidence, FileChange, ServiceChange};

    fn same_as_serde(ev: &FlowEvent) {
        let mut fast = Vec::new();
        encode(ev, &mut fast).expect("encodes");
        let slow = serde_json::to_vec(ev).expect("serde encodes");
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&slow)
        );
        let back: FlowEvent = serde_json::from_slice(&fast).expect("parses back");
        assert_eq!(&back, ev);
    }

    /// The sample verdict, with numbers at their limits.
    fn verdict() -> FlowEvent {
        FlowEvent {
            gid: u32::MAX,
            suppressed: Some(u32::MAX),
            socket_cookie: u64::MAX,
            ktime_ns: u64::MAX,
            ..crate::events::sample_verdict()
        }
    }

    #[test]
    fn a_verdict_is_encoded_as_serde_json_would() {
        same_as_serde(&verdict());
        for v in [Verdict::Allow, Verdict::Audit] {
            same_as_serde(&FlowEvent {
                verdict: Some(v),
                ..verdict()
            });
        }
    }

    /// `dst_name` sits after `dst_port`, a string when set, null when not
    /// (the sample has none), and reads back; a log line written before the
    /// field existed reads as null.
    #[test]
    fn a_verdict_with_the_name_looked_up() {
        let named = FlowEvent {
            dst_name: Some(Arc::from("api.example.test")),
            verdict: Some(Verdict::Allow),
            ..verdict()
        };
        same_as_serde(&named);
        let mut out = Vec::new();
        encode(&named, &mut out).expect("encodes");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains(r#""dst_port":5432,"dst_name":"api.example.test","verdict":"allow""#),
            "{text}"
        );
        let mut out = Vec::new();
        encode(&verdict(), &mut out).expect("encodes");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains(r#""dst_name":null"#), "{text}");
        let old = text.replace(r#""dst_name":null,"#, "");
        let back: FlowEvent = serde_json::from_str(&old).expect("an old line parses");
        assert_eq!(back.dst_name, None);
    }

    #[test]
    fn strings_that_need_escaping_are_escaped() {
        same_as_serde(&FlowEvent {
            comm: "a\"b\\c\u{1}\u{7f}é\t".to_string(),
            service: Some(Arc::from("we\"ird")),
            ..verdict()
        });
    }

    #[test]
    fn lifecycle_events_with_both_ends_and_ipv6() {
        same_as_serde(&FlowEvent {
            kind: EventType::TcpClosed,
            traffic_direction: Some(Direction::Ingress),
            hook: Cow::Borrowed("sock_ops"),
            protocol: Some(Cow::Owned("132".to_string())),
            src_ip: Some("2001:db8::1".parse().expect("ip")),
            src_port: Some(443),
            dst_ip: Some("::ffff:192.0.2.1".parse().expect("ip")),
            dst_port: Some(0),
            verdict: None,
            rule: None,
            bytes_sent: Some(0),
            bytes_received: Some(1 << 40),
            duration_ns: Some(17),
            ..verdict()
        });
        same_as_serde(&FlowEvent {
            kind: EventType::TcpEstablished,
            service: None,
            mode: None,
            traffic_direction: None,
            protocol: None,
            dst_ip: None,
            dst_port: None,
            ..verdict()
        });
    }

    #[test]
    fn agent_events_with_nested_records() {
        let mut change = FlowEvent::from_agent(EventType::PolicyChange, "policy");
        change.change = Some(ChangeRecord {
            action: "reload".to_string(),
            result: "refused".to_string(),
            trigger: "sighup".to_string(),
            files: vec![FileChange {
                path: "/etc/bulkhead/policies/a.toml".to_string(),
                sha256_before: None,
                sha256_after: Some("ab".repeat(32)),
                owner_uid: Some(0),
                mode: Some("0644".to_string()),
            }],
            services: vec![ServiceChange {
                service: "a".to_string(),
                added: vec!["egress 192.0.2.0/24".to_string()],
                removed: Vec::new(),
            }],
            error: Some("a.toml:3:1: \"bad\"".to_string()),
        });
        same_as_serde(&change);
        let mut anomaly = FlowEvent::from_agent(EventType::Anomaly, "anomaly");
        anomaly.anomaly = Some(AnomalyRecord {
            kind: "fan_out".to_string(),
            severity: "high".to_string(),
            state: "started".to_string(),
            evidence: Evidence {
                baseline: 0.5,
                observed: 20.0,
                window_s: 10,
                sample_destinations: vec!["192.0.2.10:443/tcp".to_string()],
            },
            first_seen: "2026-11-29T02:00:47Z".to_string(),
            last_seen: "2026-11-29T02:00:57Z".to_string(),
            count: 1,
        });
        same_as_serde(&anomaly);
    }

    /// The full example events in the docs are what the encoder writes for
    /// them, byte for byte: a field the log has and an example lacks (as
    /// `change` and `anomaly` once were missing from docs/events.md) fails
    /// here. An example may wrap; lines with `...` are abridged on purpose.
    #[test]
    fn the_docs_full_example_events_are_encoded_events() {
        let mut checked = 0;
        for (file, docs) in [
            ("docs/events.md", include_str!("../../../docs/events.md")),
            ("docs/anomaly.md", include_str!("../../../docs/anomaly.md")),
        ] {
            let mut lines = docs.lines();
            while let Some(line) = lines.next() {
                if !line.starts_with("{\"schema\":") || line.contains("...") {
                    continue;
                }
                let mut example = line.to_owned();
                while !example.ends_with('}') {
                    let next = lines
                        .next()
                        .unwrap_or_else(|| panic!("{file}: an example event never ends"));
                    example.push_str(next.trim());
                }
                let ev: FlowEvent = serde_json::from_str(&example)
                    .unwrap_or_else(|e| panic!("{file}: {e}: {example}"));
                let mut out = Vec::new();
                encode(&ev, &mut out).expect("encodes");
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    example,
                    "{file}: the example is not what the log would hold"
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "found {checked} full examples in the docs");
    }
}
