//! Step 2: from a [`Plan`] to a running agent. The order matters and is
//! the order of the calls in [`start`]: the decision log and the metrics
//! port before the kernel, the event reader before the attach, the second
//! rescan before the take-over, signal handlers and the policy watch before
//! READY.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::Plan;
use crate::{
    config::Config,
    control::server::AdminCall,
    engine::{self, Engine},
    events::{self, Decoder, Hub, Names, Sink},
    kernel::{
        self,
        pins::{self, PinRoot},
        CompiledPolicy, Coverage, Enforcer, LoadOptions, ResolvedService,
    },
    metrics::{KernelCounters, MetricsState, Sources},
    policy::{self, PolicySet},
    quarantine::Quarantines,
    reload::{self, Loaded},
    services::{ServiceState, ServiceTracker, RESCAN_INTERVAL},
};

/// A started agent: its programs attached and enforcing, its tasks
/// running, READY sent. [`Running::run_until_signal`], then
/// [`Running::stop`].
pub struct Running {
    pub(super) engine: Engine,
    pub(super) hub: Arc<Hub>,
    pub(super) metrics: Arc<MetricsState>,
    pub(super) graph: Arc<crate::graph::Shared>,
    pub(super) state_dir: PathBuf,
    /// Where the current pins are.
    pub(super) pins: PathBuf,
    pub(super) self_check_interval: Duration,
    pub(super) signals: Signals,
    /// The policy directory's watch (reloads on change).
    pub(super) policy_changes: crate::policy_watch::PolicyWatch,
    /// Status, quarantine and release requests from the control socket.
    pub(super) admin: mpsc::Receiver<AdminCall>,
    /// Pings the service manager while the main loop beats.
    pub(super) watchdog: crate::notify::Watchdog,
    pub(super) tasks: Tasks,
}

/// The signals the main loop answers; installed before READY.
pub(super) struct Signals {
    pub(super) term: Signal,
    pub(super) int: Signal,
    /// Reload the policies and re-open the decision log.
    pub(super) hup: Signal,
    /// Re-open the decision log only (logrotate).
    pub(super) usr1: Signal,
}

/// What runs beside the main loop, stopped by [`Running::stop`].
pub(super) struct Tasks {
    /// Reads the event ring buffer into the hub.
    pub(super) reader: JoinHandle<()>,
    pub(super) control: crate::control::Server,
    pub(super) metrics_server: crate::metrics::MetricsServer,
    pub(super) graph_upkeep: crate::graph::store::Upkeep,
    pub(super) anomalies: Option<crate::anomaly::AnomalyTask>,
    pub(super) exporter: Option<crate::export::Exporter>,
    /// Sends this agent's rows to the fleet's ClickHouse.
    pub(super) fleet: Option<crate::fleet::export::FleetExporter>,
    /// Forwards the kernel programs' log (`bpf_log`).
    pub(super) bpf_logger: Option<JoinHandle<()>>,
    /// Turns the kernel's per-flow counts into `flow` events.
    pub(super) flow_sweeper: crate::flows::Sweeper,
    /// The DNS proxy of name rules.
    pub(super) dns: Arc<crate::dns::serve::Dns>,
}

