//! The running agent's policy engine: what is in force, and how it changes
//! (rescans of service cgroups, reloads), keeping the kernel maps, the
//! event decoder's names and the metrics inventory in step.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};
use tracing::{debug, info, warn};

use serde_json::{json, Value};
use std::sync::atomic::Ordering;

use agent_common::FLAG_QUARANTINE;

use crate::{
    control::{protocol::Request, server::AdminCall},
    events::{ChangeRecord, Hub, Names, ServiceChange},
    fleet::host::HostView,
    held,
    kernel::{Change, CompiledPolicy, Enforcer},
    metrics::{Inventory, MetricsState},
    policy::{Mode, PolicyError, PolicySet},
    quarantine::{Exception, Quarantines},
    reload::{self, PolicySource, Refused, ReloadStats, Snapshot},
    services::ServiceTracker,
};

/// How long a retired policy's prefixes stay after a switch: a verdict
/// that read the old service entry just before the switch may still be
/// looking them up. A verdict takes microseconds; 50 ms is ample.
const RETIRE_GRACE: Duration = Duration::from_millis(50);

/// Everything the engine starts from, assembled once by the daemon's
/// start-up.
pub struct Parts {
    pub enforcer: Enforcer,
    pub tracker: ServiceTracker,
    /// Where the event decoder gets the names of each policy applied.
    pub names: watch::Sender<Arc<Names>>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<MetricsState>,
    /// The capacity of each policy map (see `metrics::map_capacities`).
    pub map_capacities: Vec<(&'static str, u32)>,
    pub source: PolicySource,
    /// The policy in force, as written, and the files it came from.
    pub set: PolicySet,
    pub snapshot: Snapshot,
    pub state_dir: std::path::PathBuf,
    /// The quarantines laid over the policy (from the state directory).
    pub quarantines: Quarantines,
    /// Where the current pins are (for status).
    pub pins: std::path::PathBuf,
    /// Which optional kernel parts are active (for status).
    pub coverage: crate::kernel::Coverage,
    /// The UDP pinholes' idle timeout (`[udp_replies]`).
    pub udp_reply_idle: Duration,
    /// How often the self-check runs (`[self_check]`), for status.
    pub self_check_interval: Duration,
    /// The service graph (blast radius, learn), fed by the aggregator.
    pub graph: Arc<crate::graph::Shared>,
    /// Where the fleet exporter learns the services' policies and cgroups.
    pub host_view: watch::Sender<Arc<HostView>>,
    /// The DNS proxy of name rules (told each policy applied).
    pub dns: Arc<crate::dns::serve::Dns>,
}

pub struct Engine {
    enforcer: Enforcer,
    tracker: ServiceTracker,
    names: watch::Sender<Arc<Names>>,
    hub: Arc<Hub>,
    metrics: Arc<MetricsState>,
    map_capacities: Vec<(&'static str, u32)>,
    source: PolicySource,
    /// The policy in force, as written.
    set: PolicySet,
    snapshot: Snapshot,
    reloads: Arc<ReloadStats>,
    state_dir: std::path::PathBuf,
    quarantines: Quarantines,
    /// Where the pins are, and which optional kernel parts are active
    /// (for status).
    pins: std::path::PathBuf,
    coverage: crate::kernel::Coverage,
    /// The UDP pinholes' idle timeout (`[udp_replies]`).
    udp_reply_idle: Duration,
    /// How often the self-check runs (`[self_check]`), for status.
    self_check_interval: Duration,
    /// The service graph (blast radius, learn), fed by the aggregator.
    graph: Arc<crate::graph::Shared>,
    host_view: watch::Sender<Arc<HostView>>,
    /// The DNS proxy of name rules (told each policy applied).
    dns: Arc<crate::dns::serve::Dns>,
    /// The previous policy, to remove once its grace period is over.
    retiring: Option<(Instant, CompiledPolicy)>,
    /// The held sockets known (see `crate::held`).
    held: held::Held,
    /// Processes whose unreadable sockets were already logged.
    held_warned: std::collections::HashSet<u32>,
    /// Whether a failed socket dump, a slow scan were already logged.
    held_dump_warned: bool,
    held_slow_warned: bool,
}

impl Engine {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            enforcer,
            tracker,
            names,
            hub,
            metrics,
            map_capacities,
            source,
            set,
            snapshot,
            state_dir,
            quarantines,
            pins,
            coverage,
            udp_reply_idle,
            self_check_interval,
            graph,
            host_view,
            dns,
        } = parts;
        let engine = Self {
            enforcer,
            tracker,
            names,
            hub,
            reloads: Arc::clone(&metrics.reloads),
            metrics,
            map_capacities,
            source,
            set,
            snapshot,
            state_dir,
            quarantines,
            pins,
            coverage,
            udp_reply_idle,
            self_check_interval,
            graph,
            host_view,
            dns,
            retiring: None,
            held: held::Held::default(),
            held_warned: std::collections::HashSet::new(),
            held_dump_warned: false,
            held_slow_warned: false,
        };
        engine.publish_host_view();
        engine
    }

