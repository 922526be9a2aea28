//! The loopback DNS proxy: a service's query comes in (UDP or TCP), goes
//! to that service's own resolver over the same transport, and the answer
//! goes back to the client only after the addresses it gives for an
//! allowed name are in the learnt set. So the first connect() after a
//! lookup finds its address allowed.
//!
//! Who asked, and which resolver they meant, is the kernel's to say (the
//! connect/sendmsg hooks remember it per socket cookie:
//! docs/dns-names.md); until that exists it is a [`Router`] function the
//! caller gives. The proxy's own queries to resolvers come from the
//! agent's cgroup, which has no name rules, so they are never redirected
//! back to it.
//!
//! What the client gets:
//! - the resolver's answer, unchanged, when it answers the query;
//! - SERVFAIL when the resolver does not answer in time or cannot be
//!   reached (counted apart), so the client fails fast rather than waits;
//! - REFUSED when no service is known for the client (fail closed);
//! - FORMERR for a message that is not a single-question query, nothing
//!   for one without even a header.
//!
//! A truncated UDP answer (TC) is passed on without learning from it: the
//! client retries over TCP, and that answer, complete, teaches.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use domain::base::iana::Rcode;
use prometheus_client::metrics::histogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{watch, Semaphore},
    task::{JoinHandle, JoinSet},
    time::{timeout, Instant},
};

use super::{
    answer::{
        answers, error_reply, inspect, parse_query, without_addresses, AnswerAddress, AnswerError,
        DnsName,
    },
    learnt::{
        monotonic_now, Answered, Learnt, LearntCache, LearntSink, Nanos, RuleBits, ServiceId,
    },
    listen::Listening,
    name::NamePattern,
    observed::ObservedNames,
};

/// Largest DNS message (TCP length prefix; also the UDP receive buffer).
const MAX_MESSAGE: usize = 65_535;

/// Who is asking: the service, its resolver, the patterns of each of its
/// name rules (index i: bit i of the learnt entry's rules).
#[derive(Debug, Clone)]
pub struct Route {
    pub service: ServiceId,
    pub upstream: SocketAddr,
    pub rules: Arc<[Vec<NamePattern>]>,
}

/// Finds the [`Route`] of a client by the transport and address it asked
/// from (what the kernel recorded on the way: `DNS_CLIENTS`), and for a
/// UDP query the mark it came with (`dns::mark`; 0: none). `None`: no
/// service known, or not the one that sent this query: REFUSED.
pub type Router = Arc<dyn Fn(Transport, SocketAddr, Option<u32>) -> Option<Route> + Send + Sync>;

/// The proxy's limits.
#[derive(Debug, Clone, Copy)]
pub struct ProxyConfig {
    /// How long the resolver has to answer (glibc's own default timeout
    /// per try is 5 s; answering SERVFAIL sooner lets it move on).
    pub upstream_timeout: Duration,
    /// Queries (UDP) and connections (TCP) handled at once; beyond that UDP
    /// queries are dropped (counted; the client retries) and TCP accepts
    /// wait.
    pub max_in_flight: usize,
    /// How long a TCP client may stay silent between queries.
    pub tcp_idle: Duration,
    /// How often expired addresses are swept from the learnt set.
    pub sweep_every: Duration,
    /// When the sweep counts as stalled ([`SWEEP_STALLED`]).
    pub sweep_stalled: Duration,
}

/// The sweep is stalled when it last completed longer ago than this (it
/// runs every [`ProxyConfig::sweep_every`], 1 s). The kernel allows a
/// learnt address until the sweep removes it, so a stalled sweep leaves
/// expired addresses allowed: the proxy then learns nothing (a lookup gets
/// SERVFAIL), and the agent withholds its heartbeat, so that the kernel
/// stops redirecting lookups once it is stale (new names fail closed).
/// A sweep that left an expired address in the kernel map (a removal
/// refused, tried again at the next) is not complete.
pub const SWEEP_STALLED: Duration = Duration::from_secs(10);

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 1024,
            tcp_idle: Duration::from_secs(10),
            sweep_every: Duration::from_secs(1),
            sweep_stalled: SWEEP_STALLED,
        }
    }
}