/// Loads, pins and attaches the programs, takes over from a previous
/// agent, starts every task and tells the service manager we are ready.
pub(super) async fn start(plan: Plan) -> Result<Running> {
    let Plan {
        config,
        source,
        loaded,
        mount,
        export,
    } = plan;
    let Loaded {
        set,
        compiled,
        snapshot,
        ..
    } = loaded;
    let (quarantines, compiled) = recover_quarantines(&config, &mount, &set, compiled)?;
    let (hub, graph) = open_decision_log(&config, &set)?;
    // Bound before anything touches the kernel, so a taken port stops the
    // daemon here, with the address in the error.
    let metrics_endpoint = crate::metrics::Endpoint::bind(config.metrics.listen)?
        .allow_hosts(&config.metrics.allowed_hosts);
    let mut tracker = find_services(&mount, &compiled);
    let (mut enforcer, bpf_logger) = load_programs(&config, &compiled, &mut tracker)?;

    let (pins, staging) = pin_maps(&config, &mut enforcer)?;
    let (counters, names, reader) = start_reader(&mut enforcer, &compiled, &hub)?;
    let flow_table = crate::kernel::flow_table::FlowTable::take(enforcer.ebpf_mut())?;
    let sock_owners = crate::kernel::sock_owners::SockOwners::take(enforcer.ebpf_mut())?;
    let dns = prepare_dns(&config, &set, &mut enforcer)?;
    // Decisions to learnt addresses get the name looked up (`dst_name`).
    hub.add_stage(Arc::new(crate::dns::serve::DstNames(Arc::clone(&dns))));
    // Every decision gets its executable's path (`exe`).
    let exe_names = Arc::new(exe_names(&mut enforcer));
    hub.add_stage(Arc::clone(&exe_names) as Arc<dyn crate::events::Stage>);
    // The TCP connections a previous agent followed, known before any
    // event of a connection: ours are attached next, and the closes the
    // previous programs' ring still holds are drained at the take-over.
    // After the naming stages: its copy of each `tcp_established`, which
    // its byte summaries repeat, carries `dst_name` and `exe`.
    let open_connections = Arc::new(crate::flows::OpenConnections::load(&config.state_dir));
    hub.add_stage(Arc::clone(&open_connections) as Arc<dyn events::Stage>);
    let coverage = attach(&mut enforcer, &mut tracker, &mount, &staging)?;
    exe_names.remember(enforcer.take_scanned());
    take_over(&config, &compiled, &coverage, &pins, &hub, &dns)?;
    enforcer.pins_moved_to(&pins.current());
    // Lookups that waited in the proxy's sockets are routed by now.
    dns.apply(&set)?;

    let map_capacities = crate::metrics::map_capacities(enforcer.ebpf_mut());
    let inventory =
        crate::metrics::Inventory::from_policy(&compiled, &tracker.statuses(), &map_capacities)
            .quarantined(quarantines.services.keys());
    let (metrics, side) = start_side_tasks(
        &config,
        export,
        &hub,
        &graph,
        counters,
        &coverage,
        inventory,
        metrics_endpoint,
        &dns,
    )?;
    let flow_sweeper = crate::flows::Sweeper::spawn(
        flow_table,
        sock_owners,
        names.subscribe(),
        Arc::clone(&hub),
        &config.flows,
        Arc::clone(&metrics.flows),
        open_connections,
    )
    .context("cannot start the flow sweeper")?;
    // Control socket (`bulkhead flows`, ...): serves from `hub`; status,
    // quarantine and release go to the main loop.
    let (admin_tx, admin) = mpsc::channel(16);
    let control = crate::control::Server::start_with_admin(
        &config.control.socket,
        Arc::clone(&hub),
        Some(admin_tx),
    )?;

    // The policy is in the maps: the time of the last successful load.
    metrics.reloads.record_load();
    let status = status_line(&tracker, &set, &compiled, &source.dir);
    info!(cgroup2 = %mount.display(), events = %config.events.sink, "{status}");
    // The enforcer holds the copy placed in the maps: ours goes before the
    // heap is trimmed (in `announce_ready`), not after READY.
    drop(compiled);
    let (signals, policy_changes, watchdog) = announce_ready(&source.dir, &hub, &status)?;
    hub.publish(vec![reload::audit_event(reload::change_record(
        "load",
        "startup",
        (&reload::Snapshot::default(), &policy::PolicySet::default()),
        Some((&snapshot, &set)),
        None,
        None,
    ))]);
    let self_check_interval = Duration::from_secs(u64::from(config.self_check.interval_secs));
    let (host_view, host_view_rx) = tokio::sync::watch::channel(Arc::default());
    let engine = Engine::new(engine::Parts {
        enforcer,
        tracker,
        names,
        hub: Arc::clone(&hub),
        metrics: Arc::clone(&metrics),
        map_capacities,
        source,
        set,
        snapshot,
        state_dir: config.state_dir.clone(),
        quarantines,
        pins: pins.current(),
        coverage,
        udp_reply_idle: Duration::from_secs(u64::from(config.udp_replies.idle_timeout_secs)),
        self_check_interval,
        graph: Arc::clone(&graph),
        host_view,
        dns: Arc::clone(&dns),
    });
    // After READY: a failure here (the spool cannot be opened) is logged
    // and the agent goes on enforcing without fleet export.
    let fleet = crate::fleet::export::spawn(
        &config.fleet,
        crate::fleet::export::Inputs {
            hub: Arc::clone(&hub),
            host: host_view_rx,
            cgroup_mount: mount.clone(),
            state_dir: config.state_dir.clone(),
            stats: Arc::clone(&metrics.fleet),
        },
    )
    .unwrap_or_else(|e| {
        tracing::error!("fleet export is off: {e:#}");
        None
    });
    Ok(Running {
        engine,
        hub,
        metrics,
        graph,
        state_dir: config.state_dir,
        pins: pins.current(),
        self_check_interval,
        signals,
        policy_changes,
        admin,
        watchdog,
        tasks: Tasks {
            reader,
            control,
            metrics_server: side.metrics_server,
            graph_upkeep: side.graph_upkeep,
            anomalies: side.anomalies,
            exporter: side.exporter,
            fleet,
            bpf_logger,
            flow_sweeper,
            dns,
        },
    })
}

