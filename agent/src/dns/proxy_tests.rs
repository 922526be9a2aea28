//! The proxy's watch on its own sweep (the kernel allows a learnt address
//! until the sweep removes it).

use domain::base::{Message, MessageBuilder, Name, Rtype};

use super::*;
use crate::dns::learnt::{LearntLimits, MemoryMap, SinkError};

/// A sink whose sweep panics (`panics`), or that has a removal refused
/// and pending for ever (`stuck`).
#[derive(Default)]
struct Faulty {
    panics: bool,
    stuck: bool,
    map: MemoryMap,
}

impl LearntSink for Faulty {
    fn allow(&mut self, s: ServiceId, a: IpAddr, t: Nanos, r: RuleBits) -> Result<(), SinkError> {
        self.map.allow(s, a, t, r)
    }
    fn revoke(&mut self, s: ServiceId, a: IpAddr) -> Result<(), SinkError> {
        self.map.revoke(s, a)
    }
    fn sweep_carried(&mut self, _: Nanos) -> usize {
        assert!(!self.panics, "test: the sweep fails");
        0
    }
    fn pending_removals(&self) -> usize {
        usize::from(self.stuck)
    }
}

const SERVICE: ServiceId = 3;

/// A proxy sweeping every 50 ms, stalled after 300 ms without a complete
/// sweep, routing every query as [`SERVICE`] to the discard port.
async fn proxy(sink: Faulty) -> Proxy<Faulty> {
    let router: Router = Arc::new(|_, _, _| {
        Some(Route {
            service: SERVICE,
            upstream: SocketAddr::from(([127, 0, 0, 1], 9)),
            rules: Arc::new([]),
        })
    });
    let config = ProxyConfig {
        sweep_every: Duration::from_millis(50),
        sweep_stalled: Duration::from_millis(300),
        upstream_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let cache = LearntCache::new(LearntLimits::default());
    let addr = "127.0.0.1:0".parse().expect("test bug: address");
    Proxy::bind(addr, router, config, cache, sink)
        .await
        .expect("the proxy binds on loopback")
}

/// The rcode of the proxy's answer to one A query over UDP.
async fn ask(p: &Proxy<Faulty>) -> Rcode {
    let mut b = MessageBuilder::new_vec();
    b.header_mut().set_id(7);
    let mut q = b.question();
    let qname: Name<Vec<u8>> = "api.example.com".parse().expect("test bug: name");
    q.push((qname, Rtype::A)).expect("test bug: question");
    let query = q.finish();
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(&query, p.addrs()[0]).await.expect("send");
    let mut buf = [0u8; 512];
    let n = timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("the proxy answers")
        .expect("recv");
    Message::from_octets(buf[..n].to_vec())
        .expect("a DNS message")
        .header()
        .rcode()
}

fn stalled_lookups(p: &Proxy<Faulty>) -> u64 {
    p.stats()
        .lookups()
        .into_iter()
        .filter(|(s, o, _)| *s == Some(SERVICE) && *o == Outcome::ServfailStalled)
        .map(|(_, _, n)| n)
        .sum()
}

/// Not sweeping at `now`: the proxy's first lookup gets SERVFAIL without
/// being forwarded, counted as stalled.
async fn assert_refused_as_stalled(p: &Proxy<Faulty>, now: Nanos) {
    assert!(!p.sweeping(now));
    assert_eq!(ask(p).await, Rcode::SERVFAIL);
    assert_eq!(stalled_lookups(p), 1);
}

#[tokio::test]
async fn a_running_sweep_keeps_its_age_below_the_stall_bound() {
    let p = proxy(Faulty::default()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = monotonic_now();
    assert!(
        p.sweep_age(now) < Duration::from_millis(250),
        "swept every 50 ms, last {:?} ago",
        p.sweep_age(now)
    );
    assert!(p.sweeping(now));
    // Queries are forwarded (here to a port nothing answers on).
    assert_eq!(ask(&p).await, Rcode::SERVFAIL);
    assert_eq!(stalled_lookups(&p), 0, "forwarded, not refused as stalled");
}

#[tokio::test]
async fn a_sweep_whose_task_ended_stops_learning() {
    let p = proxy(Faulty {
        panics: true,
        ..Faulty::default()
    })
    .await;
    // The first tick comes at once; the panic ends the task.
    let ended = timeout(Duration::from_secs(5), async {
        while !p.sweeper.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ended.is_ok(), "the sweep's task never ended");
    // Its last complete sweep is the proxy's start, within the bound: the
    // ended task alone says it is not sweeping.
    let now = monotonic_now();
    assert!(p.sweep_age(now) < Duration::from_millis(300));
    assert_refused_as_stalled(&p, now).await;
}

/// A removal the kernel refused leaves an expired address allowed: the
/// sweep is not complete until it is done.
#[tokio::test]
async fn a_sweep_that_leaves_a_removal_pending_counts_as_stalled() {
    let p = proxy(Faulty {
        stuck: true,
        ..Faulty::default()
    })
    .await;
    assert!(p.sweeping(monotonic_now()), "just started");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = monotonic_now();
    assert!(
        p.sweep_age(now) >= Duration::from_millis(450),
        "never complete: {:?}",
        p.sweep_age(now)
    );
    assert_refused_as_stalled(&p, now).await;
}