    /// Tells the fleet exporter the services' policies and cgroups, when
    /// they changed.
    fn publish_host_view(&self) {
        let view = HostView::new(&self.set, &self.snapshot, &self.tracker.services);
        self.host_view.send_if_modified(|current| {
            if **current == view {
                return false;
            }
            *current = Arc::new(view);
            true
        });
    }

    /// Stops without detaching: the pinned programs go on enforcing the
    /// policy in force until a new agent takes over (see
    /// [`Enforcer::leave_pinned`]).
    pub fn leave_pinned(self) {
        self.enforcer.leave_pinned();
    }

    /// Re-resolves service cgroups (new services, restarted units), and
    /// follows `exe` paths to the files that replaced them.
    pub fn rescan(&mut self) {
        match self.enforcer.follow_executables() {
            Ok(followed) => {
                for f in followed {
                    match &f.refused {
                        None => info!(
                            path = %f.path.display(),
                            was = %f.was,
                            now = %f.now,
                            "an `exe` path names a new file (replaced on disk): its rules allow it too, and the old file until the next reload"
                        ),
                        Some(why) => warn!(
                            path = %f.path.display(),
                            was = %f.was,
                            now = %f.now,
                            "an `exe` path names a new file (replaced on disk) that its rules do NOT allow: {why}; only a file only root could have put there is followed (a reload names it if it is wanted)"
                        ),
                    }
                }
            }
            Err(e) => warn!("cannot follow `exe` paths to replaced files: {e}"),
        }
        let failed = self.apply_rescan();
        if !failed.is_empty() {
            // A cgroup the kernel may hold a wrong entry for: the self-check
            // finds it and re-applies the policy (the tracker retries adds).
            warn!(
                failed = failed.len(),
                "cannot update the managed cgroups: {}; checking the maps now", failed[0].1
            );
            self.self_check("service update failed");
        }
    }

    /// Rescans the service cgroups and writes what changed; returns the
    /// writes that failed.
    fn apply_rescan(&mut self) -> Vec<(Change, String)> {
        let changes = self.tracker.rescan();
        if changes.is_empty() {
            return Vec::new();
        }
        let failed = match self.enforcer.apply_service_changes(&changes) {
            Ok(failed) => failed,
            Err(e) => changes.iter().map(|c| (*c, e.to_string())).collect(),
        };
        self.tracker.applied(&failed);
        self.forget_gone(&changes);
        self.refresh_inventory();
        self.publish_host_view();
        failed
    }

    /// Removes the entries just written for cgroups that were already gone
    /// (see `ServiceTracker::gone_before_written`); the next rescan forgets
    /// them in the tracker.
    fn forget_gone(&mut self, changes: &[Change]) {
        let gone = self.tracker.gone_before_written(changes);
        if !gone.is_empty() {
            if let Err(e) = self.enforcer.apply_service_changes(&gone) {
                warn!("cannot remove the entries of cgroups already gone: {e}");
            }
        }
    }

    /// Removes idle UDP pinholes and makes every service's count exact;
    /// with `previous` (the policy just replaced), closes the pinholes it
    /// allowed that the policy in force does not.
    pub fn sweep_udp_peers(&mut self, previous: Option<&CompiledPolicy>) {
        let Some(live) = self.enforcer.live().cloned() else {
            return;
        };
        if let Err(e) = crate::kernel::udp_peers::sweep(
            self.enforcer.ebpf_mut(),
            self.udp_reply_idle,
            &live,
            previous,
            &self.metrics.udp_peers,
        ) {
            warn!("cannot sweep the UDP pinholes: {e}");
        }
    }