/// Everything is pinned into a staging directory first, and made
/// `current` only once attached (see kernel/pins.rs). Returns the pin
/// root and the staging directory.
fn pin_maps(config: &Config, enforcer: &mut Enforcer) -> Result<(PinRoot, PathBuf)> {
    let pins = PinRoot(config.pin_dir.clone());
    pins.prepare().map_err(|e| anyhow!(e))?;
    pins::clean_leftovers(&pins);
    if pins.current().exists() {
        enforcer.take_over_from(pins.current());
    }
    let staging = pins.staging();
    enforcer.pin_maps(&staging)?;
    Ok((pins, staging))
}

/// The tasks that report on what the agent does, started once it enforces.
struct SideTasks {
    metrics_server: crate::metrics::MetricsServer,
    graph_upkeep: crate::graph::store::Upkeep,
    anomalies: Option<crate::anomaly::AnomalyTask>,
    exporter: Option<crate::export::Exporter>,
}

/// The metrics state, with every source it reads from, served on the
/// endpoint bound earlier; the service graph's upkeep, anomaly detection
/// and the OTLP exporter.
#[expect(
    clippy::too_many_arguments,
    reason = "each is one source the metrics read, handed over once at start"
)]
fn start_side_tasks(
    config: &Config,
    export: Option<crate::export::settings::Settings>,
    hub: &Arc<Hub>,
    graph: &Arc<crate::graph::Shared>,
    counters: KernelCounters,
    coverage: &Coverage,
    inventory: crate::metrics::Inventory,
    endpoint: crate::metrics::Endpoint,
    dns: &Arc<crate::dns::serve::Dns>,
) -> Result<(Arc<MetricsState>, SideTasks)> {
    let anomaly_stats = Arc::new(crate::anomaly::AnomalyStats::default());
    let export_stats = Arc::new(crate::export::ExportStats::default());
    let metrics = Arc::new(MetricsState::new(
        Sources {
            counters: Box::new(std::sync::Mutex::new(counters)),
            events: Arc::clone(&hub.stats),
            features: coverage
                .features()
                .into_iter()
                .map(|(name, active, _)| (name, active))
                .collect(),
            graph: Some(Arc::clone(graph)),
            anomalies: Some(Arc::clone(&anomaly_stats)),
            export: Some(Arc::clone(&export_stats)),
            dns: Some(Arc::clone(dns) as Arc<dyn crate::metrics::DnsSource>),
        },
        inventory,
    ));
    metrics.set_attached(true);
    let graph_upkeep =
        crate::graph::store::spawn_upkeep(Arc::clone(graph), config.state_dir.clone());
    let metrics_server = endpoint.serve(Arc::clone(&metrics))?;
    // Anomaly detection: counts the live events, reports deviations.
    let anomalies = crate::anomaly::spawn(
        config.anomaly.clone(),
        hub,
        config.state_dir.clone(),
        anomaly_stats,
    )
    .context("cannot start anomaly detection")?;
    let exporter = crate::export::spawn(&config.export, export, hub, export_stats)
        .map_err(|e| anyhow!("cannot start the OTLP exporter: {e}"))?;
    Ok((
        metrics,
        SideTasks {
            metrics_server,
            graph_upkeep,
            anomalies,
            exporter,
        },
    ))
}

/// Installs the signal handlers and the policy directory's watch, then
/// tells the service manager we are ready and starts its watchdog pings.
///
/// Handlers before READY: a SIGHUP (reload) or SIGTERM right after the
/// service manager hears we are up must not kill the agent. Likewise the
/// watch: a change right after READY must not be missed.
fn announce_ready(
    policy_dir: &std::path::Path,
    hub: &Arc<Hub>,
    status: &str,
) -> Result<(
    Signals,
    crate::policy_watch::PolicyWatch,
    crate::notify::Watchdog,
)> {
    let signals = Signals {
        term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        usr1: signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?,
    };
    let policy_changes = crate::policy_watch::PolicyWatch::start(policy_dir)?;
    super::heap::give_back("start");
    crate::notify::ready(status);
    // Pings while the event consumer lives and the main loop beats.
    let watchdog = crate::notify::Watchdog::start(Arc::clone(&hub.stats), RESCAN_INTERVAL);
    Ok((signals, policy_changes, watchdog))
}

