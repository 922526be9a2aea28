//! The seeded evaluation behind `cargo xtask eval-anomaly`: a synthetic day
//! of traffic for several services with injected attacks, replayed through
//! the detectors (default config, one-minute intervals) on a simulated
//! clock, checked every second as the daemon does; precision, recall, false
//! alarms per hour and time to detect, per detector.
//!
//! A development tool, not part of the shipped `bulkhead` binary: it uses
//! the detectors through the library. Run it with `cargo xtask
//! eval-anomaly` (or `cargo run --release -p agent --example eval-anomaly
//! -- --seed 7`); `cargo test -p agent` runs its test.

mod clock;
mod rng;
mod workload;

use std::fmt::Write as _;

use bulkhead::anomaly::{AnomalyConfig, Detector, Emit, Kind};
use clap::Parser;
use rng::Rng;
use workload::{attack, background, cases, profiles, Case};

/// Simulated minutes (one day).
const INTERVALS: u64 = 1440;
const T0: u64 = 1_800_000_000;

/// Seeds the event times apart from the traffic: the same seed gives the
/// same traffic as before times were drawn.
const TIMING_SEED: u64 = 0x7469_6d65;

/// A started anomaly: the interval (index) and second (since `T0`) it was
/// reported in, its service and kind.
struct Detection {
    interval: u64,
    at_s: u64,
    service: String,
    kind: Kind,
}

fn replay(seed: u64, inject: bool) -> (Vec<Detection>, AnomalyConfig) {
    let cfg = AnomalyConfig::default();
    let len = cfg.interval_s;
    let mut d = Detector::new(cfg.clone());
    let mut rng = Rng::new(seed);
    let mut timing = Rng::new(seed ^ TIMING_SEED);
    let profiles = profiles();
    let cases = if inject { cases() } else { Vec::new() };
    let mut found = Vec::new();
    let mut events = Vec::new();
    let mut batch = clock::Timed::new();
    for i in 0..INTERVALS {
        for p in &profiles {
            background(&mut rng, p, i, &mut events);
            clock::scatter(&mut timing, len, &mut events, &mut batch);
            for c in cases.iter().filter(|c| c.service == p.name && active(c, i)) {
                attack(&mut rng, c, p, &mut events);
                let from = if i == c.start { c.at_s } else { 0 };
                clock::spread(from, len, &mut events, &mut batch);
            }
        }
        batch.sort_by_key(|(s, _)| *s);
        let mut due = batch.drain(..).peekable();
        // Second by second: the events of that second, then a check as
        // the daemon makes every second (at the last, the interval's end).
        for s in 0..len {
            while let Some((_, ev)) = due.next_if(|(t, _)| *t <= s) {
                d.observe(&ev);
            }
            let now = i * len + s + 1;
            let reported = if s + 1 == len {
                d.tick(T0 + now)
            } else {
                d.check(T0 + now)
            };
            found.extend(
                reported
                    .into_iter()
                    .filter(|a| a.emit == Emit::Started)
                    .map(|a| Detection {
                        interval: i,
                        at_s: now,
                        service: a.service,
                        kind: a.finding.kind,
                    }),
            );
        }
    }
    (found, cfg)
}

fn active(c: &Case, i: u64) -> bool {
    (c.start..c.start + c.intervals).contains(&i)
}

/// A detection belongs to a case on its service during the attack (or the
/// interval right after it).
fn matches(c: &Case, service: &str, i: u64) -> bool {
    c.service == service && (c.start..=c.start + c.intervals).contains(&i)
}

#[derive(Debug, Default, Clone)]
pub struct KindScore {
    pub cases: usize,
    pub recalled: usize,
    pub detections: usize,
    pub true_detections: usize,
    pub false_alarms: usize,
    pub clean_false_alarms: usize,
    /// Per recalled case: seconds from its first event to its report.
    pub time_to_detect: Vec<u64>,
}

pub struct Report {
    pub seed: u64,
    pub normal_hours: f64,
    pub scores: Vec<(Kind, KindScore)>,
    pub missed: Vec<String>,
}

