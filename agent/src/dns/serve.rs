//! The DNS proxy in the daemon: bound on loopback at start, told to the
//! kernel (DNS_PROXY, with a heartbeat each second), routing each query by
//! what the kernel recorded about its sender (DNS_CLIENTS), learning into
//! the kernel's LEARNT map. It also names what it learnt: `dst_name` on
//! the events of decisions to learnt addresses ([`DstNames`], a stage of
//! the event hub) and the proxy's metrics ([`Dns::observed`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use agent_common::{dns_mark, DnsOrigin, PROTO_TCP, PROTO_UDP};
use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use super::{
    learnt::{monotonic_now, LearntCache, LearntLimits, LearntSink, Nanos, RuleBits, ServiceId},
    listen::{self, Listening},
    name::NamePattern,
    proxy::{Outcome, Proxy, ProxyConfig, Route, Router, Transport},
};
use crate::{
    config::DnsConfig,
    events::{Direction, EventType, FlowEvent, Stage, Verdict},
    kernel::dns_maps::{ip_of, DnsClients, DnsMaps, Learnt},
    policy::PolicySet,
};

/// How often the proxy tells the kernel it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How often the learnt cache is saved for the next agent when it
/// changed (and at stop): what a crash loses is at most this much of the
/// names of what the pinned map carries over.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Each service's name rules, by its stable key: what a route carries.
pub type NameRules = Arc<RwLock<HashMap<ServiceId, Arc<[Vec<NamePattern>]>>>>;

/// The name rules of every service in `set` whose lookups go through the
/// proxy, by its stable key, in rule order: bit i of a learnt entry is the
/// i-th. A service that only has its lookups observed has none.
pub fn name_rules(set: &PolicySet) -> HashMap<ServiceId, Arc<[Vec<NamePattern>]>> {
    set.services
        .iter()
        .filter(|service| service.through_proxy())
        .map(|service| {
            let rules: Vec<Vec<NamePattern>> =
                service.name_rules().map(|(_, r)| r.names.clone()).collect();
            (service.names_key(), rules.into())
        })
        .collect()
}

/// LEARNT as the learnt cache's sink.
pub struct KernelSink(Learnt);

impl LearntSink for KernelSink {
    fn allow(
        &mut self,
        service: ServiceId,
        addr: std::net::IpAddr,
        until: Nanos,
        rules: RuleBits,
    ) -> Result<(), super::learnt::SinkError> {
        self.0
            .allow(service, addr, until, rules)
            .map_err(|e| super::learnt::SinkError(e.to_string()))
    }

    fn revoke(
        &mut self,
        service: ServiceId,
        addr: std::net::IpAddr,
    ) -> Result<(), super::learnt::SinkError> {
        self.0
            .revoke(service, addr)
            .map_err(|e| super::learnt::SinkError(e.to_string()))
    }

    /// Every expired entry of the kernel map: the cache has already
    /// dropped its own (it sweeps first, under the same lock), so what is
    /// left expired is what it never knew.
    fn sweep_unknown(&mut self, now: Nanos) -> (usize, Option<usize>) {
        let removed = self.0.sweep(now);
        (removed, Some(self.0.count()))
    }

    fn sweep_carried(&mut self, now: Nanos) -> usize {
        self.0.sweep_carried(now)
    }

    fn pending_removals(&self) -> usize {
        self.0.pending_removals()
    }
}

/// The proxy of name rules in the daemon: started when a service first
/// has name rules (at start or on a reload), so a host without them has
/// no DNS listener unless the service manager passed its sockets; told to
/// the kernel with a heartbeat each second.
pub struct Dns {
    config: DnsConfig,
    /// Where the learnt cache is saved (`dns::saved`).
    state_dir: PathBuf,
    rules: NameRules,
    /// The service name of every key that ever had name rules (a metric's
    /// label; kept after the service goes so its counters keep their name).
    labels: RwLock<HashMap<ServiceId, Arc<str>>>,
    state: Mutex<State>,
}