/// Quarantines survive restarts: they are laid over the policy from the
/// first moment this agent enforces. A damaged file is set aside and the
/// pinned quarantines kept (fail closed).
fn recover_quarantines(
    config: &Config,
    mount: &std::path::Path,
    set: &PolicySet,
    compiled: CompiledPolicy,
) -> Result<(Quarantines, CompiledPolicy)> {
    let quarantines = crate::quarantine_recovery::at_start(
        &config.state_dir,
        &PinRoot(config.pin_dir.clone()).current(),
        mount,
        &compiled,
    );
    if quarantines.services.is_empty() {
        return Ok((quarantines, compiled));
    }
    for (name, allow) in &quarantines.services {
        warn!(service = %name, ?allow, "service is QUARANTINED (from the state directory)");
    }
    let compiled = kernel::compile(&quarantines.overlay(set)).map_err(|e| anyhow!("{e}"))?;
    Ok((quarantines, compiled))
}

/// The decision log and its writer; the service graph taps the hub before
/// the first event and starts from the state directory's copy
/// (docs/graph.md).
fn open_decision_log(
    config: &Config,
    set: &PolicySet,
) -> Result<(Arc<Hub>, Arc<crate::graph::Shared>)> {
    let group = events::group_id(&config.events.sink_group)
        .with_context(|| format!("events.sink_group = {:?}", config.events.sink_group))?;
    let sink = Sink::open_for_group(&config.events.sink, group)
        .with_context(|| format!("cannot open the decision log {}", config.events.sink))?;
    let hub = Arc::new(Hub::new(sink).context("cannot start the decision log writer")?);
    let graph = Arc::new(crate::graph::Shared::default());
    *graph.graph() = crate::graph::store::load(&config.state_dir);
    graph.set_policy(set);
    hub.add_tap(Arc::clone(&graph) as Arc<dyn events::Tap>);
    Ok((hub, graph))
}

/// Services whose cgroup exists now are written before attach; the rest
/// (and restarted units, with new cgroup ids) are picked up by the
/// periodic rescan in the main loop.
fn find_services(mount: &std::path::Path, compiled: &CompiledPolicy) -> ServiceTracker {
    let mut tracker = ServiceTracker::new(mount, compiled);
    tracker.rescan();
    for s in tracker.services.iter().filter(|s| s.cgroups.is_empty()) {
        warn!(service = %s.name, "{}; the service is managed as soon as its cgroup appears", s.explain(mount));
    }
    tracker
}

/// Loads the programs and writes the policy and the services found into
/// their maps; nothing is attached yet.
fn load_programs(
    config: &Config,
    compiled: &CompiledPolicy,
    tracker: &mut ServiceTracker,
) -> Result<(Enforcer, Option<JoinHandle<()>>)> {
    let resolved = resolved_services(tracker);
    crate::notify::status("starting: loading the eBPF programs");
    let mut enforcer = Enforcer::load(
        compiled,
        &LoadOptions {
            bpf_log: config.bpf_log,
            observe_unmanaged: config.events.observe_unmanaged,
            events_bytes: config.events.ring_buffer_bytes,
            udp_reply_idle: Duration::from_secs(u64::from(config.udp_replies.idle_timeout_secs)),
            udp_peers_per_service: config.udp_replies.per_service,
            max_cgroups: config.services.max_cgroups,
            flow_table: config.flows.table_size,
            sock_owners: config.flows.tcp_table_size,
            max_learnt: config.dns.max_learnt,
        },
    )?;
    let bpf_logger = if config.bpf_log {
        Some(start_bpf_logger(enforcer.ebpf_mut())?)
    } else {
        None
    };
    let failed = enforcer.write_policy(compiled.clone(), &resolved)?;
    tracker.applied(&failed);
    Ok((enforcer, bpf_logger))
}

/// The consumer starts before the programs attach, so that the first
/// decision already has a reader. Returns the counters the metrics read,
/// the channel that gives the decoder each new policy's names, and the
/// reader's task.
fn start_reader(
    enforcer: &mut Enforcer,
    compiled: &CompiledPolicy,
    hub: &Arc<Hub>,
) -> Result<(KernelCounters, watch::Sender<Arc<Names>>, JoinHandle<()>)> {
    let ring: RingBuf<MapData> = take_map(enforcer.ebpf_mut(), agent_common::maps::EVENTS)?;
    let counters = KernelCounters {
        verdicts: take_map(enforcer.ebpf_mut(), agent_common::maps::COUNTERS)?,
        lost: take_map(enforcer.ebpf_mut(), agent_common::maps::LOST)?,
    };
    let first_names = Arc::new(Names::from_policy(compiled));
    let (names_tx, names_rx) = watch::channel(Arc::clone(&first_names));
    let decoder = Decoder::new(first_names);
    let reader = events::spawn_reader(ring, decoder, names_rx, Arc::clone(hub))
        .context("cannot poll the event ring buffer")?;
    Ok((counters, names_tx, reader))
}

