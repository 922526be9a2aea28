//! Early reports of the threshold detectors (fan-out, deny burst): their
//! limits are absolute, so once the window so far crosses one, the interval
//! is anomalous whatever comes next. Checked often (the daemon: every
//! second), a 400-port sweep is reported seconds after it crosses the limit
//! instead of at the interval's end. Rate and volume spikes compare a whole
//! interval with its baseline, so they stay at the end (`tick`).

use super::{
    detect,
    detector::{report, sort, Anomaly, Detector},
};

impl Detector {
    /// Reports each threshold anomaly the current interval has crossed so
    /// far, at most once per interval: the interval's end then skips that
    /// kind (the group rules count intervals, so an early report is that
    /// interval's firing). Cheap when nothing crosses: a few comparisons
    /// per service, nothing allocated.
    pub fn check(&mut self, now: u64) -> Vec<Anomaly> {
        let cfg = &self.cfg;
        let mut out = Vec::new();
        for (name, s) in &mut self.services {
            for kind in detect::EARLY {
                if s.window.reported(kind).is_some() {
                    continue;
                }
                let Some(finding) = detect::early(cfg, s, kind) else {
                    continue;
                };
                s.window.mark_reported(kind, finding.severity);
                out.extend(report(
                    cfg,
                    name,
                    &mut s.groups[kind as usize],
                    finding,
                    now,
                ));
            }
        }
        sort(&mut out);
        out
    }
}
