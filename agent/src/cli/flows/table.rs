//! `bulkhead flows` as a table, one event per line, like `hubble observe`:
//!
//! ```text
//! TIME          SERVICE  PROCESS          DIR     PROTO  DESTINATION                         VERDICT  RULE
//! 09:08:07.123  billing  curl[4242]       egress  tcp    192.0.2.9:5432                      deny     billing.toml#default-deny
//! 09:08:08.002  billing  curl[4243]       egress  tcp    api.example.test:443 (203.0.113.5)  allow    billing.toml#egress[0]
//! ```
//!
//! A destination the service's own lookup named (`dst_name`) is shown by
//! that name and port, the address after it.
//!
//! Pure functions, so the layout is unit-tested.

use std::net::SocketAddr;

use crate::events::{EventType, FlowEvent, Verdict};

pub const COLUMNS: usize = 8;
pub const HEADER: [&str; COLUMNS] = [
    "TIME",
    "SERVICE",
    "PROCESS",
    "DIR",
    "PROTO",
    "DESTINATION",
    "VERDICT",
    "RULE",
];
/// Widths when rows come one at a time (`--follow`): wide enough for
/// common values; a longer one pushes its line's later columns right.
pub const STREAM_WIDTHS: [usize; COLUMNS] = [12, 16, 24, 7, 5, 21, 11, 0];
/// No column is padded wider than this when fitted to the rows.
const MAX_WIDTH: usize = 48;
const GAP: &str = "  ";

pub type Row = [String; COLUMNS];

/// The cells of one event.
pub fn row(ev: &FlowEvent) -> Row {
    let verdict = match (ev.kind, ev.verdict) {
        (EventType::Verdict, Some(Verdict::Allow)) => "allow".to_string(),
        (EventType::Verdict, Some(Verdict::Deny)) => "deny".to_string(),
        (EventType::Verdict, Some(Verdict::Audit)) => "audit".to_string(),
        (EventType::Verdict, None) => "-".to_string(),
        (EventType::TcpEstablished, _) => "established".to_string(),
        (EventType::TcpClosed, _) => closed(ev),
        (EventType::PolicyChange, _) => ev.change.as_ref().map_or_else(
            || "policy change".to_string(),
            |c| format!("{} {}", c.action, c.result),
        ),
        (EventType::Anomaly, _) => ev
            .anomaly
            .as_ref()
            .map_or_else(|| "anomaly".to_string(), |a| format!("anomaly {}", a.kind)),
        // An open TCP connection's byte summary: no calls, no verdict.
        (EventType::Flow, None) if ev.calls.is_none() => open_bytes(ev),
        // "allow x4999": the calls since the flow's previous line.
        (EventType::Flow, verdict) => format!(
            "{} x{}",
            match verdict {
                Some(Verdict::Allow) => "allow",
                Some(Verdict::Deny) => "deny",
                Some(Verdict::Audit) => "audit",
                None => "-",
            },
            ev.calls.unwrap_or(0)
        ),
    };
    [
        clock(&ev.time),
        ev.service.as_deref().unwrap_or("-").to_string(),
        format!("{}[{}]", ev.comm, ev.pid),
        match ev.traffic_direction {
            Some(crate::events::Direction::Egress) => "egress",
            Some(crate::events::Direction::Ingress) => "ingress",
            None => "-",
        }
        .to_string(),
        ev.protocol.as_deref().unwrap_or("-").to_string(),
        // SocketAddr writes IPv6 as [addr]:port. Bind and socket-creation
        // events have no remote end: show the local one, or "-".
        match (ev.dst_ip, ev.dst_port, ev.src_ip, ev.src_port) {
            (Some(ip), Some(port), _, _) => match ev.dst_name.as_deref() {
                Some(name) => format!("{}:{port} ({ip})", shorten(name)),
                None => SocketAddr::new(ip, port).to_string(),
            },
            (None, _, Some(ip), Some(port)) => format!("local {}", SocketAddr::new(ip, port)),
            _ => "-".to_string(),
        },
        verdict,
        ev.rule.as_deref().unwrap_or("-").to_string(),
    ]
    // A process names itself: no cell may carry a terminal control.
    .map(|cell| crate::visible::visible(&cell).into_owned())
}

/// The longest name shown whole in the DESTINATION column.
const MAX_NAME: usize = 40;

/// A DNS name cut to [`MAX_NAME`] characters, its start replaced by `…`: the
/// end of a name (its domain) says the most. A name may be 253 long.
fn shorten(name: &str) -> String {
    let len = name.chars().count();
    if len <= MAX_NAME {
        return name.to_string();
    }
    let tail: String = name.chars().skip(len - (MAX_NAME - 1)).collect();
    format!("…{tail}")
}