/// What the proxy counted, with services by name, for a scrape.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Queries by service (empty: none known) and outcome.
    pub lookups: Vec<(Arc<str>, Outcome, u64)>,
    /// Distinct addresses learnt now, by service (every service with name
    /// rules, 0 included).
    pub learnt: Vec<(Arc<str>, u64)>,
    /// Addresses evicted because one (service, name) held `max_per_name`,
    /// by service (every service with name rules, 0 included).
    pub evicted_per_name: Vec<(Arc<str>, u64)>,
    /// Addresses of answers not learnt (and left out of the answer)
    /// because their name held `max_per_name` addresses in use, by service
    /// (the same services).
    pub left_out_per_name: Vec<(Arc<str>, u64)>,
    /// Addresses not learnt because `max_learnt` were held, by service
    /// (the same services).
    pub refused_full: Vec<(Arc<str>, u64)>,
    /// Addresses not learnt because the kernel map refused the write.
    pub map_errors: u64,
    /// Addresses dropped by the sweep because they expired.
    pub expired: u64,
    /// Seconds each answered lookup spent in the proxy, the resolver's
    /// round trip not counted.
    pub added_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Seconds since the sweep of learnt addresses last completed.
    pub sweep_age_seconds: f64,
}

enum State {
    /// Not serving yet: before the take-over at start, or waiting for the
    /// first name rule.
    Idle(Box<Waiting>),
    Running(Running),
    /// Stopped with the agent, or a start failed past taking the maps.
    Gone,
}

/// The maps, and the sockets once there are some.
struct Waiting {
    maps: DnsMaps,
    sockets: Vec<Listening>,
    /// The sockets came from the service manager (they outlive us).
    passed: bool,
    /// The kernel has been told where they are.
    announced: bool,
    /// The previous agent's names of what the map carried over, restored
    /// by [`Dns::prepare`] so that its leftover decisions, read before we
    /// serve, are named too.
    cache: Option<LearntCache>,
}

struct Running {
    proxy: Arc<Proxy<KernelSink>>,
    heartbeat: JoinHandle<()>,
    saver: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.saver.abort();
    }
}

impl Dns {
    /// Takes the proxy's sockets if the service manager passed them
    /// (`bulkhead-dns.socket`).
    ///
    /// # Errors
    /// Sockets were passed but are not usable (docs/dns-names.md): the
    /// agent does not start half-listening.
    pub fn new(config: &DnsConfig, state_dir: &Path, maps: DnsMaps) -> Result<Self> {
        let sockets = listen::passed().context("the DNS proxy's sockets")?;
        let passed = !sockets.is_empty();
        if passed {
            let addrs: Vec<String> = sockets
                .iter()
                .filter_map(|l| l.addr().ok())
                .map(|a| a.to_string())
                .collect();
            info!(
                listen = %addrs.join(" "),
                "DNS proxy: sockets passed by the service manager (lookups made while the agent restarts wait in them); [dns] listen is not used"
            );
        }
        Ok(Self {
            config: config.clone(),
            state_dir: state_dir.to_path_buf(),
            rules: NameRules::default(),
            labels: RwLock::default(),
            state: Mutex::new(State::Idle(Box::new(Waiting {
                maps,
                sockets,
                passed,
                announced: false,
                cache: None,
            }))),
        })
    }