/// What the proxy did, counted.
#[derive(Debug)]
pub struct ProxyStats {
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
    /// Answers from a resolver passed on.
    pub answered: AtomicU64,
    /// SERVFAIL: the resolver did not answer in time.
    pub upstream_timeouts: AtomicU64,
    /// SERVFAIL: the resolver could not be reached or closed on us.
    pub upstream_errors: AtomicU64,
    /// REFUSED: no service known for the client.
    pub unknown_clients: AtomicU64,
    /// FORMERR or nothing: not a single-question query.
    pub malformed_queries: AtomicU64,
    /// Answers passed on but not learnt from (malformed, CNAME loop).
    pub unreadable_answers: AtomicU64,
    /// UDP answers with TC passed on without learning.
    pub truncated: AtomicU64,
    /// Addresses learnt (new or refreshed) for an allowed name.
    pub learnt: AtomicU64,
    /// Addresses not learnt: the learnt set full, or the map refused.
    pub learn_failures: AtomicU64,
    /// UDP queries dropped because `max_in_flight` were being handled.
    pub overload_drops: AtomicU64,
    /// Answers whose addresses for an allowed name were trimmed to those
    /// learnt (more than `max_per_name`, or some not learnt).
    pub trimmed_answers: AtomicU64,
    /// Address records taken out of answers that way.
    pub trimmed_addresses: AtomicU64,
    /// Of `learn_failures`: the learnt set held `max_total` entries, by
    /// the service whose address was not learnt (bounded: services with
    /// name rules).
    learn_full: Mutex<BTreeMap<ServiceId, u64>>,
    /// Each query's outcome, by the service it was routed to (`None`:
    /// none known: no route, or dropped or malformed before routing). The
    /// keys are bounded: services with name rules, times [`Outcome`]s.
    lookups: Mutex<BTreeMap<(Option<ServiceId>, Outcome), u64>>,
    /// Seconds each answered lookup spent in the proxy, its resolver's
    /// own round trip not counted (see [`ADDED_BUCKETS`]).
    pub added_seconds: Histogram,
    /// `CLOCK_MONOTONIC` when the sweep last completed with every expired
    /// address removed (before the first: when the proxy started).
    pub last_sweep_ns: AtomicU64,
}

/// Upper bounds (seconds) of the added-latency histogram: 25 µs to about
/// 100 ms, doubling (the proxy adds some 75 µs median, 250 µs p99 on the
/// 2-core test machine: docs/dns-names.md, Added latency).
pub const ADDED_BUCKETS: [f64; 13] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_2, 0.000_4, 0.000_8, 0.001_6, 0.003_2, 0.006_4, 0.012_8,
    0.025_6, 0.051_2, 0.102_4,
];

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            udp_queries: AtomicU64::default(),
            tcp_queries: AtomicU64::default(),
            answered: AtomicU64::default(),
            upstream_timeouts: AtomicU64::default(),
            upstream_errors: AtomicU64::default(),
            unknown_clients: AtomicU64::default(),
            malformed_queries: AtomicU64::default(),
            unreadable_answers: AtomicU64::default(),
            truncated: AtomicU64::default(),
            learnt: AtomicU64::default(),
            learn_failures: AtomicU64::default(),
            overload_drops: AtomicU64::default(),
            trimmed_answers: AtomicU64::default(),
            trimmed_addresses: AtomicU64::default(),
            learn_full: Mutex::default(),
            lookups: Mutex::default(),
            added_seconds: Histogram::new(ADDED_BUCKETS),
            last_sweep_ns: AtomicU64::new(monotonic_now()),
        }
    }
}

impl ProxyStats {
    fn lookup(&self, service: Option<ServiceId>, outcome: Outcome) {
        *self
            .lookups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((service, outcome))
            .or_default() += 1;
    }

