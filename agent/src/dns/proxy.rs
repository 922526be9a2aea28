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
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use domain::base::iana::Rcode;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::{timeout, Instant},
};

use super::{
    answer::{
        answers, error_reply, inspect, parse_query, without_addresses, AnswerAddress, AnswerError,
        DnsName,
    },
    learnt::{monotonic_now, Answered, LearntCache, LearntSink, RuleBits, ServiceId},
    name::NamePattern,
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
/// from (what the kernel recorded on the way: `DNS_CLIENTS`). `None`: no
/// service known, REFUSED.
pub type Router = Arc<dyn Fn(Transport, SocketAddr) -> Option<Route> + Send + Sync>;

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
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            upstream_timeout: Duration::from_secs(2),
            max_in_flight: 1024,
            tcp_idle: Duration::from_secs(10),
            sweep_every: Duration::from_secs(1),
        }
    }
}

/// What the proxy did, counted.
#[derive(Debug, Default)]
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
}

impl<S> Shared<S> {
    fn learnt(&self) -> MutexGuard<'_, (LearntCache, S)> {
        // A panic while holding the lock leaves a consistent enough cache
        // (each step is a whole learn or release); keep serving.
        self.learnt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running proxy: UDP and TCP on one loopback address and port. Its
/// tasks stop when it is dropped, queries and connections in progress
/// with them (each listener owns its in-flight tasks in a `JoinSet`).
pub struct Proxy<S> {
    addr: SocketAddr,
    shared: Arc<Shared<S>>,
    tasks: Vec<JoinHandle<()>>,
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
        Self::bind_now(addr, router, config, cache, sink)
    }

    /// [`Self::bind`] from a synchronous caller inside the runtime (a
    /// policy reload that brings the first name rule).
    ///
    /// # Errors
    /// The sockets cannot be bound.
    pub fn bind_now(
        addr: SocketAddr,
        router: Router,
        config: ProxyConfig,
        cache: LearntCache,
        sink: S,
    ) -> io::Result<Self> {
        let (udp, tcp) = bind_pair_now(addr)?;
        Self::from_sockets(udp, tcp, router, config, cache, sink)
    }

    /// Serves on sockets bound elsewhere: by systemd's socket unit, or
    /// handed over by the previous agent, so that queries sent while the
    /// agent restarts wait in the socket instead of being refused.
    ///
    /// # Errors
    /// The sockets' addresses cannot be read.
    pub fn from_sockets(
        udp: UdpSocket,
        tcp: TcpListener,
        router: Router,
        config: ProxyConfig,
        cache: LearntCache,
        sink: S,
    ) -> io::Result<Self> {
        let addr = udp.local_addr()?;
        let shared = Arc::new(Shared {
            router,
            config,
            stats: ProxyStats::default(),
            learnt: Mutex::new((cache, sink)),
        });
        let limit = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        let tasks = vec![
            tokio::spawn(serve_udp(Arc::new(udp), shared.clone(), limit.clone())),
            tokio::spawn(serve_tcp(tcp, shared.clone(), limit)),
            tokio::spawn(sweep(shared.clone())),
        ];
        Ok(Self {
            addr,
            shared,
            tasks,
        })
    }
}

impl<S> Proxy<S> {
    /// Where it listens (UDP and TCP).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
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

    /// Looks at the learnt set and the sink under their lock.
    pub fn with_learnt<T>(&self, f: impl FnOnce(&LearntCache, &S) -> T) -> T {
        let guard = self.shared.learnt();
        f(&guard.0, &guard.1)
    }
}

impl<S> Drop for Proxy<S> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// UDP and TCP bound to the same address and port (std's sockets, bound
/// at once, handed to the runtime). With port 0 the UDP port may be taken
/// for TCP: try a few.
fn bind_pair_now(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let tries = if addr.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let udp = std::net::UdpSocket::bind(addr)?;
        match std::net::TcpListener::bind(udp.local_addr()?) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port for both UDP and TCP")))
}

async fn serve_udp<S: LearntSink + Send + 'static>(
    socket: Arc<UdpSocket>,
    shared: Arc<Shared<S>>,
    limit: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut in_flight = JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "dns proxy: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            bump(&shared.stats.overload_drops);
            continue;
        };
        let query = buf[..len].to_vec();
        let (socket, shared) = (socket.clone(), shared.clone());
        in_flight.spawn(async move {
            let _permit = permit;
            bump(&shared.stats.udp_queries);
            if let Some(reply) = handle(&shared, client, &query, Transport::Udp).await {
                if let Err(e) = socket.send_to(&reply, client).await {
                    tracing::debug!(%client, error = %e, "dns proxy: UDP reply not sent");
                }
            }
        });
    }
}

async fn serve_tcp<S: LearntSink + Send + 'static>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    limit: Arc<Semaphore>,
) {
    let mut clients = JoinSet::new();
    loop {
        while clients.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, client) = match listener.accept().await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, "dns proxy: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        clients.spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_tcp_client(stream, client, &shared).await {
                tracing::debug!(%client, error = %e, "dns proxy: TCP client closed");
            }
        });
    }
}

