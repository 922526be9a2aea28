//! Detector tests on a controllable clock: every tick passes its own time.
//! `early`: the threshold detectors' mid-interval reports.

mod early;

use std::net::IpAddr;

use super::{
    config::AnomalyConfig, detector::Detector, event::to_event, finding::Kind, group::Emit, state,
};
use crate::events::{EventType, FlowEvent, Verdict};

const T0: u64 = 1_800_000_000;
const SVC: &str = "billing";

fn event(kind: EventType, dst: &str, port: u16) -> FlowEvent {
    FlowEvent {
        kind,
        service: Some(SVC.into()),
        hook: if kind == EventType::Verdict {
            "connect"
        } else {
            "sock_ops"
        }
        .into(),
        dst_ip: dst.parse::<IpAddr>().ok(),
        dst_port: Some(port),
        verdict: (kind == EventType::Verdict).then_some(Verdict::Allow),
        rule: None,
        ..crate::events::sample_verdict()
    }
}

fn connect(dst: &str, port: u16) -> FlowEvent {
    event(EventType::Verdict, dst, port)
}

fn denied(dst: &str, port: u16) -> FlowEvent {
    FlowEvent {
        verdict: Some(Verdict::Deny),
        ..connect(dst, port)
    }
}

fn closed(dst: &str, port: u16, bytes: u64) -> FlowEvent {
    FlowEvent {
        bytes_sent: Some(bytes),
        ..event(EventType::TcpClosed, dst, port)
    }
}

/// Short intervals and warm-up; only `only` enabled.
fn config(only: Kind) -> AnomalyConfig {
    let mut c = AnomalyConfig {
        interval_s: 10,
        warmup_intervals: 3,
        update_every: 3,
        quiet_intervals: 2,
        ..AnomalyConfig::default()
    };
    c.rate_spike.enabled = only == Kind::RateSpike;
    c.new_destination.enabled = only == Kind::NewDestination;
    c.fan_out.enabled = only == Kind::FanOut;
    c.deny_burst.enabled = only == Kind::DenyBurst;
    c.volume_spike.enabled = only == Kind::VolumeSpike;
    c
}

/// A detector and its clock.
struct Clock {
    d: Detector,
    now: u64,
}

impl Clock {
    fn new(cfg: AnomalyConfig) -> Self {
        Self {
            d: Detector::new(cfg),
            now: T0,
        }
    }

    /// One interval with `events`, then the tick.
    fn interval(&mut self, events: &[FlowEvent]) -> Vec<super::Anomaly> {
        for e in events {
            self.d.observe(e);
        }
        self.now += self.d.config().interval_s;
        self.d.tick(self.now)
    }

    /// Counts `events`, then checks `at` seconds into the interval.
    fn check_at(&mut self, at: u64, events: &[FlowEvent]) -> Vec<super::Anomaly> {
        for e in events {
            self.d.observe(e);
        }
        self.d.check(self.now + at)
    }

    fn quiet_intervals(&mut self, n: usize, events: &[FlowEvent]) {
        for _ in 0..n {
            assert_eq!(
                self.interval(events),
                vec![],
                "no anomaly in normal traffic"
            );
        }
    }
}

fn times(ev: &FlowEvent, n: usize) -> Vec<FlowEvent> {
    vec![ev.clone(); n]
}

/// A fresh detector warmed on `normal`, then one interval of `test`.
fn after_warmup(only: Kind, normal: &[FlowEvent], test: &[FlowEvent]) -> Vec<super::Anomaly> {
    let mut c = Clock::new(config(only));
    c.quiet_intervals(5, normal);
    c.interval(test)
}

#[test]
fn rate_spike_at_exactly_factor_times_baseline_after_warmup() {
    let mut c = Clock::new(config(Kind::RateSpike));
    // During warm-up even a spike is only learnt.
    assert_eq!(c.interval(&times(&connect("192.0.2.1", 443), 500)), vec![]);
    let normal = times(&connect("192.0.2.1", 443), 20);
    // Baseline 20: 199 is below 10x, 200 is exactly 10x.
    let spike = |n| {
        after_warmup(
            Kind::RateSpike,
            &normal,
            &times(&connect("192.0.2.1", 443), n),
        )
    };
    assert_eq!(spike(199), vec![]);
    let got = spike(200);
    assert_eq!(got.len(), 1, "{got:?}");
    let a = &got[0];
    assert_eq!(a.finding.kind, Kind::RateSpike);
    assert!((a.finding.baseline - 20.0).abs() < 1e-9);
    assert!((a.finding.observed - 200.0).abs() < 1e-9);
    assert_eq!(a.finding.samples, vec!["192.0.2.1:443/tcp".to_string()]);
    assert_eq!(a.emit, Emit::Started);
}