    fn full(&self, service: ServiceId) {
        *self
            .learn_full
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(service)
            .or_default() += 1;
    }

    /// Addresses not learnt because the learnt set was full, by service.
    #[must_use]
    pub fn full_by_service(&self) -> BTreeMap<ServiceId, u64> {
        self.learn_full
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Queries by (service, outcome), every pair seen so far.
    #[must_use]
    pub fn lookups(&self) -> Vec<(Option<ServiceId>, Outcome, u64)> {
        self.lookups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(&(service, outcome), &n)| (service, outcome, n))
            .collect()
    }
}

/// What became of one query (the `result` label of the lookup metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// The resolver's answer passed on (learnt from when readable).
    Answered,
    /// A truncated UDP answer passed on without learning.
    Truncated,
    /// REFUSED: no service known for the client.
    Refused,
    /// SERVFAIL: the resolver did not answer in time.
    ServfailTimeout,
    /// SERVFAIL: the resolver could not be reached or failed.
    ServfailError,
    /// SERVFAIL: the sweep of learnt addresses has stalled, so nothing is
    /// learnt (see [`SWEEP_STALLED`]); not forwarded.
    ServfailStalled,
    /// FORMERR: not a single-question query.
    Formerr,
    /// No reply: not even a DNS header.
    Ignored,
    /// A UDP query dropped: `max_in_flight` were being handled.
    Dropped,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Answered,
        Outcome::Truncated,
        Outcome::Refused,
        Outcome::ServfailTimeout,
        Outcome::ServfailError,
        Outcome::ServfailStalled,
        Outcome::Formerr,
        Outcome::Ignored,
        Outcome::Dropped,
    ];

    /// The metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Truncated => "truncated",
            Outcome::Refused => "refused",
            Outcome::ServfailTimeout => "servfail_timeout",
            Outcome::ServfailError => "servfail_error",
            Outcome::ServfailStalled => "servfail_stalled",
            Outcome::Formerr => "formerr",
            Outcome::Ignored => "ignored",
            Outcome::Dropped => "dropped",
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What a proxy's tasks share.
struct Shared<S> {
    router: Router,
    config: ProxyConfig,
    stats: ProxyStats,
    learnt: Mutex<(LearntCache, S)>,
    /// Names answered to services that only have their lookups observed.
    observed: Mutex<ObservedNames>,
    /// The first resolver the agent was not allowed to reach was logged.
    warned_denied: AtomicBool,
    /// The sweep's task runs (cleared as it ends: only a panic ends it).
    sweep_alive: AtomicBool,
}

impl<S> Shared<S> {
    fn sweep_age(&self, now: Nanos) -> Duration {
        let last = self.stats.last_sweep_ns.load(Ordering::Relaxed);
        Duration::from_nanos(now.saturating_sub(last))
    }

    fn sweeping(&self, now: Nanos) -> bool {
        self.sweep_alive.load(Ordering::Relaxed) && self.sweep_age(now) <= self.config.sweep_stalled
    }