    /// Before our programs attach: copies what a previous agent (its pins
    /// under `previous`) learnt and saw in flight, and, if `set` has name
    /// rules, tells the kernel where the proxy listens, so that our
    /// programs redirect from their first run. Serving waits for
    /// [`Self::apply`].
    ///
    /// # Errors
    /// The proxy's sockets cannot be bound, or the kernel map not written.
    pub fn prepare(&self, set: &PolicySet, previous: &Path) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let State::Idle(waiting) = &mut *state else {
            return Ok(());
        };
        let restored = waiting.maps.learnt.restore_from(previous, monotonic_now());
        if restored > 0 {
            info!(
                restored,
                "learnt addresses of name rules carried over from the previous agent"
            );
        }
        waiting.maps.carry_over_lookups(previous);
        if set
            .services
            .iter()
            .any(crate::policy::Service::through_proxy)
        {
            waiting.announce(&self.config)?;
            // The take-over reads the previous agent's decisions before we
            // serve: the names must be known by then.
            self.set_rules(set);
            let mut cache = self.new_cache();
            self.restore(&mut cache, &waiting.maps.learnt);
            waiting.cache = Some(cache);
        }
        Ok(())
    }

    /// Just before the previous agent's programs are detached, and again
    /// once they are: copies the lookups they saw (see
    /// [`DnsMaps::carry_over_lookups`]).
    pub fn carry_over(&self, previous: &Path) {
        if let State::Idle(waiting) =
            &mut *self.state.lock().unwrap_or_else(PoisonError::into_inner)
        {
            let n = waiting.maps.carry_over_lookups(previous);
            if n > 0 {
                info!(
                    entries = n,
                    "lookups in flight under the previous agent carried over"
                );
            }
        }
    }

    /// Makes `set`'s name rules the ones queries are learnt by, starting
    /// the proxy if this is the first time a service has some. A service
    /// whose name rules changed (or went) loses what it learnt: an
    /// address's rule bits are positions in the old rule list, and an
    /// address of a name no longer allowed must not stay allowed. Its next
    /// lookups learn again (fail closed meanwhile).
    ///
    /// # Errors
    /// The proxy was needed and could not start (its address taken, or
    /// the kernel map not writable): services with name rules then have
    /// no lookup learnt, which fails closed.
    pub fn apply(&self, set: &PolicySet) -> Result<()> {
        let new = name_rules(set);
        self.set_labels(set, &new);
        let needed = !new.is_empty();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Called first after the take-over's last copy: what the copies
        // kept to decide between the two agents' entries is done with.
        if let State::Idle(waiting) = &mut *state {
            waiting.maps.end_carry_over();
        }
        {
            let mut rules = self.rules.write().unwrap_or_else(PoisonError::into_inner);
            if let State::Running(running) = &*state {
                for (service, old) in rules.iter() {
                    if new.get(service) != Some(old) {
                        match running.proxy.forget(*service) {
                            Ok(0) => {}
                            Ok(n) => info!(service, forgotten = n, "name rules changed: the addresses this service learnt are revoked until it looks them up again"),
                            Err(e) => warn!(service, "name rules changed, but a learnt address could not be revoked ({e}); the next sweep tries again"),
                        }
                    }
                }
            }
            *rules = new;
        }
        // Started with the rules in place: the first queries it reads may
        // have waited in its sockets.
        if needed {
            if let State::Idle(_) = *state {
                let State::Idle(waiting) = std::mem::replace(&mut *state, State::Gone) else {
                    unreachable!("matched Idle above");
                };
                *state = State::Running(self.start(*waiting)?);
            }
        }
        Ok(())
    }

    /// Before the proxy runs: `set`'s name rules and labels, as
    /// [`Self::apply`] sets them, with nothing to forget yet.
    fn set_rules(&self, set: &PolicySet) {
        let new = name_rules(set);
        self.set_labels(set, &new);
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    fn set_labels<V>(&self, set: &PolicySet, new: &HashMap<ServiceId, V>) {
        let mut labels = self.labels.write().unwrap_or_else(PoisonError::into_inner);
        for service in &set.services {
            let key = service.names_key();
            if new.contains_key(&key) {
                labels.insert(key, Arc::from(service.name.as_str()));
            }
        }
    }

    fn new_cache(&self) -> LearntCache {
        LearntCache::new(LearntLimits {
            min_ttl: Duration::from_secs(u64::from(self.config.min_ttl_secs)),
            max_per_name: self.config.max_per_name as usize,
            max_total: self.config.max_learnt as usize,
        })
    }

    /// Stops the proxy (the agent stops): it takes no more queries and
    /// answers those it took; the rest wait in its sockets if the service
    /// manager holds them (the next agent answers them), or are lost (the
    /// clients retry). After the grace the kernel stops redirecting;
    /// learnt addresses stay in the pinned map.
    pub async fn stop(&self) {
        let old = std::mem::replace(
            &mut *self.state.lock().unwrap_or_else(PoisonError::into_inner),
            State::Gone,
        );
        if let State::Running(running) = old {
            let within = Duration::from_millis(u64::from(self.config.upstream_timeout_ms))
                + Duration::from_millis(500);
            running.proxy.shutdown(within).await;
            running.saver.abort();
            let entries = running.proxy.with_learnt(|cache, _| cache.entries());
            super::saved::save(&self.state_dir, &entries);
        }
    }

    fn proxy(&self) -> Option<Arc<Proxy<KernelSink>>> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            State::Running(running) => Some(Arc::clone(&running.proxy)),
            State::Idle(_) | State::Gone => None,
        }
    }

    /// What the proxy counted; `None` while it is not running (no service
    /// has had name rules, or the agent stops).
    #[must_use]
    pub fn observed(&self) -> Option<Observed> {
        let proxy = self.proxy()?;
        let stats = proxy.stats();
        let labels = self.labels.read().unwrap_or_else(PoisonError::into_inner);
        let label = |key: Option<ServiceId>| -> Arc<str> {
            key.and_then(|k| labels.get(&k).cloned())
                .unwrap_or_else(|| Arc::from(""))
        };
        let lookups = stats
            .lookups()
            .into_iter()
            .map(|(service, outcome, n)| (label(service), outcome, n))
            .collect();
        let (by_service, evictions, left_out, expired) = proxy.with_learnt(|cache, _| {
            (
                cache.addresses_by_service(),
                cache.evictions_by_service(),
                cache.left_out_by_service(),
                cache.expirations(),
            )
        });
        let with_rules: Vec<ServiceId> = self
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        // Every service with name rules (0 included), and any other that
        // has a count (its rules since gone).
        let per_service = |counts: Vec<(ServiceId, u64)>| -> Vec<(Arc<str>, u64)> {
            let mut out: Vec<(Arc<str>, u64)> =
                with_rules.iter().map(|k| (label(Some(*k)), 0)).collect();
            for (key, n) in counts {
                let name = label(Some(key));
                match out.iter_mut().find(|(l, _)| *l == name) {
                    Some(entry) => entry.1 = n,
                    None => out.push((name, n)),
                }
            }
            out.sort();
            out
        };
        let learnt = per_service(
            by_service
                .into_iter()
                .map(|(k, n)| (k, u64::try_from(n).unwrap_or(u64::MAX)))
                .collect(),
        );
        let full = stats.full_by_service();
        let full_total: u64 = full.values().sum();
        Some(Observed {
            lookups,
            learnt,
            evicted_per_name: per_service(evictions.into_iter().collect()),
            left_out_per_name: per_service(left_out.into_iter().collect()),
            refused_full: per_service(full.into_iter().collect()),
            map_errors: stats
                .learn_failures
                .load(Ordering::Relaxed)
                .saturating_sub(full_total),
            expired,
            added_seconds: stats.added_seconds.clone(),
            sweep_age_seconds: proxy.sweep_age(monotonic_now()).as_secs_f64(),
        })
    }

    /// The name `service` looked up that gave `addr`, if it holds it now.
    #[must_use]
    pub fn name_of(&self, service: &str, addr: std::net::IpAddr) -> Option<String> {
        // The service's key now (it follows its name rules).
        let key = {
            let labels = self.labels.read().unwrap_or_else(PoisonError::into_inner);
            let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
            *rules
                .keys()
                .find(|k| labels.get(k).is_some_and(|l| &**l == service))?
        };
        self.with_cache(|cache| cache.name_of(key, addr).map(ToString::to_string))
            .flatten()
    }

    /// Looks at the learnt cache: the proxy's, or before it serves the one
    /// [`Self::prepare`] restored (the previous agent's decisions are read
    /// then). `None`: there is none.
    fn with_cache<T>(&self, f: impl FnOnce(&LearntCache) -> T) -> Option<T> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            State::Running(running) => Some(running.proxy.with_learnt(|cache, _| f(cache))),
            State::Idle(waiting) => waiting.cache.as_ref().map(f),
            State::Gone => None,
        }
    }

    fn start(&self, mut waiting: Waiting) -> Result<Running> {
        waiting.announce(&self.config)?;
        let Waiting {
            maps,
            sockets,
            passed,
            cache,
            ..
        } = waiting;
        let DnsMaps {
            clients,
            learnt,
            mut beat,
            ..
        } = maps;
        let router = router(clients, Arc::clone(&self.rules));
        // Restored by `prepare` when the policy had name rules at start;
        // else (they came with a reload) now, by the rules in place.
        let cache = cache.unwrap_or_else(|| {
            let mut cache = self.new_cache();
            self.restore(&mut cache, &learnt);
            cache
        });
        let proxy_config = ProxyConfig {
            upstream_timeout: Duration::from_millis(u64::from(self.config.upstream_timeout_ms)),
            ..ProxyConfig::default()
        };
        let proxy = Proxy::from_sockets(sockets, router, proxy_config, cache, KernelSink(learnt))
            .context("cannot serve on the DNS proxy's sockets")?;
        let listen: Vec<String> = proxy.addrs().iter().map(ToString::to_string).collect();
        info!(
            listen = %listen.join(" "),
            held = passed,
            "DNS proxy: lookups of services with name rules go through it"
        );
        // Lookups that never leave a service on port 53 teach nothing.
        super::host::warn_host_bypasses();
        let proxy = Arc::new(proxy);
        let watched = Arc::clone(&proxy);
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            let mut failing = false;
            let mut stalled = false;
            loop {
                tick.tick().await;
                let now = monotonic_now();
                // The kernel allows a learnt address until the sweep
                // removes it: with the sweep stalled, no beat, so that
                // nothing new is learnt once the heartbeat is stale.
                if !watched.sweeping(now) {
                    if !stalled {
                        stalled = true;
                        error!(
                            last_sweep_secs_ago = watched.sweep_age(now).as_secs(),
                            "DNS proxy: the sweep of learnt addresses has stopped: lookups get SERVFAIL and nothing is learnt; its heartbeat is withheld, so the kernel stops redirecting lookups within 30 s (new names fail closed) and expired learnt addresses stay allowed until an agent sweeps them: restart the agent"
                        );
                    }
                    continue;
                }
                if stalled {
                    stalled = false;
                    info!("DNS proxy: the sweep of learnt addresses runs again; heartbeat resumed");
                }
                match beat.beat(now) {
                    Ok(()) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        warn!("DNS proxy: cannot write its heartbeat: {e}; the kernel stops redirecting lookups after 30 s");
                    }
                    Err(_) => {}
                }
            }
        });
        let saver = tokio::spawn(save_changes(Arc::clone(&proxy), self.state_dir.clone()));
        Ok(Running {
            proxy,
            heartbeat,
            saver,
        })
    }

    /// Gives `cache` back the names of what the map carried over, from
    /// what the previous agent saved (see `dns::saved`).
    fn restore(&self, cache: &mut LearntCache, map: &Learnt) {
        let saved = super::saved::load(&self.state_dir);
        if saved.is_empty() {
            return;
        }
        let held: HashMap<(ServiceId, std::net::IpAddr), (Nanos, RuleBits)> = map
            .entries()
            .into_iter()
            .map(|(service, addr, v)| ((service, addr), (v.expires_ns, v.rules)))
            .collect();
        let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
        let offered = saved.len();
        let restored = cache.restore(
            saved,
            |service, addr| held.get(&(service, addr)).copied(),
            |service| rules.contains_key(&service),
            monotonic_now(),
        );
        info!(
            restored,
            offered,
            "DNS names of the learnt addresses carried over restored from the previous agent"
        );
    }
}

