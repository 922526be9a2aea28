//! The running agent's policy engine: what is in force, and how it changes
//! (rescans of service cgroups, reloads), keeping the kernel maps, the
//! event decoder's names and the metrics inventory in step.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::{
    events::{Hub, Names},
    kernel::{CompiledPolicy, Enforcer},
    metrics::{Inventory, MetricsState},
    policy::PolicySet,
    reload::{self, PolicySource, ReloadStats, Snapshot},
    services::ServiceTracker,
};

/// How long a retired policy's prefixes stay after a switch: a verdict
/// that read the old service entry just before the switch may still be
/// looking them up (BPF programs run in well under a millisecond).
const RETIRE_GRACE: Duration = Duration::from_millis(500);

pub struct Engine {
    pub enforcer: Enforcer,
    pub tracker: ServiceTracker,
    pub names: watch::Sender<Arc<Names>>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<MetricsState>,
    pub map_capacities: Vec<(&'static str, u32)>,
    pub source: PolicySource,
    /// The policy in force, as written.
    pub set: PolicySet,
    pub snapshot: Snapshot,
    pub reloads: Arc<ReloadStats>,
    pub state_dir: std::path::PathBuf,
    /// The previous policy, to remove once its grace period is over.
    retiring: Option<(Instant, CompiledPolicy)>,
}

impl Engine {
    #[expect(clippy::too_many_arguments, reason = "assembled once, at start")]
    pub fn new(
        enforcer: Enforcer,
        tracker: ServiceTracker,
        names: watch::Sender<Arc<Names>>,
        hub: Arc<Hub>,
        metrics: Arc<MetricsState>,
        map_capacities: Vec<(&'static str, u32)>,
        source: PolicySource,
        loaded: (PolicySet, Snapshot),
        state_dir: std::path::PathBuf,
    ) -> Self {
        Self {
            enforcer,
            tracker,
            names,
            hub,
            metrics,
            map_capacities,
            source,
            set: loaded.0,
            snapshot: loaded.1,
            reloads: Arc::new(ReloadStats::default()),
            state_dir,
            retiring: None,
        }
    }

    /// Re-resolves service cgroups (new services, restarted units).
    pub fn rescan(&mut self) {
        let changes = self.tracker.rescan();
        if changes.is_empty() {
            return;
        }
        match self.enforcer.apply_service_changes(&changes) {
            Ok(()) => self.refresh_inventory(),
            Err(e) => warn!("cannot update the managed cgroups: {e}"),
        }
    }

    /// Reads the policy directory again and, if it is valid, switches to it
    /// atomically per service. On any problem the policy in force stays
    /// untouched; either way the outcome is an audit event.
    pub fn reload(&mut self, trigger: &str) {
        let result = self.try_reload(trigger);
        self.reloads.record(&result);
        if let Err(error) = result {
            warn!(
                trigger,
                "policy reload refused; the policy in force is unchanged:\n{error}"
            );
            let record = reload::change_record(
                "reload",
                trigger,
                (&self.snapshot, &self.set),
                None,
                Some(error),
            );
            self.hub.publish(vec![reload::audit_event(record)]);
        }
    }

    fn try_reload(&mut self, trigger: &str) -> Result<(), String> {
        if let Some((_, old)) = self.retiring.take() {
            // A reload right after a reload: finish the previous one first.
            std::thread::sleep(RETIRE_GRACE);
            self.enforcer.retire(&old).map_err(|e| e.to_string())?;
        }
        let loaded = reload::load(&self.source)?;
        for w in &loaded.warnings {
            warn!("INSECURE policy file accepted (--allow-insecure-policy-files): {w}");
        }
        let staged = self
            .enforcer
            .stage(loaded.compiled)
            .map_err(|e| e.to_string())?;
        let changes = self.tracker.reload(&staged);
        // Names first: events of the new policy may follow the switch at once.
        self.names
            .send_replace(Arc::new(Names::from_policy(&staged)));
        let old = self
            .enforcer
            .switch(staged, &changes)
            .map_err(|e| format!("switching to the new policy failed: {e}"))?;
        if let Some(old) = old {
            self.retiring = Some((Instant::now() + RETIRE_GRACE, old));
        }
        self.refresh_inventory();
        if let Some(live) = self.enforcer.live() {
            crate::daemon::save_names(&self.state_dir, &Names::from_policy(live));
        }
        let record = reload::change_record(
            "reload",
            trigger,
            (&self.snapshot, &self.set),
            Some((&loaded.snapshot, &loaded.set)),
            None,
        );
        info!(
            trigger,
            files = record.files.len(),
            services = record.services.len(),
            "policy reloaded"
        );
        self.hub.publish(vec![reload::audit_event(record)]);
        self.set = loaded.set;
        self.snapshot = loaded.snapshot;
        Ok(())
    }

    /// When the previous policy may be removed, if one is waiting.
    pub fn retire_at(&self) -> Option<Instant> {
        self.retiring.as_ref().map(|(at, _)| *at)
    }

    pub fn retire(&mut self) {
        if let Some((_, old)) = self.retiring.take() {
            if let Err(e) = self.enforcer.retire(&old) {
                warn!("cannot remove the previous policy's prefixes: {e}");
            }
        }
    }

    fn refresh_inventory(&self) {
        let Some(live) = self.enforcer.live() else {
            return;
        };
        let managed = self
            .tracker
            .services
            .iter()
            .filter(|s| s.cgroup_id.is_some());
        self.metrics.replace_inventory(Inventory::from_policy(
            live,
            managed.map(|s| s.entry.service_id),
            &self.map_capacities,
        ));
    }
}
