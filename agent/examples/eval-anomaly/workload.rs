//! The synthetic workload: services with a steady, daily-varying background
//! (fixed destinations, noisy rates and transfer sizes, a few stray denials),
//! and injected attacks at known times.

use std::net::{IpAddr, Ipv4Addr};

use super::rng::Rng;
use bulkhead::{
    anomaly::Kind,
    events::{Direction, EventType, FlowEvent, Verdict, SCHEMA},
};

pub struct Profile {
    pub name: &'static str,
    /// Mean outbound connections per minute.
    pub rate: f64,
    /// Mean bytes sent per connection.
    pub bytes: f64,
    pub dests: Vec<(IpAddr, u16)>,
}

fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[must_use]
pub fn profiles() -> Vec<Profile> {
    let p = |name, rate, bytes, dests| Profile {
        name,
        rate,
        bytes,
        dests,
    };
    vec![
        p(
            "web",
            40.0,
            20e3,
            (1..=5)
                .map(|h| (ip(10, 0, 1, h), 8080))
                .chain([(ip(192, 0, 2, 10), 443)])
                .collect(),
        ),
        p(
            "api",
            80.0,
            5e3,
            vec![
                (ip(10, 0, 2, 1), 5432),
                (ip(10, 0, 2, 2), 6379),
                (ip(10, 0, 2, 3), 9092),
            ],
        ),
        p(
            "db",
            10.0,
            1e6,
            vec![
                (ip(10, 0, 3, 1), 5432),
                (ip(10, 0, 3, 2), 5432),
                (ip(198, 51, 100, 20), 443),
            ],
        ),
        p(
            "billing",
            20.0,
            10e3,
            vec![(ip(198, 51, 100, 30), 443), (ip(10, 0, 2, 1), 5432)],
        ),
        p(
            "worker",
            30.0,
            50e3,
            vec![
                (ip(10, 0, 4, 1), 5672),
                (ip(10, 0, 4, 2), 5672),
                (ip(192, 0, 2, 40), 443),
            ],
        ),
        p(
            "cache",
            60.0,
            2e3,
            vec![(ip(10, 0, 2, 2), 6379), (ip(10, 0, 2, 4), 6379)],
        ),
    ]
}

/// One injected attack.
pub struct Case {
    pub name: &'static str,
    pub service: &'static str,
    /// Which detector must see it.
    pub expect: Kind,
    /// First interval (index) of the attack, and how many it lasts.
    pub start: u64,
    pub intervals: u64,
    /// The second of its first interval at which it starts.
    pub at_s: u64,
}

/// Two rounds of every attack, on different services, after warm-up.
#[must_use]
pub fn cases() -> Vec<Case> {
    let c = |name, service, expect, (start, at_s), intervals| Case {
        name,
        service,
        expect,
        start,
        intervals,
        at_s,
    };
    vec![
        c("port scan", "web", Kind::FanOut, (240, 20), 2),
        c("exfiltration", "db", Kind::VolumeSpike, (360, 35), 3),
        c(
            "new destination",
            "billing",
            Kind::NewDestination,
            (480, 10),
            1,
        ),
        c(
            "lateral movement",
            "worker",
            Kind::NewDestination,
            (600, 45),
            2,
        ),
        c("deny probing", "cache", Kind::DenyBurst, (720, 5), 2),
        c("connection flood", "api", Kind::RateSpike, (840, 30), 2),
        c("host sweep", "worker", Kind::FanOut, (960, 50), 1),
        c("exfiltration", "billing", Kind::VolumeSpike, (1080, 15), 2),
        c("new destination", "db", Kind::NewDestination, (1140, 40), 1),
        c(
            "lateral movement",
            "api",
            Kind::NewDestination,
            (1200, 25),
            1,
        ),
        c("deny probing", "web", Kind::DenyBurst, (1260, 55), 1),
        c("connection flood", "cache", Kind::RateSpike, (1320, 0), 1),
    ]
}