/// Length-prefixed queries, one after another, until the client closes or
/// stays silent for `tcp_idle`.
async fn serve_tcp_client<S: LearntSink + Send + 'static>(
    mut stream: TcpStream,
    client: SocketAddr,
    shared: &Shared<S>,
) -> io::Result<()> {
    loop {
        let query = match timeout(shared.config.tcp_idle, read_framed(&mut stream)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(got) => got?,
        };
        bump(&shared.stats.tcp_queries);
        match handle(shared, client, &query, Transport::Tcp).await {
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
/// nothing, the message had no header to answer).
async fn handle<S: LearntSink>(
    shared: &Shared<S>,
    client: SocketAddr,
    query: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let stats = &shared.stats;
    match parse_query(query) {
        Ok(_) => {}
        Err(AnswerError::Short(_)) => {
            bump(&stats.malformed_queries);
            return None;
        }
        Err(_) => {
            bump(&stats.malformed_queries);
            return error_reply(query, Rcode::FORMERR);
        }
    }
    let Some(route) = (shared.router)(transport, client) else {
        bump(&stats.unknown_clients);
        return error_reply(query, Rcode::REFUSED);
    };
    let deadline = Instant::now() + shared.config.upstream_timeout;
    let forwarded = match transport {
        Transport::Udp => forward_udp(route.upstream, query, deadline).await,
        Transport::Tcp => forward_tcp(route.upstream, query, deadline).await,
    };
    let reply = match forwarded {
        Ok(reply) => reply,
        Err(Upstream::TimedOut) => {
            bump(&stats.upstream_timeouts);
            return error_reply(query, Rcode::SERVFAIL);
        }
        Err(Upstream::Failed(e)) => {
            tracing::debug!(upstream = %route.upstream, error = %e, "dns proxy: resolver failed");
            bump(&stats.upstream_errors);
            return error_reply(query, Rcode::SERVFAIL);
        }
    };
    let reply = learn_from(shared, &route, query, reply, transport);
    bump(&stats.answered);
    Some(reply)
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
) -> Vec<u8> {
    let stats = &shared.stats;
    let inspected = match inspect(query, &reply) {
        Ok(inspected) => inspected,
        Err(e) => {
            tracing::debug!(service = route.service, error = %e, "dns proxy: answer not learnt from");
            bump(&stats.unreadable_answers);
            return reply;
        }
    };
    if inspected.truncated && transport == Transport::Udp {
        bump(&stats.truncated);
        return reply;
    }
    let now = monotonic_now();
    let mut guard = shared.learnt();
    let (cache, sink) = &mut *guard;
    let mut allowed = Vec::new();
    for found in &inspected.addresses {
        let rules = rule_bits(&route.rules, &found.chain);
        if rules == 0 {
            continue;
        }
        allowed.push(found);
        match cache.learn(
            sink,
            route.service,
            &found.chain[0],
            Answered {
                addr: found.addr,
                ttl: found.ttl,
                rules,
            },
            now,
        ) {
            Ok(_) => bump(&stats.learnt),
            Err(e) => {
                tracing::warn!(service = route.service, addr = %found.addr, error = %e, "dns proxy: address not learnt");
                bump(&stats.learn_failures);
            }
        }
    }
    let Some(first) = allowed.first() else {
        return reply;
    };
    let held: HashSet<IpAddr> = cache
        .addresses(route.service, &first.chain[0])
        .into_iter()
        .collect();
    drop(guard);
    let (kept, gone): (Vec<&AnswerAddress>, Vec<&AnswerAddress>) = allowed
        .iter()
        .copied()
        .partition(|a| held.contains(&a.addr));
    if gone.is_empty() || kept.is_empty() {
        return reply;
    }
    let chain: HashSet<&DnsName> = allowed.iter().flat_map(|a| a.chain.iter()).collect();
    let gone: HashSet<IpAddr> = gone.iter().map(|a| a.addr).collect();
    match without_addresses(&reply, |owner, addr| {
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
    }
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
) -> Result<Vec<u8>, Upstream> {
    let socket = UdpSocket::bind(unspecified_for(upstream))
        .await
        .map_err(Upstream::Failed)?;
    socket.connect(upstream).await.map_err(Upstream::Failed)?;
    socket.send(query).await.map_err(Upstream::Failed)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
            Err(_) => return Err(Upstream::TimedOut),
            Ok(got) => got.map_err(Upstream::Failed)?,
        };
        if answers(query, &buf[..len]) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(
    upstream: SocketAddr,
    query: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, Upstream> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        write_framed(&mut stream, query).await?;
        read_framed(&mut stream).await
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Err(_) => Err(Upstream::TimedOut),
        Ok(Err(e)) => Err(Upstream::Failed(e)),
        Ok(Ok(reply)) if answers(query, &reply) => Ok(reply),
        Ok(Ok(_)) => Err(Upstream::Failed(io::Error::new(
            io::ErrorKind::InvalidData,
            "the resolver's TCP answer is not for this query",
        ))),
    }
}

async fn sweep<S: LearntSink>(shared: Arc<Shared<S>>) {
    let mut tick = tokio::time::interval(shared.config.sweep_every);
    loop {
        tick.tick().await;
        let mut guard = shared.learnt();
        let (cache, sink) = &mut *guard;
        if let Err(e) = cache.sweep(sink, monotonic_now()) {
            tracing::warn!(error = %e, "dns proxy: expired addresses not all removed");
        }
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
