//! One service's baselines (which persist) and current window (which does
//! not), and how an event updates them without allocating.

use std::net::IpAddr;

use super::{
    config::AnomalyConfig,
    dest::{proto_number, Bounded, DestKey},
    ewma::Ewma,
    group::Group,
    window::Window,
};
use crate::events::{Direction, EventType, FlowEvent, Verdict};

#[derive(Debug, Clone)]
pub struct ServiceState {
    /// Intervals observed (for warm-up).
    pub intervals: u64,
    pub rate: Ewma,
    pub volume: Ewma,
    pub known: Bounded<DestKey>,
    pub window: Window,
    /// Grouping state, by `Kind as usize`.
    pub groups: [Group; 5],
}

impl ServiceState {
    #[must_use]
    pub fn new(cfg: &AnomalyConfig) -> Self {
        Self {
            intervals: 0,
            rate: Ewma::default(),
            volume: Ewma::default(),
            known: Bounded::new(cfg.max_known_destinations),
            window: Window::new(cfg.max_window_destinations),
            groups: [Group::default(); 5],
        }
    }

    #[must_use]
    pub fn warm(&self, cfg: &AnomalyConfig) -> bool {
        self.intervals >= cfg.warmup_intervals
    }

    /// Counts one event (outbound only: attempts, denials, bytes sent);
    /// `sent` is the TCP payload it adds (see `FlowEvent::new_bytes`).
    pub fn observe(&mut self, cfg: &AnomalyConfig, ev: &FlowEvent, sent: u64) {
        if ev.traffic_direction != Some(Direction::Egress) {
            return;
        }
        let attempt = matches!(ev.kind, EventType::Verdict | EventType::Flow)
            && matches!(&*ev.hook, "connect" | "sendmsg");
        let (Some(ip), Some(port)) = (ev.dst_ip, ev.dst_port) else {
            // The calls of flows whose first record the rate limit held
            // back, summed with no destination (docs/events.md, "Flows"):
            // counted, though no destination can be named.
            if attempt && ev.kind == EventType::Flow {
                let calls = ev.calls.unwrap_or(0);
                self.window.conns += calls;
                if matches!(ev.verdict, Some(Verdict::Deny | Verdict::Audit)) {
                    self.window.denies += calls;
                }
            }
            return;
        };
        let key = |ip: IpAddr| {
            DestKey::new(
                ip,
                port,
                proto_number(ev.protocol.as_deref()),
                cfg.new_destination.ipv4_prefix,
                cfg.new_destination.ipv6_prefix,
            )
        };
        match ev.kind {
            // A flow's first call and its summaries: counts are calls.
            EventType::Verdict | EventType::Flow if attempt => {
                let calls = ev.calls.unwrap_or(1);
                let dest = key(ip);
                let w = &mut self.window;
                w.conns += calls;
                w.hosts.insert(ip);
                w.ports.insert(port);
                w.conn_samples.push(dest);
                if matches!(ev.verdict, Some(Verdict::Deny | Verdict::Audit)) {
                    w.denies += calls;
                    w.deny_samples.push(dest);
                }
                // Only what actually went out teaches or alerts.
                if matches!(ev.verdict, Some(Verdict::Allow | Verdict::Audit)) {
                    self.see(cfg, dest);
                }
            }
            // A connection's bytes while open (summaries) and at close.
            EventType::TcpClosed | EventType::Flow if sent > 0 => {
                self.window.bytes = self.window.bytes.saturating_add(sent);
                self.window.byte_samples.push(key(ip));
            }
            _ => {}
        }
    }

    /// A destination used: learnt during warm-up, a candidate after it.
    fn see(&mut self, cfg: &AnomalyConfig, dest: DestKey) {
        if self.known.contains(&dest) {
            return;
        }
        if self.warm(cfg) {
            self.window.new_dests.insert(dest);
        } else {
            self.known.insert(dest);
        }
    }
}