#[test]
fn rate_spike_needs_the_minimum_rate() {
    let mut c = Clock::new(config(Kind::RateSpike));
    c.quiet_intervals(5, &times(&connect("192.0.2.1", 443), 1));
    // 1 -> 99 is 99x, but below min_count (100).
    assert_eq!(c.interval(&times(&connect("192.0.2.1", 443), 99)), vec![]);
    assert_eq!(c.interval(&times(&connect("192.0.2.1", 443), 100)).len(), 1);
}

#[test]
fn new_destination_only_after_warmup_and_once() {
    let mut c = Clock::new(config(Kind::NewDestination));
    let known = [connect("192.0.2.1", 443)];
    c.quiet_intervals(3, &known);
    let got = c.interval(&[connect("192.0.2.1", 443), connect("203.0.113.9", 22)]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::NewDestination);
    assert_eq!(
        got[0].finding.samples,
        vec!["203.0.113.9:22/tcp".to_string()]
    );
    assert!((got[0].finding.observed - 1.0).abs() < 1e-9);
    // Known from now on: no new finding (and the group calms down).
    c.quiet_intervals(3, &[connect("203.0.113.9", 22)]);
    // A denied attempt to a new destination is not "talking to" it.
    c.quiet_intervals(1, &[denied("198.51.100.1", 25)]);
}

#[test]
fn new_destination_by_cidr_group() {
    let mut cfg = config(Kind::NewDestination);
    cfg.new_destination.ipv4_prefix = 24;
    let mut c = Clock::new(cfg);
    c.quiet_intervals(3, &[connect("192.0.2.1", 443)]);
    c.quiet_intervals(1, &[connect("192.0.2.200", 443)]);
    let got = c.interval(&[connect("192.0.2.1", 8443)]);
    assert_eq!(
        got[0].finding.samples,
        vec!["192.0.2.0/24:8443/tcp".to_string()]
    );
}

#[test]
fn fan_out_above_distinct_ports_or_hosts_without_warmup() {
    let mut c = Clock::new(config(Kind::FanOut));
    // 25 ports is the limit, not above it.
    let scan: Vec<_> = (1..=25).map(|p| connect("192.0.2.7", p)).collect();
    assert_eq!(c.interval(&scan), vec![]);
    let scan: Vec<_> = (1..=26).map(|p| connect("192.0.2.7", p)).collect();
    let got = c.interval(&scan);
    assert_eq!(got.len(), 1);
    assert!((got[0].finding.observed - 26.0).abs() < 1e-9);
    assert!((got[0].finding.baseline - 25.0).abs() < 1e-9);
    assert_eq!(got[0].finding.samples.len(), 5);
    let mut c = Clock::new(config(Kind::FanOut));
    let sweep: Vec<_> = (1..=51)
        .map(|h| connect(&format!("198.51.100.{h}"), 22))
        .collect();
    let got = c.interval(&sweep);
    assert!(
        (got[0].finding.observed - 51.0).abs() < 1e-9,
        "hosts: {got:?}"
    );
}

#[test]
fn deny_burst_at_threshold() {
    let mut c = Clock::new(config(Kind::DenyBurst));
    assert_eq!(c.interval(&times(&denied("192.0.2.5", 5432), 19)), vec![]);
    let got = c.interval(&times(&denied("192.0.2.5", 5432), 20));
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].finding.samples,
        vec!["192.0.2.5:5432/tcp".to_string()]
    );
}

/// A summary of flows whose first record the rate limit held back names
/// no destination (`dst_ip` null): its calls are still denials. With 10 of
/// them, 10 records reach the threshold of 20; with 9, not.
#[test]
fn deny_burst_counts_the_calls_of_held_back_flows() {
    let mut c = Clock::new(config(Kind::DenyBurst));
    let held = |calls| FlowEvent {
        kind: EventType::Flow,
        dst_ip: None,
        dst_port: None,
        calls: Some(calls),
        suppressed: Some(4),
        ..denied("192.0.2.5", 5432)
    };
    let mut events = times(&denied("192.0.2.5", 5432), 10);
    events.push(held(9));
    assert_eq!(c.interval(&events), vec![], "19 denials");
    events.pop();
    events.push(held(10));
    let got = c.interval(&events);
    assert_eq!(got.len(), 1, "20 denials: {got:?}");
    assert_eq!(got[0].finding.kind, Kind::DenyBurst);
    assert!((got[0].finding.observed - 20.0).abs() < 1e-9, "{got:?}");
    assert_eq!(
        got[0].finding.samples,
        vec!["192.0.2.5:5432/tcp".to_string()]
    );
}