    /// Looks for sockets managed services hold but did not create (see
    /// `crate::held`) and points the kernel at their holders.
    pub fn scan_held_sockets(&mut self) {
        let targets: Vec<held::Target<'_>> = self
            .tracker
            .services
            .iter()
            .flat_map(|s| {
                s.enforced().map(|c| held::Target {
                    cgroup_path: &c.path,
                    cgroup_id: c.id,
                    all_sockets: s.entry.flags & FLAG_QUARANTINE != 0,
                })
            })
            .collect();
        let managed = self
            .tracker
            .services
            .iter()
            .flat_map(|s| s.cgroups.iter().map(|c| c.path.as_str()))
            .collect();
        let report = self.held.scan(
            self.tracker.mount(),
            &targets,
            &managed,
            agent_common::maps::MAX_HELD_SOCKETS as usize,
        );
        let stats = &self.metrics.held;
        match &report.dump_error {
            // Counted and logged once while it lasts.
            Some(e) if !self.held_dump_warned => {
                self.held_dump_warned = true;
                stats.scan_errors.fetch_add(1, Ordering::Relaxed);
                warn!("cannot list some of the kernel's sockets ({e}); the held sockets already known stay, others of that kind are judged by their creator's policy until a scan lists them");
            }
            Some(_) => {}
            None => self.held_dump_warned = false,
        }
        for (pid, reason) in &report.unreadable {
            stats.scan_errors.fetch_add(1, Ordering::Relaxed);
            if self.held_warned.insert(*pid) {
                warn!(
                    pid,
                    "cannot read the descriptors of a process of a managed service ({reason}); a socket it holds but did not create is judged by its creator's policy"
                );
            }
        }
        for (cgroup_id, overflow) in &report.overflow {
            stats.overflow.fetch_add(*overflow, Ordering::Relaxed);
            let service = self
                .tracker
                .services
                .iter()
                .find(|s| s.cgroups.iter().any(|c| c.id == *cgroup_id))
                .map_or("?", |s| s.name.as_str());
            warn!(
                service,
                overflow,
                per_service = held::PER_SERVICE,
                "held sockets that do not fit HELD_SOCKETS (the service's share or the map is full of sockets still open): they are judged by their creator's policy"
            );
        }
        if report.elapsed > held::SLOW_SCAN && !self.held_slow_warned {
            self.held_slow_warned = true;
            warn!(
                elapsed_ms = report.elapsed.as_millis() as u64,
                "the scan for held sockets took longer than {} ms (logged once)",
                held::SLOW_SCAN.as_millis()
            );
        }
        match self.enforcer.set_held_sockets(self.held.entries()) {
            Ok(overflow) => {
                let count = self.held.entries().len() as u64;
                stats.sockets.store(count - overflow, Ordering::Relaxed);
                stats
                    .unseen
                    .store(self.held.unseen() as u64, Ordering::Relaxed);
                if overflow > 0 {
                    stats.overflow.fetch_add(overflow, Ordering::Relaxed);
                    warn!(overflow, "HELD_SOCKETS is full: these held sockets are judged by their creator's policy");
                }
            }
            Err(e) => warn!("cannot update HELD_SOCKETS: {e}"),
        }
    }

    /// Reads the policy directory again and, if it is valid, switches to it
    /// atomically per service. On any problem the policy in force stays
    /// untouched; either way the outcome is an audit event, and returned
    /// (`bulkhead reload` shows it).
    pub fn reload(&mut self, trigger: &str) -> Result<Vec<PolicyError>, Refused> {
        let result = self.try_reload(trigger);
        self.reloads
            .record(&result.as_ref().map(|_| ()).map_err(ToString::to_string));
        if let Err(refused) = &result {
            let error = refused.to_string();
            warn!(
                trigger,
                "policy reload refused; the policy in force is unchanged:\n{error}"
            );
            let now = reload::current_snapshot(&self.source.dir);
            let record = reload::change_record(
                "reload",
                trigger,
                (&self.snapshot, &self.set),
                None,
                Some(&now),
                Some(error),
            );
            self.hub.publish(vec![reload::audit_event(record)]);
        }
        // Applied or not: a failed write may have left something behind.
        self.self_check("reload");
        result
    }