    fn observed(&self) -> MutexGuard<'_, ObservedNames> {
        self.observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn learnt(&self) -> MutexGuard<'_, (LearntCache, S)> {
        // A panic while holding the lock leaves a consistent enough cache
        // (each step is a whole learn or release); keep serving.
        self.learnt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running proxy: UDP and TCP on each of its loopback addresses (one
/// per address family). Its tasks stop when it is dropped, queries and
/// connections in progress with them (each listener owns its in-flight
/// tasks in a `JoinSet`), or, gracefully, at [`Proxy::shutdown`].
pub struct Proxy<S> {
    addrs: Vec<SocketAddr>,
    shared: Arc<Shared<S>>,
    /// Tells the listeners to stop taking new queries.
    stop: watch::Sender<bool>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    sweeper: JoinHandle<()>,
}

impl<S: LearntSink + Send + 'static> Proxy<S> {
    /// Binds UDP and TCP on `addr` (port 0: one free port for both) and
    /// starts serving on the current tokio runtime.
    ///
    /// # Errors
    /// The sockets cannot be bound.
    pub async fn bind(
        addr: SocketAddr,
        router: Router,
        config: ProxyConfig,
        cache: LearntCache,
        sink: S,
    ) -> io::Result<Self> {
        Self::from_sockets(vec![Listening::bind(addr)?], router, config, cache, sink)
    }

    /// Serves on sockets bound by the caller (`dns::listen`): by the agent
    /// itself, or by systemd's socket unit, so that queries sent while the
    /// agent restarts wait in the socket instead of being lost. Must be
    /// called inside a tokio runtime.
    ///
    /// # Errors
    /// The sockets' addresses cannot be read, or they cannot be made
    /// non-blocking.
    pub fn from_sockets(
        sockets: Vec<Listening>,
        router: Router,
        config: ProxyConfig,
        cache: LearntCache,
        sink: S,
    ) -> io::Result<Self> {
        let limits = cache.limits();
        let shared = Arc::new(Shared {
            router,
            config,
            stats: ProxyStats::default(),
            observed: Mutex::new(ObservedNames::new(limits.max_total, limits.min_ttl)),
            learnt: Mutex::new((cache, sink)),
            warned_denied: AtomicBool::new(false),
            sweep_alive: AtomicBool::new(true),
        });
        let limit = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let (stop, stopped) = watch::channel(false);
        let mut addrs = Vec::new();
        let mut listeners = Vec::new();
        for Listening { udp, tcp } in sockets {
            addrs.push(udp.local_addr()?);
            super::mark::enable(&udp)?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            let (udp, tcp) = (UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?);
            listeners.push(tokio::spawn(serve_udp(
                Arc::new(udp),
                shared.clone(),
                limit.clone(),
                stopped.clone(),
            )));
            listeners.push(tokio::spawn(serve_tcp(
                tcp,
                shared.clone(),
                limit.clone(),
                stopped.clone(),
            )));
        }
        Ok(Self {
            addrs,
            sweeper: tokio::spawn(sweep(shared.clone())),
            shared,
            stop,
            listeners: Mutex::new(listeners),
        })
    }
}

impl<S> Proxy<S> {
    /// Where it listens (UDP and TCP): its first address.
    ///
    /// # Panics
    /// Never: a proxy is made with at least one address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every address it listens on.
    #[must_use]
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    #[must_use]
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// How long ago, at `now`, the sweep of learnt addresses last
    /// completed with every expired address removed.
    #[must_use]
    pub fn sweep_age(&self, now: Nanos) -> Duration {
        self.shared.sweep_age(now)
    }

    /// Whether learnt addresses' expiry is enforced at `now`: the sweep's
    /// task runs (it ends only by a panic) and completed within
    /// [`ProxyConfig::sweep_stalled`]. When not, nothing is learnt.
    #[must_use]
    pub fn sweeping(&self, now: Nanos) -> bool {
        self.shared.sweeping(now)
    }

    /// Drops and revokes what `service` learnt (see [`LearntCache::forget`]).
    ///
    /// # Errors
    /// A revoke the sink refused.
    pub fn forget(&self, service: ServiceId) -> Result<usize, super::learnt::SinkError>
    where
        S: LearntSink,
    {
        let mut guard = self.shared.learnt();
        let (cache, sink) = &mut *guard;
        cache.forget(sink, service)
    }

    /// The name `service` (one whose lookups are only observed) last
    /// looked up that answered `addr`, if not expired.
    #[must_use]
    pub fn observed_name(&self, service: ServiceId, addr: IpAddr) -> Option<DnsName> {
        self.shared
            .observed()
            .name_of(service, addr, monotonic_now())
            .cloned()
    }

    /// Looks at the learnt set and the sink under their lock.
    pub fn with_learnt<T>(&self, f: impl FnOnce(&LearntCache, &S) -> T) -> T {
        let guard = self.shared.learnt();
        f(&guard.0, &guard.1)
    }