/// The stage that names each decision's executable, reading the names
/// the exec tracepoint kept (without them, from live processes only).
fn exe_names(enforcer: &mut Enforcer) -> crate::process::ExeNames {
    let map = take_map(enforcer.ebpf_mut(), agent_common::maps::EXE_NAMES);
    if let Err(e) = &map {
        tracing::warn!(error = %e, "exec names unavailable: a short-lived process's executable may show as null");
    }
    crate::process::ExeNames::new(map.ok())
}

/// Attaches the programs (pinning their links into `staging`), then
/// rescans once more.
///
/// A managed cgroup made between the first rescan and the attach of our
/// cgroup_mkdir program is in none of our maps (a previous agent's
/// program, still attached, put it in its own). Ours watches now, so one
/// more rescan finds every such cgroup, and the tracepoint every later
/// one. Before the take-over: the previous programs, which enforce on it
/// meanwhile, are detached only once ours do too.
fn attach(
    enforcer: &mut Enforcer,
    tracker: &mut ServiceTracker,
    mount: &std::path::Path,
    staging: &std::path::Path,
) -> Result<Coverage> {
    let coverage = enforcer.attach(mount, Some(staging))?;
    let late = tracker.rescan();
    if !late.is_empty() {
        let failed = enforcer.apply_service_changes(&late)?;
        tracker.applied(&failed);
        info!(
            changes = late.len(),
            "cgroups of managed services made or removed while the agent started are now enforced"
        );
    }
    Ok(coverage)
}

/// The DNS proxy of name rules, ready before our programs attach: the
/// previous agent's learnt addresses and lookups in flight copied in (so
/// that what it allowed stays allowed), and, if a service has name rules,
/// the kernel told where the proxy listens. It serves once the previous
/// programs are gone (`Dns::apply` after the take-over).
fn prepare_dns(
    config: &Config,
    set: &policy::PolicySet,
    enforcer: &mut Enforcer,
) -> Result<Arc<crate::dns::serve::Dns>> {
    let maps = crate::kernel::dns_maps::take(enforcer.ebpf_mut())?;
    let dns = Arc::new(crate::dns::serve::Dns::new(
        &config.dns,
        &config.state_dir,
        maps,
    )?);
    dns.prepare(set, &PinRoot(config.pin_dir.clone()).current())?;
    Ok(dns)
}

/// Makes the new pins current and, if a previous agent's were, takes over
/// from it (docs/operations.md, Upgrade); says what the kernel covers.
fn take_over(
    config: &Config,
    compiled: &CompiledPolicy,
    coverage: &Coverage,
    pins: &PinRoot,
    hub: &Arc<Hub>,
    dns: &crate::dns::serve::Dns,
) -> Result<()> {
    // The previous agent's names, before ours replace them: its leftover
    // events carry its service ids.
    let previous_names = crate::takeover::previous_names(&config.state_dir);
    crate::takeover::save_names(&config.state_dir, &Names::from_policy(compiled));
    match &coverage.cgroup_creation_reason {
        None => info!("new cgroups of managed services are enforced from their creation (cgroup_mkdir tracepoint)"),
        Some(reason) => warn!("{reason}"),
    }
    match pins.promote().context("cannot make the new pins current")? {
        Some(previous) => {
            crate::takeover::take_over(previous, previous_names, hub, |dir| dns.carry_over(dir));
        }
        None => {
            info!(pins = %pins.current().display(), "programs pinned: enforcement continues while the agent is stopped")
        }
    }
    match &coverage.packet_sockets_reason {
        None => info!("packet sockets (AF_PACKET) are judged through BPF LSM"),
        Some(reason) => warn!("packet sockets (AF_PACKET) are NOT judged: {reason}; a managed service can open one only with CAP_NET_RAW, which its unit should drop"),
    }
    Ok(())
}

/// The status line logged and sent with READY.
fn status_line(
    tracker: &ServiceTracker,
    set: &PolicySet,
    compiled: &CompiledPolicy,
    policy_dir: &std::path::Path,
) -> String {
    format!(
        "enforcing: {} of {} services managed, {} rules, from {}",
        tracker
            .services
            .iter()
            .filter(|s| s.state() == ServiceState::Managed)
            .count(),
        set.services.len(),
        compiled.rules.len(),
        policy_dir.display()
    )
}

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
fn start_bpf_logger(ebpf: &mut aya::Ebpf) -> Result<JoinHandle<()>> {
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
