//! The per-service detectors as one value: `observe` every event, `check`
//! every second or so (the threshold detectors, `early`), `tick` at the end
//! of every interval, each with the time it is (a controllable clock: the
//! daemon passes the wall clock, tests and the evaluation their own).

use std::collections::HashMap;

use super::{
    config::AnomalyConfig,
    detect,
    finding::{Finding, Kind},
    group::{Emit, Group},
    service::ServiceState,
};
use crate::events::{EventType, FlowEvent};

/// One reported anomaly (a group's start or update).
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub service: String,
    pub finding: Finding,
    pub emit: Emit,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    pub count: u64,
    pub window_s: u64,
}

#[derive(Debug)]
pub struct Detector {
    pub(super) cfg: AnomalyConfig,
    alpha: f64,
    pub(super) services: HashMap<String, ServiceState, foldhash::fast::RandomState>,
    /// Events of services beyond `max_services` (not tracked).
    pub untracked: u64,
}

impl Detector {
    #[must_use]
    pub fn new(cfg: AnomalyConfig) -> Self {
        Self {
            alpha: cfg.alpha(),
            cfg,
            services: HashMap::default(),
            untracked: 0,
        }
    }

    #[must_use]
    pub fn config(&self) -> &AnomalyConfig {
        &self.cfg
    }

    /// Counts one event of a managed service (others are ignored). The hot
    /// path: a map lookup and a few counters; allocates only for a service
    /// seen for the first time and while its sets grow to their caps.
    pub fn observe(&mut self, ev: &FlowEvent) {
        if ev.kind == EventType::Anomaly {
            return;
        }
        let Some(name) = ev.service.as_deref() else {
            return;
        };
        // Bytes of a TCP connection, each counted once: while it is open
        // (its per-interval summaries) and at its close (the rest).
        let sent = ev.new_bytes().map_or(0, |(s, _)| s);
        if let Some(s) = self.services.get_mut(name) {
            s.observe(&self.cfg, ev, sent);
        } else if self.services.len() < self.cfg.max_services {
            let mut s = ServiceState::new(&self.cfg);
            s.observe(&self.cfg, ev, sent);
            self.services.insert(name.to_string(), s);
        } else {
            self.untracked += 1;
        }
    }

    /// Ends the interval at `now` (unix seconds): runs the detectors (but
    /// for the kinds `check` already reported in this interval), folds the
    /// window into the baselines, and returns what is to be reported.
    #[expect(clippy::cast_precision_loss, reason = "counts as EWMA input")]
    pub fn tick(&mut self, now: u64) -> Vec<Anomaly> {
        let cfg = &self.cfg;
        let mut out = Vec::new();
        for (name, s) in &mut self.services {
            let findings = detect::run(cfg, s);
            let spiked = |k: Kind| findings[k as usize].is_some();
            // An anomalous interval does not teach the baseline what is
            // normal (the spike would raise its own bar).
            if !spiked(Kind::RateSpike) {
                s.rate.update(s.window.conns as f64, self.alpha);
            }
            if !spiked(Kind::VolumeSpike) {
                s.volume.update(s.window.bytes as f64, self.alpha);
            }
            // Reported once: new destinations become known.
            let fresh: Vec<_> = s.window.new_dests.iter().copied().collect();
            for d in fresh {
                s.known.insert(d);
            }
            for (i, f) in findings.into_iter().enumerate() {
                let group = &mut s.groups[i];
                // Reported by an early check: that was this interval's
                // firing (the group counts intervals, not checks). Reported
                // again only if it grew worse since (a sweep crosses the
                // limit at `low` and may end the interval far past it).
                if let Some(early) = s.window.reported(Kind::ALL[i]) {
                    if let Some(finding) = f.filter(|f| f.severity > early) {
                        group.last_seen = now;
                        out.push(Anomaly {
                            service: name.clone(),
                            finding,
                            emit: Emit::Ongoing,
                            first_seen: group.first_seen,
                            last_seen: group.last_seen,
                            count: group.count,
                            window_s: cfg.interval_s,
                        });
                    }
                    continue;
                }
                match f {
                    Some(finding) => out.extend(report(cfg, name, group, finding, now)),
                    None => group.calm(cfg.quiet_intervals),
                }
            }
            s.intervals += 1;
            s.window.clear();
        }
        sort(&mut out);
        out
    }
}

/// `finding` fired for service `name` at `now`: what its group reports.
pub(super) fn report(
    cfg: &AnomalyConfig,
    name: &str,
    group: &mut Group,
    finding: Finding,
    now: u64,
) -> Option<Anomaly> {
    let emit = group.fire(now, cfg.update_every)?;
    Some(Anomaly {
        service: name.to_string(),
        finding,
        emit,
        first_seen: group.first_seen,
        last_seen: group.last_seen,
        count: group.count,
        window_s: cfg.interval_s,
    })
}

/// A stable order: by service, then kind.
pub(super) fn sort(out: &mut [Anomaly]) {
    out.sort_by(|a, b| (&a.service, a.finding.kind).cmp(&(&b.service, b.finding.kind)));
}