fn event(service: &str, kind: EventType, dst: (IpAddr, u16), verdict: Verdict) -> FlowEvent {
    FlowEvent {
        schema: SCHEMA.into(),
        kind,
        time: String::new(),
        host: "".into(),
        ktime_ns: 0,
        service: Some(service.into()),
        mode: Some("enforce".into()),
        cgroup_id: 0,
        pid: 0,
        tid: 0,
        uid: 0,
        gid: 0,
        comm: String::new(),
        exe: None,
        exe_file: None,
        traffic_direction: Some(Direction::Egress),
        hook: if kind == EventType::Verdict {
            "connect"
        } else {
            "sock_ops"
        }
        .into(),
        protocol: Some("tcp".into()),
        src_ip: None,
        src_port: None,
        dst_ip: Some(dst.0),
        dst_port: Some(dst.1),
        dst_name: None,
        verdict: (kind == EventType::Verdict).then_some(verdict),
        rule: None,
        suppressed: None,
        calls: (kind == EventType::Verdict).then_some(1),
        socket_cookie: 0,
        bytes_sent: None,
        bytes_received: None,
        duration_ns: None,
        change: None,
        anomaly: None,
        bytes_base: None,
        bytes_unsummarised: None,
    }
}

/// One connect decision of `service` to `dst`.
fn decision(out: &mut Vec<FlowEvent>, service: &str, dst: (IpAddr, u16), verdict: Verdict) {
    out.push(event(service, EventType::Verdict, dst, verdict));
}

/// An allowed connection and its close with `bytes` sent.
fn connection(out: &mut Vec<FlowEvent>, service: &str, dst: (IpAddr, u16), bytes: u64) {
    decision(out, service, dst, Verdict::Allow);
    out.push(FlowEvent {
        bytes_sent: Some(bytes),
        ..event(service, EventType::TcpClosed, dst, Verdict::Allow)
    });
}

/// Background traffic of `p` in interval `i` (of a minute).
#[expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "synthetic sizes"
)]
pub fn background(rng: &mut Rng, p: &Profile, i: u64, out: &mut Vec<FlowEvent>) {
    let day = (i as f64 / 1440.0) * std::f64::consts::TAU;
    let n = rng.count(p.rate * (1.0 + 0.4 * day.sin()));
    for _ in 0..n {
        let dst = p.dests[rng.below(p.dests.len())];
        let bytes = (p.bytes * (0.5 * rng.gauss()).exp()) as u64;
        connection(out, p.name, dst, bytes);
    }
    // Stray denials: a misconfigured retry now and then.
    if rng.unit() < 0.05 {
        for _ in 0..=rng.below(3) {
            decision(out, p.name, (ip(10, 0, 9, 1), 25), Verdict::Deny);
        }
    }
}

/// The attack of `c` in one of its intervals.
#[expect(clippy::cast_possible_truncation, reason = "small counts")]
pub fn attack(rng: &mut Rng, c: &Case, p: &Profile, out: &mut Vec<FlowEvent>) {
    let s = c.service;
    match c.expect {
        Kind::FanOut if c.name == "host sweep" => {
            for h in 1..=120u8 {
                decision(out, s, (ip(10, 0, 7, h), 22), Verdict::Allow);
            }
        }
        Kind::FanOut => {
            for port in 1..=300u16 {
                decision(out, s, (ip(10, 0, 9, 9), port), Verdict::Allow);
            }
        }
        Kind::VolumeSpike => {
            let dst = p.dests[0];
            connection(out, s, dst, 400_000_000 + rng.below(100_000_000) as u64);
        }
        Kind::NewDestination if c.name == "lateral movement" => {
            for h in 1..=12u8 {
                connection(out, s, (ip(10, 0, 5, h), 22), 3_000);
            }
        }
        Kind::NewDestination => {
            for _ in 0..3 {
                connection(out, s, (ip(203, 0, 113, 50), 8443), 40_000);
            }
        }
        Kind::DenyBurst => {
            for k in 0..40u16 {
                decision(out, s, (ip(10, 0, 2, 9), 1000 + k % 8), Verdict::Deny);
            }
        }
        Kind::RateSpike => {
            for _ in 0..(p.rate as usize * 15) {
                let dst = p.dests[rng.below(p.dests.len())];
                connection(out, s, dst, p.bytes as u64 / 10);
            }
        }
    }
}
