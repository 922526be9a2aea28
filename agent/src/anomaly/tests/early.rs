//! Early reports: a threshold crossed mid-interval is reported at the next
//! check, once per interval; the spike detectors wait for the interval end.

use super::{closed, config, connect, denied, times, Clock};
use crate::anomaly::{finding::Kind, group::Emit};

fn scan(ports: std::ops::RangeInclusive<u16>) -> Vec<crate::events::FlowEvent> {
    ports.map(|p| connect("192.0.2.7", p)).collect()
}

#[test]
fn fan_out_crossed_mid_interval_is_reported_at_the_next_check_once() {
    let mut c = Clock::new(config(Kind::FanOut));
    // The limit (25 ports) reached, not passed: nothing yet.
    assert_eq!(c.check_at(2, &scan(1..=25)), vec![]);
    let got = c.check_at(3, &scan(26..=26));
    assert_eq!(got.len(), 1, "{got:?}");
    let a = &got[0];
    assert_eq!((a.finding.kind, a.emit), (Kind::FanOut, Emit::Started));
    assert!((a.finding.observed - 26.0).abs() < 1e-9, "{a:?}");
    // Stamped at the check, not at the interval's end.
    assert_eq!((a.first_seen, a.last_seen), (c.now + 3, c.now + 3));
    let crossed = a.finding.severity;
    // The sweep goes on: later checks do not report it again; the end does
    // once, as an update, because it grew worse (400 ports against 25).
    assert_eq!(c.check_at(4, &scan(27..=400)), vec![]);
    let end = c.interval(&[]);
    assert_eq!(end.len(), 1, "{end:?}");
    assert_eq!(
        (end[0].finding.kind, end[0].emit),
        (Kind::FanOut, Emit::Ongoing)
    );
    assert!(end[0].finding.severity > crossed, "{end:?}");
    // Distinct ports are counted up to the window's cap (256).
    assert!(end[0].finding.observed >= 256.0, "{end:?}");
    assert_eq!(end[0].count, 1, "still one interval's firing");
}

#[test]
fn an_early_report_that_does_not_grow_worse_is_not_repeated_at_the_end() {
    let mut c = Clock::new(config(Kind::FanOut));
    let got = c.check_at(3, &scan(1..=26));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(c.check_at(4, &scan(27..=27)), vec![]);
    assert_eq!(c.interval(&[]), vec![], "same severity: already reported");
}

#[test]
fn an_early_report_is_its_intervals_firing_for_the_group_rules() {
    // update_every = 3, quiet_intervals = 2.
    let mut c = Clock::new(config(Kind::FanOut));
    let mut emitted = Vec::new();
    for _ in 0..4 {
        let early = c.check_at(1, &scan(1..=30));
        emitted.extend(early.iter().map(|a| (a.emit, a.count)));
        assert_eq!(c.interval(&[]), vec![]);
    }
    assert_eq!(emitted, vec![(Emit::Started, 1), (Emit::Ongoing, 4)]);
    // One quiet interval does not end the group (an early-reported one
    // did not count as quiet); two do.
    c.quiet_intervals(1, &[]);
    assert_eq!(
        c.check_at(1, &scan(1..=30)),
        vec![],
        "same group, no update due"
    );
    assert_eq!(c.interval(&[]), vec![]);
    c.quiet_intervals(2, &[]);
    let again = c.check_at(1, &scan(1..=30));
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].emit, again[0].count), (Emit::Started, 1));
}

#[test]
fn a_crossing_after_the_last_check_is_still_reported_at_the_end() {
    let mut c = Clock::new(config(Kind::FanOut));
    assert_eq!(c.check_at(5, &scan(1..=10)), vec![]);
    let got = c.interval(&scan(11..=40));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].first_seen, c.now, "at the interval's end");
}

#[test]
fn deny_burst_crossed_mid_interval_is_reported_at_the_next_check_once() {
    let mut c = Clock::new(config(Kind::DenyBurst));
    assert_eq!(
        c.check_at(1, &times(&denied("192.0.2.5", 5432), 19)),
        vec![]
    );
    let got = c.check_at(2, &times(&denied("192.0.2.5", 5432), 1));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::DenyBurst);
    assert_eq!(got[0].first_seen, c.now + 2);
    assert!((got[0].finding.observed - 20.0).abs() < 1e-9);
    assert_eq!(
        c.check_at(3, &times(&denied("192.0.2.5", 5432), 50)),
        vec![]
    );
    // 70 denials against 20: worse than when it crossed, so the end
    // reports it once more, as an update.
    let end = c.interval(&[]);
    assert_eq!(end.len(), 1, "{end:?}");
    assert_eq!(end[0].emit, Emit::Ongoing);
    assert!(end[0].finding.severity > got[0].finding.severity, "{end:?}");
    // A new interval under the same burst: in the group, no update due.
    assert_eq!(
        c.check_at(1, &times(&denied("192.0.2.5", 5432), 20)),
        vec![]
    );
}

#[test]
fn rate_and_volume_spikes_wait_for_the_interval_end() {
    let mut c = Clock::new(config(Kind::RateSpike));
    c.quiet_intervals(5, &times(&connect("192.0.2.1", 443), 20));
    // 10x the baseline is in the window, but only the whole interval is
    // compared with it.
    assert_eq!(
        c.check_at(5, &times(&connect("192.0.2.1", 443), 400)),
        vec![]
    );
    let got = c.interval(&[]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::RateSpike);

    let mut c = Clock::new(config(Kind::VolumeSpike));
    c.quiet_intervals(5, &[closed("192.0.2.1", 443, 2_000_000)]);
    assert_eq!(
        c.check_at(5, &[closed("192.0.2.1", 443, 50_000_000)]),
        vec![]
    );
    let got = c.interval(&[]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].finding.kind, Kind::VolumeSpike);
}