    /// Applies the policy directory; returns the warnings it was accepted
    /// with.
    fn try_reload(&mut self, trigger: &str) -> Result<Vec<PolicyError>, Refused> {
        let loaded = reload::load(&self.source).map_err(Refused::Policy)?;
        for w in &loaded.set.warnings {
            warn!("policy accepted with a warning: {w}");
        }
        for w in &loaded.warnings {
            warn!("INSECURE policy file accepted (--allow-insecure-policy-files): {w}");
        }
        let started = std::time::Instant::now();
        self.apply_set(&loaded.set).map_err(Refused::Apply)?;
        let applied_ms = started.elapsed().as_millis() as u64;
        let record = reload::change_record(
            "reload",
            trigger,
            (&self.snapshot, &self.set),
            Some((&loaded.snapshot, &loaded.set)),
            None,
            None,
        );
        info!(
            trigger,
            files = record.files.len(),
            services = record.services.len(),
            applied_ms,
            "policy reloaded"
        );
        self.hub.publish(vec![reload::audit_event(record)]);
        let mut warnings = loaded.warnings;
        warnings.extend(loaded.set.warnings.iter().cloned());
        self.set = loaded.set;
        if let Err(e) = self.dns.apply(&self.set) {
            warn!("the policy has name rules but the DNS proxy cannot start: {e:#}; their lookups teach nothing (denied)");
        }
        self.snapshot = loaded.snapshot;
        self.graph.set_policy(&self.set);
        self.publish_host_view();
        Ok(warnings)
    }

    /// Compiles `set` with the quarantines laid over it and switches the
    /// kernel to it: staged into the other half, then one map update per
    /// service cgroup. On error nothing in force has changed.
    fn apply_set(&mut self, set: &PolicySet) -> Result<(), String> {
        if let Some((at, _)) = self.retiring.take() {
            // A change right after a change: wait out what is left of the
            // previous policy's grace; staging empties its half. The
            // runtime is told, so its other tasks move to another worker.
            let wait = at.saturating_duration_since(Instant::now());
            tokio::task::block_in_place(|| std::thread::sleep(wait));
        }
        let effective = self.quarantines.overlay(set);
        let compiled = crate::kernel::compile(&effective).map_err(|e| e.to_string())?;
        let staged = tokio::task::block_in_place(|| self.enforcer.stage(compiled))
            .map_err(|e| format!("writing the new policy into the maps failed: {e}"))?;
        let before = self.tracker.services.clone();
        let changes = self.tracker.reload(&staged);
        let rollback = crate::rollback::changes(
            &before,
            &self.tracker.services,
            self.enforcer.live(),
            &changes,
        );
        // Sockets held by services that start judging packets with this
        // change (a quarantine, a new service) are known before it
        // applies, not one scan later.
        self.scan_held_sockets();
        // Names first: events of the new policy may follow the switch at once.
        self.names
            .send_replace(Arc::new(Names::from_policy(&staged)));
        self.metrics
            .before_switch(staged.services.iter().map(|s| s.entry.service_id));
        let old = match self.enforcer.switch(staged, &changes, &rollback) {
            Ok(old) => old,
            Err(e) => {
                // Everything is back as it was: the tracker and names too.
                self.tracker.services = before;
                if let Some(live) = self.enforcer.live() {
                    self.names.send_replace(Arc::new(Names::from_policy(live)));
                }
                self.refresh_inventory();
                return Err(format!(
                    "switching to the new policy failed part-way and was undone: {e}"
                ));
            }
        };
        self.forget_gone(&changes);
        // Pinholes the new policy no longer allows close now.
        self.sweep_udp_peers(old.as_ref());
        if let Some(old) = old {
            self.retiring = Some((Instant::now() + RETIRE_GRACE, old));
        }
        self.refresh_inventory();
        if let Some(live) = self.enforcer.live() {
            crate::takeover::save_names(&self.state_dir, &Names::from_policy(live));
        }
        Ok(())
    }

    /// A request from the control socket.
    pub fn handle(&mut self, call: AdminCall) {
        let answer = match call.request {
            Request::Status(_) => Ok(self.status()),
            Request::Quarantine(q) => self.quarantine(&q.service, &q.allow),
            Request::Release(r) => self.release(&r.service),
            Request::Flows(_) => Err("flows is served by the control socket itself".to_string()),
            Request::Graph(_) => Ok(crate::graph::requests::graph(&self.graph, &self.set)),
            Request::BlastRadius(r) => {
                crate::graph::requests::blast_radius(&self.graph, &self.set, &r)
            }
            Request::Learn(r) => crate::graph::requests::learn(&self.graph, &self.set, &r),
            Request::Reload(_) => Err("reload is served by the daemon's main loop".to_string()),
        };
        // The client may have gone; nothing to do then.
        let _ = call.reply.send(answer);
    }