/// Saves the learnt cache every [`SAVE_EVERY`] when it changed.
async fn save_changes(proxy: Arc<Proxy<KernelSink>>, state_dir: PathBuf) {
    let mut tick = tokio::time::interval(SAVE_EVERY);
    let mut saved = None;
    loop {
        tick.tick().await;
        let changes = proxy.with_learnt(|cache, _| cache.changes());
        if saved == Some(changes) {
            continue;
        }
        let entries = proxy.with_learnt(|cache, _| cache.entries());
        let dir = state_dir.clone();
        if tokio::task::spawn_blocking(move || super::saved::save(&dir, &entries))
            .await
            .is_ok()
        {
            saved = Some(changes);
        }
    }
}

impl Waiting {
    /// Binds the sockets if none were passed, and tells the kernel where
    /// they are (and that the proxy is alive): from then on our programs
    /// redirect, and a lookup waits in the sockets until we serve.
    fn announce(&mut self, config: &DnsConfig) -> Result<()> {
        if self.announced {
            return Ok(());
        }
        if self.sockets.is_empty() {
            self.sockets.push(
                Listening::bind(config.listen)
                    .with_context(|| format!("cannot bind the DNS proxy on {}", config.listen))?,
            );
            match Listening::bind(config.listen6) {
                Ok(v6) => self.sockets.push(v6),
                Err(e) => warn!(
                    listen6 = %config.listen6,
                    "DNS proxy: cannot listen on IPv6 ({e}): lookups sent to IPv6 resolvers are not redirected, so they teach nothing (connects to their names are denied)"
                ),
            }
        }
        let mut v4 = None;
        let mut v6 = None;
        for socket in &self.sockets {
            match socket.addr().context("the DNS proxy's socket address")? {
                a @ SocketAddr::V4(_) => v4 = v4.or(Some(a)),
                a @ SocketAddr::V6(_) => v6 = v6.or(Some(a)),
            }
        }
        self.maps.beat.set_addresses(v4, v6);
        self.maps
            .beat
            .beat(monotonic_now())
            .context("cannot write the DNS proxy's address into the kernel")?;
        self.announced = true;
        Ok(())
    }
}