    /// Stops taking queries and answers those already taken (each within
    /// the upstream timeout), waiting at most `within`. What was not read
    /// stays in the sockets: when the service manager holds them, the next
    /// agent answers it. A TCP client between queries is closed (it
    /// reconnects and lands in the accept queue).
    pub async fn shutdown(&self, within: Duration) {
        let _ = self.stop.send(true);
        let listeners = std::mem::take(
            &mut *self
                .listeners
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let aborts: Vec<_> = listeners.iter().map(JoinHandle::abort_handle).collect();
        let all = futures_util::future::join_all(listeners);
        if timeout(within, all).await.is_err() {
            aborts.iter().for_each(tokio::task::AbortHandle::abort);
            tracing::warn!(
                "dns proxy: lookups still in flight after {} ms are dropped (the clients retry)",
                within.as_millis()
            );
        }
    }
}

impl<S> Drop for Proxy<S> {
    fn drop(&mut self) {
        self.sweeper.abort();
        for task in self
            .listeners
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            task.abort();
        }
    }
}

async fn serve_udp<S: LearntSink + Send + 'static>(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared<S>>,
    limit: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        // recv_from is cancel-safe: a datagram is either read here or left
        // in the socket for whoever reads it next.
        let received = tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break,
            received = super::mark::recv_from(&socket, &mut buf) => received,
        };
        let (len, client, mark) = match received {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "dns proxy: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let received = Instant::now();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            bump(&shared.stats.overload_drops);
            shared.stats.lookup(None, Outcome::Dropped);
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, shared) = (socket.clone(), shared.clone());
        in_flight.spawn(async move {
            let _permit = permit;
            bump(&shared.stats.udp_queries);
            let from = (client, Some(mark));
            if let Some(reply) = handle(&shared, from, &query, Transport::Udp, received).await {
                if let Err(e) = socket.send_to(&reply, client).await {
                    tracing::warn!(%client, error = %e, "dns proxy: UDP reply not sent: the client gets no answer");
                }
            }
        });
    }
    while in_flight.join_next().await.is_some() {}
}

async fn serve_tcp<S: LearntSink + Send + 'static>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    limit: Arc<Semaphore>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut clients = JoinSet::new();
    loop {
        while clients.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break,
            permit = limit.clone().acquire_owned() => permit,
        };
        let Ok(permit) = permit else { break };
        // accept is cancel-safe: a connection not accepted stays queued.
        let accepted = tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, client) = match accepted {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "dns proxy: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let stopped = stopped.clone();
        clients.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_client(stream, client, &shared, stopped).await {
                tracing::debug!(%client, error = %e, "dns proxy: TCP client closed");
            }
        });
    }
    while clients.join_next().await.is_some() {}
}

/// Length-prefixed queries, one after another, until the client closes,
/// stays silent for `tcp_idle`, or the proxy stops.
async fn serve_tcp_client<S: LearntSink + Send + 'static>(
    mut stream: TcpStream,
    client: SocketAddr,
    shared: &Shared<S>,
    mut stopped: watch::Receiver<bool>,
) -> io::Result<()> {
    loop {
        // Between queries, a stopping proxy closes the connection; a query
        // already read is answered first.
        let next = tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => return Ok(()),
            next = timeout(shared.config.tcp_idle, read_framed(&mut stream)) => next,
        };
        let query = match next {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(got) => got?,
        };
        bump(&shared.stats.tcp_queries);
        match handle(
            shared,
            (client, None),
            &query,
            Transport::Tcp,
            Instant::now(),
        )
        .await
        {
            Some(reply) => write_framed(&mut stream, &reply).await?,
            None => return Ok(()),
        }
    }
}

async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    stream.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    stream.write_all(&framed).await
}

/// The transport a query came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Why the resolver gave no answer.
enum Upstream {
    TimedOut,
    Failed(io::Error),
}