#[test]
fn volume_spike_against_baseline() {
    let normal = [closed("192.0.2.1", 443, 2_000_000)];
    let spike = |n| after_warmup(Kind::VolumeSpike, &normal, &[closed("192.0.2.1", 443, n)]);
    assert_eq!(spike(19_999_999), vec![]);
    let got = spike(20_000_000);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::VolumeSpike);
    assert_eq!(
        got[0].finding.samples,
        vec!["192.0.2.1:443/tcp".to_string()]
    );
}

/// A byte summary of an open TCP connection (one interval's bytes).
fn summary(dst: &str, port: u16, cookie: u64, bytes: u64) -> FlowEvent {
    FlowEvent {
        bytes_sent: Some(bytes),
        socket_cookie: cookie,
        ..event(EventType::Flow, dst, port)
    }
}

#[test]
fn volume_spike_while_the_connection_stays_open() {
    // A pooled connection that never closes: 2 MB an interval, then 20 MB.
    let normal = [summary("192.0.2.1", 5432, 7, 2_000_000)];
    let got = after_warmup(
        Kind::VolumeSpike,
        &normal,
        &[summary("192.0.2.1", 5432, 7, 20_000_000)],
    );
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::VolumeSpike);
    // Its close carries the total: only what no summary counted is added
    // (counted again, the 61 MB total would be a spike over 5 MB). The
    // stage of flows::tcp marks that part on the close.
    let normal = [summary("192.0.2.1", 5432, 7, 5_000_000)];
    let mut c = Clock::new(config(Kind::VolumeSpike));
    c.quiet_intervals(12, &normal);
    let total = 12 * 5_000_000 + 1_000_000;
    let closing = FlowEvent {
        socket_cookie: 7,
        bytes_unsummarised: Some((1_000_000, 0)),
        ..closed("192.0.2.1", 5432, total)
    };
    assert_eq!(c.interval(&[closing]), vec![], "1 MB is no spike");
}

#[test]
fn grouping_one_start_then_updates_every_n() {
    let mut c = Clock::new(config(Kind::DenyBurst));
    let burst = times(&denied("192.0.2.5", 5432), 30);
    let mut emitted = Vec::new();
    for _ in 0..7 {
        emitted.extend(c.interval(&burst).into_iter().map(|a| (a.emit, a.count)));
    }
    // update_every = 3: started at 1, updates at 4 and 7.
    assert_eq!(
        emitted,
        vec![(Emit::Started, 1), (Emit::Ongoing, 4), (Emit::Ongoing, 7)]
    );
    c.quiet_intervals(2, &[]);
    assert_eq!(c.interval(&burst)[0].emit, Emit::Started, "a new group");
}

#[test]
fn disabled_detectors_say_nothing_and_anomaly_events_are_ignored() {
    let mut cfg = config(Kind::DenyBurst);
    cfg.deny_burst.enabled = false;
    let mut c = Clock::new(cfg);
    c.quiet_intervals(2, &times(&denied("192.0.2.5", 1), 100));
    let a = FlowEvent {
        kind: EventType::Anomaly,
        ..denied("192.0.2.5", 1)
    };
    c.d.observe(&a);
    assert!(c.d.services.values().all(|s| s.window.conns == 0));
}

#[test]
fn baselines_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Clock::new(config(Kind::NewDestination));
    c.quiet_intervals(3, &[connect("192.0.2.1", 443)]);
    state::save(dir.path(), &c.d).expect("save");
    let mut again = Clock::new(config(Kind::NewDestination));
    again
        .d
        .restore(state::load(dir.path()).expect("load").expect("saved"));
    // Warm at once, and the known destination is still known.
    again.quiet_intervals(1, &[connect("192.0.2.1", 443)]);
    assert_eq!(again.interval(&[connect("192.0.2.2", 443)]).len(), 1);
}

#[test]
fn event_has_the_documented_shape() {
    let mut c = Clock::new(config(Kind::DenyBurst));
    let got = c.interval(&times(&denied("192.0.2.5", 5432), 80));
    let v = serde_json::to_value(to_event(&got[0])).expect("json");
    assert_eq!(v["type"], "anomaly");
    assert_eq!(v["service"], SVC);
    let a = &v["anomaly"];
    assert_eq!(a["kind"], "deny_burst");
    assert_eq!(a["severity"], "high");
    assert_eq!(a["state"], "started");
    assert_eq!(a["count"], 1);
    assert_eq!(a["evidence"]["observed"], 80.0);
    assert_eq!(a["evidence"]["baseline"], 20.0);
    assert_eq!(a["evidence"]["window_s"], 10);
    assert_eq!(
        a["evidence"]["sample_destinations"][0],
        "192.0.2.5:5432/tcp"
    );
    assert_eq!(a["first_seen"], "2027-01-15T08:00:10Z");
}