    fn quarantine(&mut self, service: &str, allow: &[String]) -> Result<Value, String> {
        let started = std::time::Instant::now();
        if !self.set.services.iter().any(|s| s.name == service) {
            return Err(format!("no service named {service:?} in the policy"));
        }
        let exceptions = allow
            .iter()
            .map(|a| a.parse::<Exception>())
            .collect::<Result<Vec<_>, _>>()?;
        let before = self.quarantines.clone();
        self.quarantines
            .services
            .insert(service.to_string(), exceptions.clone());
        let set = self.set.clone();
        if let Err(e) = self.apply_set(&set) {
            self.quarantines = before;
            self.refresh_inventory();
            return Err(e);
        }
        let applied_in = started.elapsed();
        if let Err(e) = self.quarantines.save(&self.state_dir) {
            warn!("quarantine applied but not saved (it will not survive a restart): {e}");
        }
        warn!(service, allow = ?allow, applied_in_us = applied_in.as_micros() as u64, "service QUARANTINED");
        self.audit("quarantine", service, allow);
        Ok(json!({
            "service": service,
            "allow": exceptions.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "applied_in_us": applied_in.as_micros() as u64,
        }))
    }

    fn release(&mut self, service: &str) -> Result<Value, String> {
        let Some(removed) = self.quarantines.services.remove(service) else {
            return Err(format!("service {service:?} is not quarantined"));
        };
        let set = self.set.clone();
        if let Err(e) = self.apply_set(&set) {
            self.quarantines
                .services
                .insert(service.to_string(), removed);
            self.refresh_inventory();
            return Err(e);
        }
        if let Err(e) = self.quarantines.save(&self.state_dir) {
            warn!("release applied but not saved: {e}");
        }
        info!(service, "service released from quarantine");
        self.audit("release", service, &[]);
        Ok(json!({ "service": service }))
    }

    fn audit(&self, action: &str, service: &str, allow: &[String]) {
        let record = ChangeRecord {
            action: action.to_string(),
            result: "applied".to_string(),
            trigger: "control".to_string(),
            files: Vec::new(),
            services: vec![ServiceChange {
                service: service.to_string(),
                added: allow
                    .iter()
                    .map(|a| format!("quarantine allow {a}"))
                    .collect(),
                removed: Vec::new(),
            }],
            error: None,
        };
        self.hub.publish(vec![reload::audit_event(record)]);
    }

    fn status(&self) -> Value {
        let services: Vec<Value> = self
            .tracker
            .services
            .iter()
            .map(|t| {
                let counts = self
                    .metrics
                    .service_counts(&t.name)
                    .and_then(Result::ok)
                    .unwrap_or([0; agent_common::COUNTER_SLOTS as usize]);
                let by_verdict = |v: usize| -> u64 {
                    counts.iter().enumerate().filter(|(i, _)| i % 3 == v).map(|(_, c)| c).sum()
                };
                let policy = self.set.services.iter().find(|s| s.name == t.name);
                json!({
                    "name": t.name,
                    "cgroup": t.cgroups.first().map_or_else(|| t.selector.to_string(), |c| format!("/{}", c.path)),
                    "state": t.state().as_str(),
                    "detail": t.explain(self.tracker.mount()),
                    "cgroup_id": t.cgroups.first().map(|c| c.id),
                    "cgroups": t.cgroups.iter().map(|c| json!({
                        "path": format!("/{}", c.path),
                        "id": c.id,
                        "enforced": c.unenforced.is_none(),
                    })).collect::<Vec<_>>(),
                    "mode": Mode::from_kernel(t.entry.mode).as_str(),
                    "rules": policy.map_or(0, |p| p.egress.len() + p.ingress.as_ref().map_or(0, Vec::len)),
                    "file": policy.map(|p| p.file.display().to_string()),
                    "quarantined": self.quarantines.services.contains_key(&t.name),
                    "quarantine_allow": self.quarantines.services.get(&t.name)
                        .map(|e| e.iter().map(ToString::to_string).collect::<Vec<_>>()),
                    "allowed": by_verdict(0),
                    "denied": by_verdict(1),
                    "audited": by_verdict(2),
                })
            })
            .collect();
        let last_error = self
            .reloads
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        json!({
            "policy_dir": self.source.dir.display().to_string(),
            "services": services,
            "reloads_applied": self.reloads.success.load(Ordering::Relaxed),
            "reloads_refused": self.reloads.failure.load(Ordering::Relaxed),
            "last_reload_error": last_error,
            "pins": self.pins.display().to_string(),
            "cgroup2": self.tracker.mount().display().to_string(),
            "self_check": self.metrics.drift.status(self.self_check_interval.as_secs()),
            "kernel_features": self.coverage.features().map(|(name, active, says)| json!({
                "feature": name, "active": active, "status": says,
            })),
        })
    }