/// One query: forward, learn, and say what the client gets (`None`:
/// nothing, the message had no header to answer). Counts its outcome by
/// service, and for an answer the time it spent here since `received`
/// less the resolver's round trip.
async fn handle<S: LearntSink>(
    shared: &Shared<S>,
    (client, mark): (SocketAddr, Option<u32>),
    query: &[u8],
    transport: Transport,
    received: Instant,
) -> Option<Vec<u8>> {
    let stats = &shared.stats;
    match parse_query(query) {
        Ok(_) => {}
        Err(AnswerError::Short(_)) => {
            bump(&stats.malformed_queries);
            stats.lookup(None, Outcome::Ignored);
            return None;
        }
        Err(_) => {
            bump(&stats.malformed_queries);
            // Who sent it, if known, for the metric only.
            let service = (shared.router)(transport, client, mark).map(|r| r.service);
            stats.lookup(service, Outcome::Formerr);
            return error_reply(query, Rcode::FORMERR);
        }
    }
    let Some(route) = (shared.router)(transport, client, mark) else {
        bump(&stats.unknown_clients);
        stats.lookup(None, Outcome::Refused);
        return error_reply(query, Rcode::REFUSED);
    };
    // With the sweep stalled an address learnt now would outlive its
    // expiry: nothing is learnt, and the client is told to fail.
    if !shared.sweeping(monotonic_now()) {
        stats.lookup(Some(route.service), Outcome::ServfailStalled);
        return error_reply(query, Rcode::SERVFAIL);
    }
    let deadline = Instant::now() + shared.config.upstream_timeout;
    let forwarded = match transport {
        Transport::Udp => forward_udp(route.upstream, query, deadline).await,
        Transport::Tcp => forward_tcp(route.upstream, query, deadline).await,
    };
    let (reply, upstream) = match forwarded {
        Ok(got) => got,
        Err(Upstream::TimedOut) => {
            bump(&stats.upstream_timeouts);
            stats.lookup(Some(route.service), Outcome::ServfailTimeout);
            return error_reply(query, Rcode::SERVFAIL);
        }
        Err(Upstream::Failed(e)) => {
            if e.kind() == io::ErrorKind::PermissionDenied
                && !shared.warned_denied.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(upstream = %route.upstream, "dns proxy: the agent may not reach this resolver ({e}): its lookups get SERVFAIL. Under the shipped unit, allow it with IPAddressAllow= in a drop-in (docs/dns-names.md). Said once.");
            }
            tracing::debug!(upstream = %route.upstream, error = %e, "dns proxy: resolver failed");
            bump(&stats.upstream_errors);
            stats.lookup(Some(route.service), Outcome::ServfailError);
            return error_reply(query, Rcode::SERVFAIL);
        }
    };
    let (reply, outcome) = learn_from(shared, &route, query, reply, transport);
    bump(&stats.answered);
    stats.lookup(Some(route.service), outcome);
    stats
        .added_seconds
        .observe(added_time(received.elapsed(), upstream).as_secs_f64());
    Some(reply)
}

/// The time a lookup spent in the proxy: all of it but the resolver's
/// round trip (from sending the query, or starting the TCP handshake, to
/// its answer). The proxy's own work counts: queueing, parsing, routing
/// (a kernel map lookup), the fresh upstream socket, learning (kernel map
/// writes); the send of the reply to the client does not.
fn added_time(total: Duration, upstream: Duration) -> Duration {
    total.saturating_sub(upstream)
}

