//! What the self-check (`kernel::drift`) found, for the metrics and
//! `bulkhead status`. The engine runs the check and the repair.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex, PoisonError,
};

use serde_json::{json, Value};

use crate::kernel::drift::{Kind, Report};

/// How many kinds of difference there are.
const KINDS: usize = Kind::ALL.len();

#[derive(Debug, Default)]
pub struct DriftStats {
    /// Checks run, and checks that could not read a map.
    pub checks: AtomicU64,
    pub check_errors: AtomicU64,
    /// Differences left after the last check (and its repair), by kind.
    pub current: [AtomicU64; KINDS],
    /// Differences found since start, by kind.
    pub found: [AtomicU64; KINDS],
    /// Repairs (re-applying the policy in force) that worked and failed.
    pub repairs: AtomicU64,
    pub repair_failures: AtomicU64,
    /// Map entries the last check read, and how long it took.
    pub last_entries: AtomicU64,
    pub last_micros: AtomicU64,
    last: Mutex<Last>,
}

/// For status: the last check, and the last one that found something.
#[derive(Debug, Default, Clone)]
struct Last {
    trigger: String,
    found: Option<Found>,
    error: Option<String>,
}

#[derive(Debug, Clone)]
struct Found {
    trigger: String,
    differences: u64,
    summary: String,
    first: Vec<String>,
    repaired: Option<bool>,
}

impl DriftStats {
    /// Records a check: `report` is what it found; `after` what was left
    /// once repaired (None when nothing needed repair).
    pub fn record(&self, trigger: &str, report: &Report, repair: Option<(bool, &Report)>) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.last_entries
            .store(report.entries_read, Ordering::Relaxed);
        self.last_micros.store(
            u64::try_from(report.elapsed.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        for (i, n) in report.counts.iter().enumerate() {
            self.found[i].fetch_add(*n, Ordering::Relaxed);
        }
        let left = repair.map_or(report, |(_, after)| after);
        for (i, n) in left.counts.iter().enumerate() {
            self.current[i].store(*n, Ordering::Relaxed);
        }
        if let Some((ok, _)) = repair {
            let counter = if ok {
                &self.repairs
            } else {
                &self.repair_failures
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.trigger = trigger.to_string();
        last.error = None;
        if report.total() > 0 {
            last.found = Some(Found {
                trigger: trigger.to_string(),
                differences: report.total(),
                summary: report.summary(),
                first: report.first.clone(),
                repaired: repair.map(|(ok, after)| ok && after.total() == 0),
            });
        }
    }

    /// A check that could not read the maps.
    pub fn record_error(&self, trigger: &str, error: &str) {
        self.check_errors.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.trigger = trigger.to_string();
        last.error = Some(error.to_string());
    }

    /// Differences left after the last check.
    #[must_use]
    pub fn current_total(&self) -> u64 {
        self.current.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The `self_check` object of `bulkhead status`.
    #[must_use]
    pub fn status(&self, interval_secs: u64) -> Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let by_kind: serde_json::Map<String, Value> = Kind::ALL
            .iter()
            .zip(&self.current)
            .filter(|(_, n)| load(n) > 0)
            .map(|(k, n)| (k.as_str().to_string(), json!(load(n))))
            .collect();
        json!({
            "interval_secs": interval_secs,
            "checks": load(&self.checks),
            "check_errors": load(&self.check_errors),
            "last_trigger": last.trigger,
            "last_error": last.error,
            "last_entries_read": load(&self.last_entries),
            "last_duration_us": load(&self.last_micros),
            "drift": self.current_total(),
            "drift_by_kind": by_kind,
            "found_total": self.found.iter().map(load).sum::<u64>(),
            "repairs": load(&self.repairs),
            "repair_failures": load(&self.repair_failures),
            "last_found": last.found.map(|f| json!({
                "trigger": f.trigger,
                "differences": f.differences,
                "kinds": f.summary,
                "first": f.first,
                "repaired": f.repaired,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(missing: u64, stale: u64) -> Report {
        let mut r = Report::default();
        r.counts[0] = missing;
        r.counts[6] = stale;
        r
    }

    #[test]
    fn status_shows_what_is_left_and_what_was_found() {
        let stats = DriftStats::default();
        stats.record("start", &report(0, 0), None);
        let st = stats.status(60);
        assert_eq!(
            (st["drift"].clone(), st["last_found"].clone()),
            (json!(0), Value::Null)
        );

        // Found two kinds, repaired: nothing left, the finding kept.
        stats.record("periodic", &report(1, 2), Some((true, &report(0, 0))));
        let st = stats.status(60);
        assert_eq!(st["drift"], 0);
        assert_eq!(st["found_total"], 3);
        assert_eq!(st["repairs"], 1);
        assert_eq!(
            st["last_found"]["kinds"],
            "service_missing=1 prefix_stale=2"
        );
        assert_eq!(st["last_found"]["repaired"], true);

        // A repair that left something: the gauge says so.
        stats.record("periodic", &report(0, 2), Some((true, &report(0, 1))));
        let st = stats.status(60);
        assert_eq!(st["drift"], 1);
        assert_eq!(st["drift_by_kind"], json!({"prefix_stale": 1}));
        assert_eq!(st["last_found"]["repaired"], false);
    }
}
