//! Step 3: the main loop, until SIGTERM or SIGINT.

use tokio::time::{interval, sleep_until, Instant, Interval, MissedTickBehavior};
use tracing::{info, warn};

use super::Running;
use crate::{
    control::protocol::{Problem, ReloadAnswer, Request},
    engine::Engine,
    events::Hub,
    policy::PolicyError,
    policy_watch::PolicyWatch,
    reload::Refused,
    services::RESCAN_INTERVAL,
};

/// Quiet time after the last change in the policy directory before a reload.
const POLICY_SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

impl Running {
    /// Rescans, scans for held sockets, sweeps pinholes, self-checks,
    /// answers the control socket and reloads the policy (on a change in
    /// its directory, or SIGHUP) until SIGTERM or SIGINT.
    pub async fn run_until_signal(&mut self) {
        let mut rescan = every(RESCAN_INTERVAL);
        let mut held_scan = every(crate::held::SCAN_INTERVAL);
        let mut pinhole_sweep = every(crate::kernel::udp_peers::SWEEP_INTERVAL);
        // Its first tick is at once: the start-up check.
        let mut self_check = every(self.self_check_interval);
        let mut check_trigger = "start";
        // File changes come in bursts (editors write, rename, chmod): reload
        // once they have settled.
        let mut reload_at: Option<Instant> = None;
        let far = || Instant::now() + std::time::Duration::from_secs(3600);
        let engine = &mut self.engine;
        loop {
            tokio::select! {
                _ = rescan.tick() => {
                    engine.rescan();
                    self.watchdog.beat();
                }
                _ = held_scan.tick() => engine.scan_held_sockets(),
                _ = pinhole_sweep.tick() => engine.sweep_udp_peers(None),
                _ = self_check.tick() => {
                    engine.self_check(check_trigger);
                    check_trigger = "periodic";
                }
                Some(call) = self.admin.recv() => {
                    if matches!(call.request, Request::Reload(_)) {
                        // This reload reads the directory now: a change
                        // still settling is in it.
                        reload_at = None;
                        let answer = reload(engine, &self.hub, &mut self.policy_changes, "control");
                        // The client may have gone; nothing to do then.
                        let _ = call.reply.send(serde_json::to_value(answer).map_err(|e| e.to_string()));
                    } else {
                        engine.handle(call);
                    }
                }
                () = self.policy_changes.changed() => {
                    reload_at = Some(Instant::now() + POLICY_SETTLE);
                }
                _ = sleep_until(reload_at.unwrap_or_else(far)), if reload_at.is_some() => {
                    reload_at = None;
                    // A directory replaced (renamed over) is watched anew.
                    self.policy_changes.rearm();
                    // Its outcome is in the log, the audit event and the metrics.
                    let _ = engine.reload("inotify");
                    super::heap::give_back("reload");
                }
                _ = sleep_until(engine.retire_at().unwrap_or_else(far)), if engine.retire_at().is_some() => {
                    engine.retire();
                    super::heap::give_back("retire");
                }
                _ = self.signals.term.recv() => { info!("SIGTERM: stopping"); break; }
                _ = self.signals.int.recv() => { info!("SIGINT: stopping"); break; }
                _ = self.signals.hup.recv() => {
                    reload(engine, &self.hub, &mut self.policy_changes, "sighup");
                }
                // Log rotation: the file only, no reload, so a nightly
                // rotation is not a policy_change event.
                _ = self.signals.usr1.recv() => {
                    match self.hub.reopen_sink() {
                        Ok(()) => info!("SIGUSR1: decision log re-opened"),
                        Err(e) => warn!("SIGUSR1: cannot re-open the decision log: {e}"),
                    }
                }
            }
        }
    }
}

/// What SIGHUP and `bulkhead reload` (the control socket's `reload`) both
/// do: re-open the decision log (logrotate's `systemctl reload`), watch the
/// policy directory anew (it may have been replaced) and reload the policy.
fn reload(
    engine: &mut Engine,
    hub: &Hub,
    policy_changes: &mut PolicyWatch,
    trigger: &str,
) -> ReloadAnswer {
    let mut warnings = Vec::new();
    match hub.reopen_sink() {
        Ok(()) => info!(trigger, "decision log re-opened"),
        Err(e) => {
            warn!(trigger, "cannot re-open the decision log: {e}");
            warnings.push(Problem::unlocated(format!(
                "cannot re-open the decision log: {e}"
            )));
        }
    }
    policy_changes.rearm();
    let outcome = engine.reload(trigger);
    super::heap::give_back("reload");
    let problems = |errors: &[PolicyError]| errors.iter().map(Problem::from).collect();
    match outcome {
        Ok(accepted_with) => {
            warnings.extend(accepted_with.iter().map(Problem::from));
            ReloadAnswer {
                applied: true,
                errors: Vec::new(),
                warnings,
            }
        }
        Err(Refused::Policy(errors)) => ReloadAnswer {
            applied: false,
            errors: problems(&errors.0),
            warnings,
        },
        Err(Refused::Apply(e)) => ReloadAnswer {
            applied: false,
            errors: vec![Problem::unlocated(e)],
            warnings,
        },
    }
}

/// A timer whose first tick is at once, and which does not catch up on
/// ticks missed while the loop was busy.
fn every(period: std::time::Duration) -> Interval {
    let mut timer = interval(period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
}