/// Puts the answer's addresses for an allowed name into the learnt set
/// (and so the kernel's map) before the answer is sent, and returns the
/// answer the client gets: the resolver's, but for the addresses of an
/// allowed name that are not held once it is learnt (more than
/// `max_per_name` of them, or refused), which are taken out so that the
/// client cannot pick one the kernel denies. An answer none of whose
/// allowed addresses could be held is passed on whole (its connects are
/// denied, and the client sees why), as is one that cannot be rewritten.
fn learn_from<S: LearntSink>(
    shared: &Shared<S>,
    route: &Route,
    query: &[u8],
    reply: Vec<u8>,
    transport: Transport,
) -> (Vec<u8>, Outcome) {
    let stats = &shared.stats;
    let inspected = match inspect(query, &reply) {
        Ok(inspected) => inspected,
        Err(e) => {
            tracing::debug!(service = route.service, error = %e, "dns proxy: answer not learnt from");
            bump(&stats.unreadable_answers);
            return (reply, Outcome::Answered);
        }
    };
    if inspected.truncated && transport == Transport::Udp {
        bump(&stats.truncated);
        return (reply, Outcome::Truncated);
    }
    let now = monotonic_now();
    // A service with no name rules only has its lookups observed: the
    // names are noted for its events, nothing is learnt.
    if route.rules.is_empty() {
        let mut observed = shared.observed();
        for found in &inspected.addresses {
            observed.note(route.service, found.addr, &found.chain[0], found.ttl, now);
        }
        return (reply, Outcome::Answered);
    }
    let allowed: Vec<(&AnswerAddress, RuleBits)> = inspected
        .addresses
        .iter()
        .map(|found| (found, rule_bits(&route.rules, &found.chain)))
        .filter(|(_, rules)| *rules != 0)
        .collect();
    let Some((first, _)) = allowed.first() else {
        return (reply, Outcome::Answered);
    };
    // Every address answers the question's name (the first of its chain).
    let name = &first.chain[0];
    let answered: Vec<Answered> = allowed
        .iter()
        .map(|(found, rules)| Answered {
            addr: found.addr,
            ttl: found.ttl,
            rules: *rules,
        })
        .collect();
    let mut guard = shared.learnt();
    let (cache, sink) = &mut *guard;
    let results = cache.learn_answer(sink, route.service, name, &answered, now);
    for (found, result) in answered.iter().zip(results) {
        match result {
            Ok(Learnt::New | Learnt::Refreshed) => bump(&stats.learnt),
            Ok(Learnt::LeftOut) => {}
            Err(e) => {
                tracing::warn!(service = route.service, addr = %found.addr, error = %e, "dns proxy: address not learnt");
                bump(&stats.learn_failures);
                if matches!(e, super::learnt::LearnError::Full(_)) {
                    stats.full(route.service);
                }
            }
        }
    }
    let held: HashSet<IpAddr> = cache.addresses(route.service, name).into_iter().collect();
    drop(guard);
    let (kept, gone): (Vec<&AnswerAddress>, Vec<&AnswerAddress>) = allowed
        .iter()
        .map(|(found, _)| *found)
        .partition(|a| held.contains(&a.addr));
    if gone.is_empty() || kept.is_empty() {
        return (reply, Outcome::Answered);
    }
    let chain: HashSet<&DnsName> = allowed.iter().flat_map(|(a, _)| a.chain.iter()).collect();
    let gone: HashSet<IpAddr> = gone.iter().map(|a| a.addr).collect();
    let answer = match without_addresses(&reply, |owner, addr| {
        chain.contains(owner) && gone.contains(&addr)
    }) {
        // Compressed again with fewer records it is smaller; should it not
        // be, a UDP client's buffer might not take it: pass the original.
        Ok(trimmed) if transport == Transport::Udp && trimmed.len() > reply.len() => reply,
        Ok(trimmed) => {
            bump(&stats.trimmed_answers);
            stats
                .trimmed_addresses
                .fetch_add(gone.len() as u64, Ordering::Relaxed);
            trimmed
        }
        Err(e) => {
            tracing::warn!(service = route.service, error = %e, "dns proxy: an answer over the cap could not be trimmed; its evicted addresses will be denied");
            reply
        }
    };
    (answer, Outcome::Answered)
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Sends `query` from a socket of its own (so IDs of different clients
/// never collide) and takes the first datagram that answers it; others
/// (late answers, spoofing attempts) are ignored.
async fn forward_udp(
    upstream: SocketAddr,
    query: &[u8],
    deadline: Instant,
) -> Result<(Vec<u8>, Duration), Upstream> {
    let socket = UdpSocket::bind(unspecified_for(upstream))
        .await
        .map_err(Upstream::Failed)?;
    socket.connect(upstream).await.map_err(Upstream::Failed)?;
    let sent = Instant::now();
    socket.send(query).await.map_err(Upstream::Failed)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(Upstream::TimedOut),
            Ok(got) => got.map_err(Upstream::Failed)?,
        };
        if answers(query, &buf[..len]) {
            buf.truncate(len);
            return Ok((buf, sent.elapsed()));
        }
    }
}