/// A query's route: the service and resolver the kernel recorded for its
/// sender, with that service's name rules now.
fn router(clients: DnsClients, rules: NameRules) -> Router {
    Arc::new(move |transport, client, mark| {
        let protocol = match transport {
            Transport::Udp => PROTO_UDP,
            Transport::Tcp => PROTO_TCP,
        };
        let origin: DnsOrigin = clients.get(protocol, client)?;
        // The entry is the last query's from this address and port; a UDP
        // query that waited may be another service's, whose socket had
        // the port before (its mark says which).
        if mark.is_some_and(|mark| mark != dns_mark(origin.name_key)) {
            tracing::debug!(%client, "dns proxy: a query's mark is not its client entry's service: refused");
            return None;
        }
        let service_rules = rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&origin.name_key)
            .cloned()?;
        Some(Route {
            service: origin.name_key,
            upstream: SocketAddr::new(ip_of(origin.family, origin.addr), origin.port),
            rules: service_rules,
        })
    })
}

/// The event hub's stage that names learnt destinations: an egress
/// decision allowed to an address the service's own lookup taught (and
/// still holds) gets `dst_name`, the name it looked up. The events
/// pipeline only knows the [`Stage`] trait, never the proxy.
pub struct DstNames(pub Arc<Dns>);