    /// When the previous policy may be removed, if one is waiting.
    pub fn retire_at(&self) -> Option<Instant> {
        self.retiring.as_ref().map(|(at, _)| *at)
    }

    pub fn retire(&mut self) {
        if let Some((_, old)) = self.retiring.take() {
            if let Err(e) = self.enforcer.retire(&old) {
                warn!("cannot remove the previous policy's prefixes: {e}; the next policy change empties that half before writing it, and the self-check reports and repairs what stays");
            }
        }
    }

    /// Reads the policy maps back and compares them with the policy in
    /// force; any difference is logged, counted and repaired by applying
    /// the policy in force again (see `kernel::drift`).
    pub fn self_check(&mut self, trigger: &str) {
        // A cgroup made during a switch may hold the entry the kernel wrote
        // from the previous policy's paths until the next rescan, which
        // rewrites it; rescanning first keeps that out of the drift count
        // (found by the soak: a reload while a unit restarts). A write that
        // fails here is drift the check below finds and repairs.
        let failed = self.apply_rescan();
        if let Some((_, e)) = failed.first() {
            warn!(
                trigger,
                failed = failed.len(),
                "self-check: cannot update the managed cgroups first: {e}; checking the maps"
            );
        }
        let report = match self.check_drift() {
            Ok(report) => report,
            Err(e) => {
                warn!(trigger, "self-check: cannot read the kernel maps: {e}");
                self.metrics.drift.record_error(trigger, &e.to_string());
                return;
            }
        };
        debug!(
            trigger,
            entries = report.entries_read,
            elapsed_us = report.elapsed.as_micros() as u64,
            differences = report.total(),
            "self-check done"
        );
        if report.total() == 0 {
            self.metrics.drift.record(trigger, &report, None);
            return;
        }
        warn!(
            trigger,
            differences = report.total(),
            kinds = %report.summary(),
            first = ?report.first,
            "ENFORCEMENT DRIFT: the kernel maps differ from the policy in force; re-applying it"
        );
        let repaired = self.repair(&report);
        let after = self.check_drift().unwrap_or_else(|_| report.clone());
        match &repaired {
            Ok(()) if after.total() == 0 => info!(trigger, "enforcement drift repaired"),
            Ok(()) => {
                warn!(kinds = %after.summary(), first = ?after.first, "enforcement drift remains after the repair")
            }
            Err(e) => warn!("cannot repair the enforcement drift: {e}"),
        }
        self.metrics
            .drift
            .record(trigger, &report, Some((repaired.is_ok(), &after)));
    }

    fn check_drift(&self) -> Result<crate::kernel::drift::Report, crate::kernel::KernelError> {
        let managed = self
            .tracker
            .services
            .iter()
            .flat_map(|s| s.enforced().map(|c| (c.id, s.entry)))
            .collect();
        let current = || self.tracker.current();
        let cgroups = crate::kernel::drift::Cgroups {
            managed,
            current: &current,
        };
        tokio::task::block_in_place(|| self.enforcer.check_drift(self.retiring.is_some(), &cgroups))
    }

    /// Removes SERVICES entries of cgroups no service has, then writes the
    /// policy in force again into the other half and switches to it.
    fn repair(&mut self, report: &crate::kernel::drift::Report) -> Result<(), String> {
        let unknown: Vec<_> = report
            .unknown_cgroups
            .iter()
            .map(|&cgroup_id| Change::Remove { cgroup_id })
            .collect();
        self.enforcer
            .apply_service_changes(&unknown)
            .map_err(|e| e.to_string())?;
        let set = self.set.clone();
        self.apply_set(&set)
    }

    fn refresh_inventory(&self) {
        let Some(live) = self.enforcer.live() else {
            return;
        };
        self.metrics.replace_inventory(
            Inventory::from_policy(live, &self.tracker.statuses(), &self.map_capacities)
                .quarantined(self.quarantines.services.keys()),
        );
    }
}
