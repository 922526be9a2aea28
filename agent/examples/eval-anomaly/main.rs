//! The seeded evaluation behind `cargo xtask eval-anomaly`: a synthetic day
//! of traffic for several services with injected attacks, replayed through
//! the detectors (default config, one-minute intervals) on a simulated
//! clock; precision, recall and false alarms per hour, per detector.
//!
//! A development tool, not part of the shipped `bulkhead` binary: it uses
//! the detectors through the library. Run it with `cargo xtask
//! eval-anomaly` (or `cargo run --release -p agent --example eval-anomaly
//! -- --seed 7`); `cargo test -p agent` runs its test.

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

/// Started anomalies: (interval index, service, kind).
type Detections = Vec<(u64, String, Kind)>;

fn replay(seed: u64, inject: bool) -> (Detections, AnomalyConfig) {
    let cfg = AnomalyConfig::default();
    let mut d = Detector::new(cfg.clone());
    let mut rng = Rng::new(seed);
    let profiles = profiles();
    let cases = if inject { cases() } else { Vec::new() };
    let mut found = Vec::new();
    let mut batch = Vec::new();
    for i in 0..INTERVALS {
        for p in &profiles {
            background(&mut rng, p, i, &mut batch);
            for c in cases.iter().filter(|c| c.service == p.name && active(c, i)) {
                attack(&mut rng, c, p, &mut batch);
            }
        }
        for ev in batch.drain(..) {
            d.observe(&ev);
        }
        for a in d.tick(T0 + (i + 1) * cfg.interval_s) {
            if a.emit == Emit::Started {
                found.push((i, a.service, a.finding.kind));
            }
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
            if found
                .iter()
                .any(|(i, svc, k)| k == kind && matches(c, svc, *i))
            {
                s.recalled += 1;
            } else {
                missed.push(format!("{} on {} ({})", c.name, c.service, kind.as_str()));
            }
        }
        for (i, svc, _) in found.iter().filter(|(_, _, k)| k == kind) {
            s.detections += 1;
            if cases.iter().any(|c| matches(c, svc, *i)) {
                s.true_detections += 1;
            } else {
                s.false_alarms += 1;
            }
        }
        s.clean_false_alarms = clean.iter().filter(|(_, _, k)| k == kind).count();
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
            "Seed {}; {} services, one simulated day of one-minute intervals, default `[anomaly]` config; {:.1} service-hours of normal traffic after warm-up.\n",
            self.seed,
            profiles().len(),
            self.normal_hours
        );
        out.push_str("| kind | injected cases | recall | detections | precision | false alarms | false alarms / hour (normal traffic) | false alarms, clean run |\n");
        out.push_str("|---|---|---|---|---|---|---|---|\n");
        for (k, s) in &self.scores {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {} |",
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
    }
}