/// `open (sent 1.5 KiB, received 312 B)`: what an open connection moved
/// since its previous summary.
fn open_bytes(ev: &FlowEvent) -> String {
    format!(
        "open (sent {}, received {})",
        bytes(ev.bytes_sent.unwrap_or(0)),
        bytes(ev.bytes_received.unwrap_or(0))
    )
}

/// `closed (sent 1.5 KiB, received 312 B, 2.3s)`, with what is known.
fn closed(ev: &FlowEvent) -> String {
    let mut parts = Vec::new();
    if let Some(n) = ev.bytes_sent {
        parts.push(format!("sent {}", bytes(n)));
    }
    if let Some(n) = ev.bytes_received {
        parts.push(format!("received {}", bytes(n)));
    }
    if let Some(ns) = ev.duration_ns {
        parts.push(duration(ns));
    }
    if parts.is_empty() {
        "closed".to_string()
    } else {
        format!("closed ({})", parts.join(", "))
    }
}

/// `HH:MM:SS.mmm` of an RFC 3339 time (UTC, as events carry it); anything
/// else is shown as it is.
pub fn clock(time: &str) -> String {
    let Some((_, rest)) = time.split_once('T') else {
        return time.to_string();
    };
    let b = rest.as_bytes();
    let hms = b.len() >= 8
        && b[2] == b':'
        && b[5] == b':'
        && [0, 1, 3, 4, 6, 7].iter().all(|&i| b[i].is_ascii_digit());
    if !hms {
        return time.to_string();
    }
    let millis: String = rest[8..]
        .strip_prefix('.')
        .unwrap_or("")
        .chars()
        .take_while(char::is_ascii_digit)
        .chain(std::iter::repeat('0'))
        .take(3)
        .collect();
    format!("{}.{millis}", &rest[..8])
}

/// Bytes in binary units, one decimal above 1 KiB: `312 B`, `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    // Precision loss past 2^53 bytes is invisible at one decimal.
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A duration for people: `850µs`, `12ms`, `2.3s`, `4m05s`, `3h02m`.
pub fn duration(ns: u64) -> String {
    let (us, ms, s) = (ns / 1_000, ns / 1_000_000, ns / 1_000_000_000);
    match () {
        () if ns < 1_000 => format!("{ns}ns"),
        () if us < 1_000 => format!("{us}µs"),
        () if ms < 1_000 => format!("{ms}ms"),
        () if s < 60 => format!("{s}.{}s", (ms % 1_000) / 100),
        () if s < 3_600 => format!("{}m{:02}s", s / 60, s % 60),
        () => format!("{}h{:02}m", s / 3_600, (s % 3_600) / 60),
    }
}

/// Column widths that fit `rows` and the header (capped at 48).
pub fn fit(rows: &[Row]) -> [usize; COLUMNS] {
    let mut widths = HEADER.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count().min(MAX_WIDTH));
        }
    }
    widths
}