/// Whether `ev` may be given `dst_name`: an allowed or audited egress
/// call (its first, a verdict, or later ones, a flow summary) of a
/// service, with its destination, or an outgoing TCP connection's
/// establishment or close (whose bytes the fleet's rows and the graph
/// count under the name too; the byte summaries of an open connection
/// are copies of its establishment, named with it). (An audited call is
/// named only for a service whose lookups are observed, below.)
fn may_name(ev: &FlowEvent) -> bool {
    let call = matches!(ev.kind, EventType::Verdict | EventType::Flow)
        && matches!(ev.verdict, Some(Verdict::Allow | Verdict::Audit));
    let connection = matches!(ev.kind, EventType::TcpEstablished | EventType::TcpClosed);
    (call || connection)
        && ev.traffic_direction == Some(Direction::Egress)
        && ev.service.is_some()
        && ev.dst_ip.is_some()
        && ev.dst_name.is_none()
}

impl Stage for DstNames {
    fn amend(&self, batch: &mut [FlowEvent]) {
        if !batch.iter().any(may_name) {
            return;
        }
        // Each service's key now, by its name (the key follows its name
        // rules), and whether it only has its lookups observed (no name
        // rules).
        let keys: HashMap<Arc<str>, (ServiceId, bool)> = {
            let rules = self.0.rules.read().unwrap_or_else(PoisonError::into_inner);
            if rules.is_empty() {
                return;
            }
            let labels = self.0.labels.read().unwrap_or_else(PoisonError::into_inner);
            rules
                .iter()
                .filter_map(|(k, r)| Some((Arc::clone(labels.get(k)?), (*k, r.is_empty()))))
                .collect()
        };
        let key_of = |ev: &FlowEvent| {
            let (Some(service), Some(addr)) = (&ev.service, ev.dst_ip) else {
                return None;
            };
            keys.get(&**service)
                .map(|&(key, observed)| (key, observed, addr.to_canonical()))
        };
        // Learnt names: decisions a name rule (or an address rule) allowed.
        self.0.with_cache(|cache| {
            for ev in batch.iter_mut().filter(|ev| may_name(ev)) {
                if let Some((key, false, addr)) = key_of(ev) {
                    if ev.verdict != Some(Verdict::Audit) {
                        ev.dst_name = cache.name_of(key, addr).map(|n| Arc::from(n.to_string()));
                    }
                }
            }
        });
        let Some(proxy) = self.0.proxy() else {
            return;
        };
        // Observed names: any decision of such a service (audit mode
        // included: that is where `learn` reads from).
        for ev in batch.iter_mut().filter(|ev| may_name(ev)) {
            if let Some((key, true, addr)) = key_of(ev) {
                ev.dst_name = proxy
                    .observed_name(key, addr)
                    .map(|n| Arc::from(n.to_string()));
            }
        }
    }
}