async fn forward_tcp(
    upstream: SocketAddr,
    query: &[u8],
    deadline: Instant,
) -> Result<(Vec<u8>, Duration), Upstream> {
    // The handshake is the resolver's round trip too.
    let sent = Instant::now();
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream).await
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => Err(Upstream::TimedOut),
        Ok(Err(e)) => Err(Upstream::Failed(e)),
        Ok(Ok(reply)) if answers(query, &reply) => Ok((reply, sent.elapsed())),
        Ok(Ok(_)) => Err(Upstream::Failed(io::Error::new(
            io::ErrorKind::InvalidData,
            "the resolver's TCP answer is not for this query",
        ))),
    }
}

/// Clears its flag when dropped: as the sweep's task ends, by a panic
/// too (tokio drops a task's future when it panics).
struct ClearOnDrop<'a>(&'a AtomicBool);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Every how many sweeps the sink is swept too of what the cache does not
/// know (a walk of the whole kernel map), for as long as it holds some.
const UNKNOWN_SWEEP_EVERY: u32 = 10;

async fn sweep<S: LearntSink>(shared: Arc<Shared<S>>) {
    let mut tick = tokio::time::interval(shared.config.sweep_every);
    let mut round: u32 = 0;
    // What a start carried over from the previous agent goes by
    // `sweep_carried`, each entry at its expiry, and a revoke the kernel
    // refused is tried again there; the walk of the whole map is for
    // after a sweep of the cache that failed.
    let mut unknown = false;
    let _alive = ClearOnDrop(&shared.sweep_alive);
    loop {
        tick.tick().await;
        let mut guard = shared.learnt();
        let (cache, sink) = &mut *guard;
        let now = monotonic_now();
        shared.observed().sweep(now);
        let mut complete = true;
        if let Err(e) = cache.sweep(sink, now) {
            tracing::warn!(error = %e, "dns proxy: expired addresses not all removed");
            // A revoke that failed leaves an entry the cache forgot.
            unknown = true;
            complete = false;
        }
        let carried = sink.sweep_carried(now);
        if carried > 0 {
            tracing::debug!(
                removed = carried,
                "dns proxy: expired entries carried over from the previous agent removed"
            );
        }
        if unknown && round.is_multiple_of(UNKNOWN_SWEEP_EVERY) {
            let (removed, held) = sink.sweep_unknown(now);
            if removed > 0 {
                tracing::debug!(
                    removed,
                    "dns proxy: expired entries the cache did not hold removed from the kernel map"
                );
            }
            unknown = held.is_some_and(|held| held > cache.sink_entries());
        }
        // Removals the kernel refused, to be tried again: expired
        // addresses are still allowed.
        complete &= sink.pending_removals() == 0;
        drop(guard);
        if complete {
            shared
                .stats
                .last_sweep_ns
                .store(monotonic_now(), Ordering::Relaxed);
        }
        round = round.wrapping_add(1);
    }
}

/// The name rules (bit i: `rules[i]`) with a pattern matching a name on
/// the chain.
fn rule_bits(rules: &[Vec<NamePattern>], chain: &[DnsName]) -> RuleBits {
    rules
        .iter()
        .enumerate()
        .take(RuleBits::BITS as usize)
        .filter(|(_, patterns)| {
            chain
                .iter()
                .any(|name| patterns.iter().any(|p| p.matches(name.labels())))
        })
        .fold(0, |bits, (i, _)| bits | (1 << i))
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;