/// One line: cells padded to `widths` and two spaces apart; the last
/// column unpadded, no trailing spaces.
pub fn line<S: AsRef<str>>(cells: &[S; COLUMNS], widths: &[usize; COLUMNS]) -> String {
    let mut out = String::new();
    for (i, (cell, &width)) in cells.iter().zip(widths).enumerate() {
        let cell = cell.as_ref();
        if i + 1 == COLUMNS {
            out.push_str(cell);
        } else {
            out.push_str(&format!("{cell:<width$}"));
            out.push_str(GAP);
        }
    }
    out.truncate(out.trim_end().len());
    out
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use super::*;
    use crate::control::protocol::tests::event;

    #[test]
    fn clock_takes_the_time_of_day_to_the_millisecond() {
        assert_eq!(clock("2026-05-20T09:08:07.123456789Z"), "09:08:07.123");
        assert_eq!(clock("2026-05-20T09:08:07.1Z"), "09:08:07.100");
        assert_eq!(clock("2026-05-20T09:08:07Z"), "09:08:07.000");
        assert_eq!(clock("yesterday"), "yesterday");
        assert_eq!(clock("2026-05-20Tnoon"), "2026-05-20Tnoon");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(duration(999), "999ns");
        assert_eq!(duration(850_000), "850µs");
        assert_eq!(duration(12_000_000), "12ms");
        assert_eq!(duration(2_345_000_000), "2.3s");
        assert_eq!(duration(245_000_000_000), "4m05s");
        assert_eq!(duration(3 * 3_600_000_000_000 + 120_000_000_000), "3h02m");
    }

    #[test]
    fn a_denied_connect() {
        assert_eq!(
            row(&event()),
            [
                "09:08:07.123",
                "billing",
                "curl[42]",
                "egress",
                "tcp",
                "192.0.2.9:5432",
                "deny",
                "billing.toml#default-deny"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn a_process_name_cannot_write_terminal_controls() {
        let ev = FlowEvent {
            comm: "x\x1b[1A\x1b[2K\ndeny".to_string(),
            ..event()
        };
        assert_eq!(row(&ev)[2], "x\\u{1b}[1A\\u{1b}[2K\\u{a}deny[42]");
    }

    #[test]
    fn lifecycle_unmanaged_and_ipv6() {
        let closed = FlowEvent {
            kind: EventType::TcpClosed,
            verdict: None,
            rule: None,
            service: None,
            dst_ip: Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            bytes_sent: Some(1536),
            bytes_received: Some(312),
            duration_ns: Some(2_345_000_000),
            ..event()
        };
        let cells = row(&closed);
        assert_eq!(cells[1], "-");
        assert_eq!(cells[5], "[::1]:5432");
        assert_eq!(cells[6], "closed (sent 1.5 KiB, received 312 B, 2.3s)");
        assert_eq!(cells[7], "-");
        let established = FlowEvent {
            kind: EventType::TcpEstablished,
            verdict: None,
            ..event()
        };
        assert_eq!(row(&established)[6], "established");
        let open = FlowEvent {
            kind: EventType::Flow,
            hook: "sock_ops".into(),
            verdict: None,
            calls: None,
            bytes_sent: Some(1536),
            bytes_received: Some(0),
            ..event()
        };
        assert_eq!(row(&open)[6], "open (sent 1.5 KiB, received 0 B)");
        let audit = FlowEvent {
            verdict: Some(Verdict::Audit),
            ..event()
        };
        assert_eq!(row(&audit)[6], "audit");
        // Bind has only the local end; socket creation neither.
        let bind = FlowEvent {
            hook: "bind".into(),
            dst_ip: None,
            dst_port: None,
            src_ip: Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            src_port: Some(8080),
            ..event()
        };
        assert_eq!(row(&bind)[5], "local [::]:8080");
        let socket = FlowEvent {
            src_ip: None,
            src_port: None,
            ..bind
        };
        assert_eq!(row(&socket)[5], "-");
    }

    #[test]
    fn lines_are_aligned_to_the_widest_cell() {
        let rows = vec![row(&event())];
        let widths = fit(&rows);
        assert_eq!(
            line(&HEADER, &widths),
            "TIME          SERVICE  PROCESS   DIR     PROTO  DESTINATION     VERDICT  RULE"
        );
        assert_eq!(
            line(&rows[0], &widths),
            "09:08:07.123  billing  curl[42]  egress  tcp    192.0.2.9:5432  deny     billing.toml#default-deny"
        );
        // No trailing spaces when the last cells are short.
        let short = [""; COLUMNS];
        assert_eq!(line(&short, &STREAM_WIDTHS), "");
    }

    #[test]
    fn a_destination_a_lookup_named_shows_the_name_then_the_address() {
        let named = FlowEvent {
            dst_name: Some("api.example.test".into()),
            dst_ip: "203.0.113.5".parse().ok(),
            dst_port: Some(443),
            verdict: Some(Verdict::Allow),
            ..event()
        };
        assert_eq!(row(&named)[5], "api.example.test:443 (203.0.113.5)");
        let v6 = FlowEvent {
            dst_ip: "2001:db8::5".parse().ok(),
            ..named.clone()
        };
        assert_eq!(row(&v6)[5], "api.example.test:443 (2001:db8::5)");
        // A long name keeps its end, so the cell stays readable.
        let long = format!("{}.example.test", "a".repeat(60));
        let cell = row(&FlowEvent {
            dst_name: Some(long.as_str().into()),
            ..named.clone()
        })[5]
            .clone();
        assert_eq!(
            cell,
            format!("…{}:443 (203.0.113.5)", &long[long.len() - 39..])
        );
        assert_eq!(
            cell.chars().count(),
            MAX_NAME + ":443 (203.0.113.5)".chars().count()
        );
        // The name comes from a DNS answer: no terminal controls either.
        let hostile = FlowEvent {
            dst_name: Some("x\u{1b}[2K.example.test".into()),
            ..named
        };
        assert_eq!(
            row(&hostile)[5],
            "x\\u{1b}[2K.example.test:443 (203.0.113.5)"
        );
    }

    #[test]
    fn overlong_cells_do_not_widen_columns_past_the_cap() {
        let mut r = row(&event());
        r[2] = "p".repeat(100);
        assert_eq!(fit(&[r])[2], MAX_WIDTH);
    }
}
