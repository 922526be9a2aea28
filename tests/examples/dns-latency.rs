//! What the DNS proxy of name rules adds to a lookup (docs/dns-names.md,
//! "Added latency"): the same A query, over UDP, to a real `dnsmasq` on
//! loopback directly and through the proxy (which forwards, parses and
//! learns two addresses before answering), interleaved one by one (direct,
//! proxied, direct, ...), so both see the same machine noise. Prints the
//! median and p99 of each and of the difference.
//!
//!     cargo run --release -p integration-tests --example dns-latency -- [QUERIES]
//!
//! QUERIES defaults to 5000 of each. Not a test: it asserts nothing about
//! time.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use bulkhead::dns::{
    learnt::{LearntCache, LearntLimits, MemoryMap},
    name::NamePattern,
    proxy::{Proxy, ProxyConfig, Route, Router},
};
use domain::base::{MessageBuilder, Name, Rtype};
use integration_tests::DnsServer;

const NAME: &str = "api.example.test";
const WARM_UP: usize = 200;

fn main() {
    let queries: usize = match std::env::args().nth(1) {
        None => 5_000,
        Some(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("QUERIES must be a number, not {n:?}")),
    };
    let addrs: [IpAddr; 2] = [[198, 51, 100, 1].into(), [198, 51, 100, 2].into()];
    let server = DnsServer::start(&[(NAME, addrs[0]), (NAME, addrs[1])], &[]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let upstream = server.addr();
    let rules: Arc<[Vec<NamePattern>]> =
        Arc::new([vec![NamePattern::parse(NAME).expect("pattern")]]);
    let router: Router = Arc::new(move |_, _, _| {
        Some(Route {
            service: 1,
            upstream,
            rules: rules.clone(),
        })
    });
    let proxy = runtime
        .block_on(Proxy::bind(
            "127.0.0.1:0".parse().expect("address"),
            router,
            ProxyConfig::default(),
            LearntCache::new(LearntLimits::default()),
            MemoryMap::new(),
        ))
        .expect("proxy binds");

    let client = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut direct = Vec::with_capacity(queries);
    let mut proxied = Vec::with_capacity(queries);
    for i in 0..WARM_UP + queries {
        let id = u16::try_from(i % 65_536).expect("id");
        let d = lookup(&client, upstream, id);
        let p = lookup(&client, proxy.addr(), id);
        if i >= WARM_UP {
            direct.push(d);
            proxied.push(p);
        }
    }
    let learnt = proxy.with_learnt(|_, map| map.len());
    assert_eq!(
        learnt, 2,
        "the proxy did not learn the name's two addresses"
    );
    let added: Vec<Duration> = proxied
        .iter()
        .zip(&direct)
        .map(|(p, d)| p.saturating_sub(*d))
        .collect();
    println!("{queries} UDP lookups of {NAME} each, interleaved, after {WARM_UP} warm-up pairs");
    report("direct to dnsmasq", &mut direct);
    report("through the proxy", &mut proxied);
    report("added (pairwise)", &mut added.clone());
}

/// One query and its answer; the round trip.
fn lookup(client: &UdpSocket, to: SocketAddr, id: u16) -> Duration {
    let mut builder = MessageBuilder::new_vec();
    builder.header_mut().set_id(id);
    builder.header_mut().set_rd(true);
    let mut q = builder.question();
    let name: Name<Vec<u8>> = Name::from_str(NAME).expect("name");
    q.push((name, Rtype::A)).expect("question");
    let query = q.finish();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    client.send_to(&query, to).expect("send");
    loop {
        let (len, from) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("no answer from {to} to query {id}: {e}"));
        // A late answer to an earlier query (another id) is skipped.
        if from == to && len >= 2 && buf[..2] == id.to_be_bytes() {
            return started.elapsed();
        }
    }
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    // Nearest rank of the per-mille `q`.
    let at = |q: usize| {
        let rank = (q * samples.len()).div_ceil(1000);
        samples[rank.clamp(1, samples.len()) - 1]
    };
    println!(
        "  {what:<20} median {:>7.1} us   p99 {:>7.1} us",
        at(500).as_secs_f64() * 1e6,
        at(990).as_secs_f64() * 1e6
    );
}
