//! `bulkhead run`: load, attach, enforce and report until told to stop,
//! then detach.

use std::{path::PathBuf, sync::Arc};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use tokio::sync::watch;

use crate::{
    cgroup,
    cli::RunArgs,
    config::Config,
    engine::Engine,
    events::{self, Decoder, Hub, Names, Sink},
    kernel::{
        self,
        pins::{self, PinRoot},
        Enforcer, LoadOptions, ResolvedService,
    },
    policy,
    reload::{self, Loaded, PolicySource},
    services::{ServiceTracker, RESCAN_INTERVAL},
};

/// Everything `run` decided before starting: nothing here touched the kernel.
pub struct Plan {
    pub config: Config,
    pub source: PolicySource,
    pub loaded: Loaded,
    pub mount: PathBuf,
}

/// The kernel's per-CPU counters, read at scrape time by the metrics.
pub struct KernelCounters {
    /// Verdict counters by service (see `agent_common::counter_slot`).
    pub verdicts: PerCpuArray<MapData, u64>,
    /// Records dropped because the ring buffer was full, by LOST_* slot.
    pub lost: PerCpuArray<MapData, u64>,
}

pub fn run(args: &RunArgs, log_level: &str) -> Result<()> {
    // Everything that can be refused is checked before the runtime starts
    // and before anything touches the kernel.
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(file) = &args.log_file {
        config.log_file = Some(file.clone());
    }
    crate::logging::init(log_level, config.log_file.as_deref()).with_context(|| {
        format!(
            "cannot open the log file {}",
            config
                .log_file
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display()
        )
    })?;
    if let Some(sink) = &args.events {
        config.events.sink = sink.clone();
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics.listen = listen;
    }
    if let Some(socket) = &args.control_socket {
        config.control.socket = socket.clone();
    }
    if let Some(dir) = &args.pin_dir {
        config.pin_dir = dir.clone();
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    let policy_dir = args.policy_dir.clone().unwrap_or(config.policy_dir.clone());
    let source = PolicySource {
        dir: policy_dir.clone(),
        allow_insecure: args.allow_insecure_policy_files,
    };
    let loaded = reload::load(&source).map_err(|errors| {
        anyhow!(
            "invalid policy in {}; nothing was loaded:\n{errors}",
            policy_dir.display()
        )
    })?;
    for w in &loaded.set.warnings {
        warn!("policy accepted with a warning: {w}");
    }
    for w in &loaded.warnings {
        warn!("INSECURE policy file accepted (--allow-insecure-policy-files): {w}");
    }
    kernel::preflight::check().map_err(|line| anyhow!(line))?;
    // A second agent must be refused before it touches the kernel (it
    // would take over the first one's pins): one live agent per socket.
    crate::control::server::ensure_free(&config.control.socket)?;
    let mount = cgroup::cgroup2_mount()?;
    if !config.metrics.listen.ip().is_loopback() {
        warn!(listen = %config.metrics.listen, "metrics endpoint is not on loopback: it exposes the service map to the network");
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(Plan {
        config,
        source,
        loaded,
        mount,
    }))
}

async fn serve(plan: Plan) -> Result<()> {
    let Plan {
        config,
        source,
        loaded,
        mount,
    } = plan;
    let Loaded {
        set,
        compiled,
        snapshot,
        ..
    } = loaded;
    let policy_dir = source.dir.clone();
    // Quarantines survive restarts: they are laid over the policy from the
    // first moment this agent enforces.
    // A damaged file is set aside and the pinned quarantines kept (fail closed).
    let quarantines = crate::quarantine_recovery::at_start(
        &config.state_dir,
        &PinRoot(config.pin_dir.clone()).current(),
        &mount,
        &compiled,
    );
    let compiled = if quarantines.services.is_empty() {
        compiled
    } else {
        for (name, allow) in &quarantines.services {
            warn!(service = %name, ?allow, "service is QUARANTINED (from the state directory)");
        }
        kernel::compile(&quarantines.overlay(&set)).map_err(|e| anyhow!("{e}"))?
    };
    let sink = Sink::open(&config.events.sink)
        .with_context(|| format!("cannot open the decision log {}", config.events.sink))?;
    let hub = Arc::new(Hub::new(sink).context("cannot start the decision log writer")?);
    // The service graph taps the hub before the first event and starts from
    // the state directory's copy (docs/graph.md).
    let graph = Arc::new(crate::graph::Shared::default());
    *graph.graph() = crate::graph::store::load(&config.state_dir);
    graph.set_policy(&set);
    hub.add_tap(Arc::clone(&graph) as Arc<dyn events::Tap>);
    // Bound before anything touches the kernel, so a taken port stops the
    // daemon here, with the address in the error.
    let metrics_endpoint = crate::metrics::Endpoint::bind(config.metrics.listen)?
        .allow_hosts(&config.metrics.allowed_hosts);

    // Services whose cgroup exists now are written before attach; the rest
    // (and restarted units, with new cgroup ids) are picked up by the
    // periodic rescan in the main loop.
    let mut tracker = ServiceTracker::new(&mount, &compiled);
    tracker.rescan();
    for s in tracker.services.iter().filter(|s| s.cgroups.is_empty()) {
        warn!(service = %s.name, "{}; the service is managed as soon as its cgroup appears", s.explain(&mount));
    }
    let resolved = resolved_services(&tracker);
    crate::notify::status("starting: loading the eBPF programs");
    let mut enforcer = Enforcer::load(
        &compiled,
        &LoadOptions {
            bpf_log: config.bpf_log,
            observe_unmanaged: config.events.observe_unmanaged,
            events_bytes: config.events.ring_buffer_bytes,
            udp_reply_idle: std::time::Duration::from_secs(u64::from(
                config.udp_replies.idle_timeout_secs,
            )),
            udp_peers_per_service: config.udp_replies.per_service,
            max_cgroups: config.services.max_cgroups,
        },
    )?;
    let _bpf_logger = if config.bpf_log {
        Some(start_bpf_logger(enforcer.ebpf_mut())?)
    } else {
        None
    };
    let failed = enforcer.write_policy(compiled.clone(), &resolved)?;
    tracker.applied(&failed);

    // Everything is pinned into a staging directory first, and made
    // `current` only once attached (see kernel/pins.rs).
    let pins = PinRoot(config.pin_dir.clone());
    pins.prepare().map_err(|e| anyhow!(e))?;
    pins::clean_leftovers(&pins);
    let staging = pins.staging();
    enforcer.pin_maps(&staging)?;

    // The consumer starts before the programs attach, so that the first
    // decision already has a reader.
    let ring: RingBuf<MapData> = take_map(enforcer.ebpf_mut(), agent_common::maps::EVENTS)?;
    let counters = KernelCounters {
        verdicts: take_map(enforcer.ebpf_mut(), agent_common::maps::COUNTERS)?,
        lost: take_map(enforcer.ebpf_mut(), agent_common::maps::LOST)?,
    };
    let first_names = Arc::new(Names::from_policy(&compiled));
    let (names_tx, names_rx) = watch::channel(Arc::clone(&first_names));
    let decoder = Decoder::new(first_names);
    let reader = events::spawn_reader(ring, decoder, names_rx, Arc::clone(&hub))
        .context("cannot poll the event ring buffer")?;

    let coverage = enforcer.attach(&mount, Some(&staging))?;
    // A managed cgroup made between the rescan above and the attach of our
    // cgroup_mkdir program is in none of our maps (a previous agent's
    // program, still attached, put it in its own). Ours watches now, so one
    // more rescan finds every such cgroup, and the tracepoint every later
    // one. Before the take-over: the previous programs, which enforce on it
    // meanwhile, are detached only once ours do too.
    let late = tracker.rescan();
    if !late.is_empty() {
        let failed = enforcer.apply_service_changes(&late)?;
        tracker.applied(&failed);
        info!(
            changes = late.len(),
            "cgroups of managed services made or removed while the agent started are now enforced"
        );
    }
    // The previous agent's names, before ours replace them: its leftover
    // events carry its service ids.
    let previous_names = crate::takeover::previous_names(&config.state_dir);
    crate::takeover::save_names(&config.state_dir, &Names::from_policy(&compiled));
    match &coverage.cgroup_creation_reason {
        None => info!("new cgroups of managed services are enforced from their creation (cgroup_mkdir tracepoint)"),
        Some(reason) => warn!("{reason}"),
    }
    match pins.promote().context("cannot make the new pins current")? {
        Some(previous) => crate::takeover::take_over(previous, previous_names, &hub),
        None => {
            info!(pins = %pins.current().display(), "programs pinned: enforcement continues while the agent is stopped")
        }
    }
    match &coverage.packet_sockets_reason {
        None => info!("packet sockets (AF_PACKET) are judged through BPF LSM"),
        Some(reason) => warn!("packet sockets (AF_PACKET) are NOT judged: {reason}; a managed service can open one only with CAP_NET_RAW, which its unit should drop"),
    }

    // Metrics endpoint (/metrics, /healthz): owns `counters`.
    let map_capacities = crate::metrics::map_capacities(enforcer.ebpf_mut());
    let metrics_state = Arc::new(crate::metrics::MetricsState::new(
        std::sync::Mutex::new(counters),
        Arc::clone(&hub.stats),
        crate::metrics::Inventory::from_policy(&compiled, &tracker.statuses(), &map_capacities),
    ));
    metrics_state.set_attached(true);
    metrics_state.set_features(coverage.features().map(|(name, active, _)| (name, active)));
    metrics_state.set_graph(Arc::clone(&graph));
    let graph_task =
        crate::graph::store::spawn_upkeep(Arc::clone(&graph), config.state_dir.clone());
    let _metrics = metrics_endpoint.serve(Arc::clone(&metrics_state))?;
    // Anomaly detection: counts the live events, reports deviations.
    let anomaly_stats = Arc::new(crate::anomaly::AnomalyStats::default());
    metrics_state.set_anomalies(Arc::clone(&anomaly_stats));
    let anomalies = crate::anomaly::spawn(
        config.anomaly.clone(),
        &hub,
        config.state_dir.clone(),
        anomaly_stats,
    )
    .context("cannot start anomaly detection")?;
    let export_stats = Arc::new(crate::export::ExportStats::default());
    metrics_state.set_export(Arc::clone(&export_stats));
    let exporter = crate::export::spawn(config.export.clone(), &hub, export_stats)
        .context("cannot start the OTLP exporter")?;

    // Control socket (`bulkhead flows`, ...): serves from `hub`.
    // (control: spawn here)
    let (admin_tx, mut admin_rx) = tokio::sync::mpsc::channel(16);
    let control = crate::control::Server::start_with_admin(
        &config.control.socket,
        Arc::clone(&hub),
        Some(admin_tx),
    )?;

    let status = format!(
        "enforcing: {} of {} services managed, {} rules, from {}",
        tracker
            .services
            .iter()
            .filter(|s| s.state() == crate::services::ServiceState::Managed)
            .count(),
        set.services.len(),
        compiled.rules.len(),
        policy_dir.display()
    );
    info!(cgroup2 = %mount.display(), events = %config.events.sink, "{status}");
    // Handlers before READY: a SIGHUP (reload) or SIGTERM right after the
    // service manager hears we are up must not kill the agent.
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // Likewise the policy directory's watch: a change right after READY
    // must not be missed.
    let mut policy_changes = crate::policy_watch::PolicyWatch::start(&policy_dir)?;
    crate::notify::ready(&status);
    // Pings while the event consumer lives and the main loop beats.
    let watchdog = crate::notify::Watchdog::start(Arc::clone(&hub.stats), RESCAN_INTERVAL);

    hub.publish(vec![reload::audit_event(reload::change_record(
        "load",
        "startup",
        (&reload::Snapshot::default(), &policy::PolicySet::default()),
        Some((&snapshot, &set)),
        None,
        None,
    ))]);
    let mut engine = Engine::new(
        enforcer,
        tracker,
        names_tx,
        Arc::clone(&hub),
        Arc::clone(&metrics_state),
        map_capacities,
        source,
        (set, snapshot),
        config.state_dir.clone(),
    );
    engine.quarantines = quarantines;
    engine.graph = Arc::clone(&graph);
    engine.pins = pins.current();
    engine.udp_reply_idle =
        std::time::Duration::from_secs(u64::from(config.udp_replies.idle_timeout_secs));
    engine.coverage = coverage;
    let check_every = std::time::Duration::from_secs(u64::from(config.self_check.interval_secs));
    engine.self_check_interval = check_every;

    let mut rescan = tokio::time::interval(RESCAN_INTERVAL);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held_scan = tokio::time::interval(crate::held::SCAN_INTERVAL);
    held_scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pinhole_sweep = tokio::time::interval(crate::kernel::udp_peers::SWEEP_INTERVAL);
    pinhole_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Its first tick is at once: the start-up check.
    let mut self_check = tokio::time::interval(check_every);
    self_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check_trigger = "start";
    // File changes come in bursts (editors write, rename, chmod): reload
    // once they have settled.
    let mut reload_at: Option<tokio::time::Instant> = None;
    let far = || tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        tokio::select! {
            _ = rescan.tick() => {
                engine.rescan();
                watchdog.beat();
            }
            _ = held_scan.tick() => engine.scan_held_sockets(),
            _ = pinhole_sweep.tick() => engine.sweep_udp_peers(None),
            _ = self_check.tick() => {
                engine.self_check(check_trigger);
                check_trigger = "periodic";
            }
            Some(call) = admin_rx.recv() => engine.handle(call),
            () = policy_changes.changed() => {
                reload_at = Some(tokio::time::Instant::now() + POLICY_SETTLE);
            }
            _ = tokio::time::sleep_until(reload_at.unwrap_or_else(far)), if reload_at.is_some() => {
                reload_at = None;
                // A directory replaced (renamed over) is watched anew.
                policy_changes.rearm();
                engine.reload("inotify");
            }
            _ = tokio::time::sleep_until(engine.retire_at().unwrap_or_else(far)), if engine.retire_at().is_some() => {
                engine.retire();
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                match hub.reopen_sink() {
                    Ok(()) => info!("SIGHUP: decision log re-opened"),
                    Err(e) => warn!("SIGHUP: cannot re-open the decision log: {e}"),
                }
                policy_changes.rearm();
                engine.reload("sighup");
            }
        }
    }
    crate::notify::stopping("stopping");
    // Followers get {"end":"shutdown"}; the socket file is removed.
    control.shutdown().await;
    metrics_state.set_attached(false);
    // The links stay pinned: enforcement goes on until a new agent takes
    // over, or `bulkhead detach` removes it.
    engine.enforcer.leave_pinned();
    reader.abort();
    if let Some(task) = anomalies {
        task.stop().await;
    }
    if let Some(exporter) = exporter {
        exporter.abort();
    }
    graph_task.finish().await;
    // The last anomaly and shutdown events reach the decision log.
    hub.sync_log();
    match crate::graph::store::save(&config.state_dir, &graph) {
        Ok(()) => info!(dir = %config.state_dir.display(), "service graph saved"),
        Err(e) => warn!(dir = %config.state_dir.display(), "cannot save the service graph: {e}"),
    }
    info!(pins = %pins.current().display(), "agent stopped; its programs stay attached and enforcing (`bulkhead detach` removes them)");
    Ok(())
}

/// Quiet time after the last change in the policy directory before a reload.
const POLICY_SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

/// The services whose cgroup exists, as the kernel maps take them.
fn resolved_services(tracker: &ServiceTracker) -> Vec<ResolvedService> {
    tracker
        .services
        .iter()
        .flat_map(|s| {
            s.cgroups.iter().map(|c| ResolvedService {
                cgroup_id: c.id,
                entry: s.entry,
            })
        })
        .collect()
}

fn take_map<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} is missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

/// Forwards aya-log records from the kernel programs to our log.
fn start_bpf_logger(ebpf: &mut aya::Ebpf) -> Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("cannot start the kernel log reader")?;
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger, so the fd stays open and unchanged.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("cannot poll the kernel log")?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