/// Runs the evaluation twice: with injected attacks, and the same
/// background without them.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "hour counts")]
pub fn run(seed: u64) -> Report {
    let (found, cfg) = replay(seed, true);
    let (clean, _) = replay(seed, false);
    let cases = cases();
    let services = profiles().len() as u64;
    let attack_intervals: u64 = cases.iter().map(|c| c.intervals + 1).sum();
    let normal_intervals = services * (INTERVALS - cfg.warmup_intervals) - attack_intervals;
    let mut scores: Vec<(Kind, KindScore)> = Kind::ALL
        .iter()
        .map(|k| (*k, KindScore::default()))
        .collect();
    let mut missed = Vec::new();
    for (kind, s) in &mut scores {
        for c in cases.iter().filter(|c| c.expect == *kind) {
            s.cases += 1;
            // Its first report by the detector meant for it.
            let first = found
                .iter()
                .find(|f| f.kind == *kind && matches(c, &f.service, f.interval));
            if let Some(f) = first {
                s.recalled += 1;
                let started = c.start * cfg.interval_s + c.at_s;
                s.time_to_detect.push(f.at_s.saturating_sub(started));
            } else {
                missed.push(format!("{} on {} ({})", c.name, c.service, kind.as_str()));
            }
        }
        for f in found.iter().filter(|f| f.kind == *kind) {
            s.detections += 1;
            if cases.iter().any(|c| matches(c, &f.service, f.interval)) {
                s.true_detections += 1;
            } else {
                s.false_alarms += 1;
            }
        }
        s.clean_false_alarms = clean.iter().filter(|f| f.kind == *kind).count();
    }
    Report {
        seed,
        normal_hours: normal_intervals as f64 * cfg.interval_s as f64 / 3600.0,
        scores,
        missed,
    }
}

impl Report {
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "ratios")]
    pub fn markdown(&self) -> String {
        let ratio = |a: usize, b: usize| {
            if b == 0 {
                "n/a".to_string()
            } else {
                format!("{:.2}", a as f64 / b as f64)
            }
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Seed {}; {} services, one simulated day of one-minute intervals checked every second, default `[anomaly]` config; {:.1} service-hours of normal traffic after warm-up. Time to detect: seconds from an attack's first event to its report, median and worst of the cases detected.\n",
            self.seed,
            profiles().len(),
            self.normal_hours
        );
        out.push_str("| kind | injected cases | recall | detections | precision | false alarms | false alarms / hour (normal traffic) | false alarms, clean run | time to detect, median (s) | time to detect, worst (s) |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for (k, s) in &self.scores {
            let (median, worst) = clock::median_and_worst(&s.time_to_detect)
                .map_or(("n/a".to_string(), "n/a".to_string()), |(m, w)| {
                    (format!("{m:.1}"), w.to_string())
                });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {} | {median} | {worst} |",
                k.as_str(),
                s.cases,
                ratio(s.recalled, s.cases),
                s.detections,
                ratio(s.true_detections, s.detections),
                s.false_alarms,
                s.false_alarms as f64 / self.normal_hours,
                s.clean_false_alarms
            );
        }
        if self.missed.is_empty() {
            out.push_str("\nEvery injected case was detected by the detector meant for it.\n");
        } else {
            let _ = writeln!(out, "\nMissed: {}", self.missed.join(", "));
        }
        out
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "eval-anomaly",
    about = "Replay the seeded synthetic anomaly workload through the detectors and print the scores"
)]
struct EvalArgs {
    /// Seed of the synthetic workload.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Also write the report (Markdown) to this file.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Prints the report; fails if a case was missed or a false alarm raised.
fn main() -> std::process::ExitCode {
    let args = EvalArgs::parse();
    let report = run(args.seed);
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &args.out {
        if let Err(e) = write_report(path, &text) {
            eprintln!("eval-anomaly: cannot write {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    let clean = report
        .scores
        .iter()
        .all(|(_, s)| s.false_alarms + s.clean_false_alarms == 0);
    if report.missed.is_empty() && clean {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Replaces the generated part of `path` (between the markers) with `text`.
fn write_report(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    const BEGIN: &str = "<!-- eval-anomaly: begin -->";
    const END: &str = "<!-- eval-anomaly: end -->";
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{BEGIN}\n{text}{END}{}", &old[..b], &old[e + END.len()..])
        }
        _ => format!("{old}{BEGIN}\n{text}{END}\n"),
    };
    std::fs::write(path, new)
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_seed_same_report_and_goals_met() {
        let a = super::run(7);
        assert_eq!(a.markdown(), super::run(7).markdown());
        assert!(a.missed.is_empty(), "{}", a.markdown());
        for (k, s) in &a.scores {
            assert_eq!(
                s.false_alarms + s.clean_false_alarms,
                0,
                "{k:?}: {}",
                a.markdown()
            );
        }
        // The scans cross the fan-out limits within 4 s of starting; the
        // report must follow within a second, not at the interval's end.
        let fan_out = a
            .scores
            .iter()
            .find(|(k, _)| *k == bulkhead::anomaly::Kind::FanOut)
            .map(|(_, s)| s.time_to_detect.clone())
            .unwrap_or_default();
        assert!(
            !fan_out.is_empty() && fan_out.iter().all(|t| *t <= 5),
            "fan_out time to detect {fan_out:?}: {}",
            a.markdown()
        );
    }
}
