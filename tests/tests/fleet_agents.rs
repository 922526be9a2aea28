//! Fleet mode end to end (docs/fleet.md): three agents on this kernel stand
//! in for three hosts, each with its own host name, machine id, pins,
//! state, control socket and services; h2 and h3 run in network namespaces
//! of their own, so that their listener inventories and addresses are
//! those hosts'. All three export to one real `ClickHouse`. `web@h1` calls
//! `api@h2`, whose policy allows `db@h3`; `iso@h3` stands apart. The
//! fleet's blast radius of `web`, read back from `ClickHouse`, crosses both
//! host boundaries with every hop.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use bulkhead::fleet::{model::Fleet, read, Client, FleetConfig};
use integration_tests::{
    addr,
    dns_server::{dig_addresses, dig_in, dig_text},
    events::wait_event,
    eventually,
    http::metrics_addr,
    probe,
    prometheus::wait_sample,
    require_bpf, service_policy, CgroupGuard, ClickHouse, Daemon, DnsServer, Egress, Listener,
    NetnsGuard, PolicyDir, Proto, Relay,
};

/// How long rows may take to reach `ClickHouse` (1 s batches, plus the
/// endpoints' first round).
const ARRIVAL: Duration = Duration::from_secs(30);

/// The agent config of host `name`, exporting to `url` every second.
fn fleet_config(dir: &Path, name: &str, url: &str) -> String {
    let id = dir.join(format!("machine-id-{name}"));
    fs::write(
        &id,
        format!("{:032x}\n", name.bytes().map(u128::from).sum::<u128>()),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", id.display()));
    format!(
        "[fleet]\nenabled = true\nclickhouse_url = \"{url}\"\nhost = \"{name}\"\n\
         machine_id_file = \"{}\"\nbatch_interval_secs = 1\n",
        id.display()
    )
}

fn client(url: &str) -> Client {
    let conn = FleetConfig::default()
        .connection(Some(url))
        .unwrap_or_else(|e| panic!("connection to {url}: {e}"));
    Client::new(conn).unwrap_or_else(|e| panic!("client: {e}"))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
        .block_on(f)
}

#[test]
fn three_hosts_one_blast_radius() {
    if !require_bpf() {
        return;
    }
    let h2 = NetnsGuard::new();
    let h3 = NetnsGuard::new();
    // The root-side addresses of h2's and h3's veth pairs: where the
    // agents in those namespaces reach ClickHouse.
    let ch = ClickHouse::start_also_on(&[IpAddr::V4(h2.v4(1)), IpAddr::V4(h3.v4(1))]);
    let port = ch.addr().port();
    let url_of = |ip: IpAddr| format!("http://{}", SocketAddr::new(ip, port));
    ch.fleet_init();

    let (web, api, db, iso) = (
        CgroupGuard::new(),
        CgroupGuard::new(),
        CgroupGuard::new(),
        CgroupGuard::new(),
    );
    // api listens on h2's address; db on every address of h3 (a wildcard
    // listener: the inventory expands it to h3's addresses); iso on h3.
    let api_listener = probe!()
        .in_cgroup(api.path())
        .in_netns(h2.name())
        .listen(Proto::Tcp, addr(&format!("{}:0", h2.v4(2))));
    let db_listener = probe!()
        .in_cgroup(db.path())
        .in_netns(h3.name())
        .listen(Proto::Tcp, addr("0.0.0.0:0"));
    let iso_listener = probe!()
        .in_cgroup(iso.path())
        .in_netns(h3.name())
        .listen(Proto::Tcp, addr(&format!("{}:0", h3.v4(2))));
    let api_at = SocketAddr::new(IpAddr::V4(h2.v4(2)), api_listener.port());
    let db_at = SocketAddr::new(IpAddr::V4(h3.v4(2)), db_listener.port());

    let p1 = PolicyDir::with(&[(
        "web.toml",
        &service_policy(
            &web,
            "enforce",
            &[Egress::to([api_at.ip()])
                .ports([api_at.port()])
                .protocol("tcp")],
        ),
    )]);
    let p2 = PolicyDir::with(&[(
        "api.toml",
        &service_policy(
            &api,
            "enforce",
            &[Egress::to([db_at.ip()])
                .ports([db_at.port()])
                .protocol("tcp")],
        ),
    )]);
    let p3 = PolicyDir::with(&[
        ("db.toml", &service_policy(&db, "enforce", &[])),
        ("iso.toml", &service_policy(&iso, "enforce", &[])),
    ]);
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let c1 = fleet_config(work.path(), "h1", &ch.url());
    let c2 = fleet_config(work.path(), "h2", &url_of(IpAddr::V4(h2.v4(1))));
    let c3 = fleet_config(work.path(), "h3", &url_of(IpAddr::V4(h3.v4(1))));
    let a1 = Daemon::start_with_config(&p1, &c1);
    let a2 = Daemon::start_in_netns(&p2, &c2, h2.name());
    let a3 = Daemon::start_in_netns(&p3, &c3, h3.name());

    // web -> api three times; api -> db twice (api's client runs in its
    // cgroup; the cgroup, not the namespace, makes it api).
    let web_probe = probe!().in_cgroup(web.path());
    for _ in 0..3 {
        web_probe.tcp_connect(api_at).assert_ok("web may call api");
    }
    web_probe
        .tcp_connect(db_at)
        .assert_eperm("web may not reach db directly");
    let api_probe = probe!().in_cgroup(api.path());
    for _ in 0..2 {
        api_probe.tcp_connect(db_at).assert_ok("api may call db");
    }

    // Every event names its host: here `[fleet] host`, not the kernel's
    // host name (the three agents share this machine's).
    let denied = wait_event(&a1, "web's denied connect to db", |ev| {
        ev["service"] == "web" && ev["verdict"] == "deny"
    });
    assert_eq!(denied["host"], "h1", "{denied:#}");
    let api_call = wait_event(&a2, "api's connect to db", |ev| {
        ev["service"] == "api" && ev["type"] == "verdict"
    });
    assert_eq!(api_call["host"], "h2", "{api_call:#}");

    let logs = || format!("h1:\n{}\nh2:\n{}\nh3:\n{}", a1.log(), a2.log(), a3.log());
    let ports = Ports {
        api: api_at,
        db: db_at,
        iso: iso_listener.port(),
    };
    rows_arrive(&ch, &h2, &h3, &ports, &logs);
    let fleet = read_fleet(&ch);
    assert_web_blast_radius(&fleet, &ports);
    let iso = fleet
        .blast_radius("iso")
        .unwrap_or_else(|e| panic!("iso: {e}"));
    assert_eq!(iso.lateral.size, 0);
    drop((a1, a2, a3));
}

/// Where the test's services listen.
struct Ports {
    api: SocketAddr,
    db: SocketAddr,
    iso: u16,
}

/// Every host's rows arrive: the flows, the listeners, the policies.
fn rows_arrive(
    ch: &ClickHouse,
    h2: &NetnsGuard,
    h3: &NetnsGuard,
    ports: &Ports,
    logs: &dyn Fn() -> String,
) {
    let arrived = |sql: &str, want: &str| {
        eventually(ARRIVAL, Duration::from_millis(250), || {
            let got = ch.query(sql);
            if got == want {
                Ok(())
            } else {
                Err(got)
            }
        })
        .unwrap_or_else(|got| {
            panic!(
                "{sql}: {got:?}, not {want:?} within {ARRIVAL:?}; logs:
{}",
                logs()
            )
        });
    };
    arrived(
        "SELECT host, service, sum(calls) FROM bulkhead.flows WHERE direction = 'egress' \
         AND verdict = 'allow' AND remote_port != 0 AND calls > 0 \
         GROUP BY host, service ORDER BY host FORMAT TabSeparated",
        "h1\tweb\t3\nh2\tapi\t2\n",
    );
    arrived(
        &format!(
            "SELECT host, service, addr FROM bulkhead.endpoints WHERE kind = 'listener' \
             AND port IN ({}, {}, {}) GROUP BY host, service, addr \
             ORDER BY host, service, addr FORMAT TabSeparated",
            ports.api.port(),
            ports.db.port(),
            ports.iso
        ),
        &format!(
            "h2\tapi\t{}\nh3\tdb\t127.0.0.1\nh3\tdb\t{}\nh3\tiso\t{}\n",
            h2.v4(2),
            h3.v4(2),
            h3.v4(2)
        ),
    );
    arrived(
        "SELECT host, service FROM bulkhead.policies GROUP BY host, service \
         ORDER BY host, service FORMAT TabSeparated",
        "h1\tweb\nh2\tapi\nh3\tdb\nh3\tiso\n",
    );
}

/// The fleet, read back from `ClickHouse` as `bulkhead fleet` reads it.
fn read_fleet(ch: &ClickHouse) -> Fleet {
    let c = client(&ch.url());
    read::load("bulkhead", |sql| {
        block_on(c.query(sql)).map_err(anyhow::Error::from)
    })
    .unwrap_or_else(|e| panic!("read the fleet: {e:#}"))
}

/// web's blast radius crosses h2 and h3, with every hop.
fn assert_web_blast_radius(fleet: &Fleet, ports: &Ports) {
    let b = fleet
        .blast_radius("web")
        .unwrap_or_else(|e| panic!("blast radius: {e}"));
    let paths: Vec<(&str, &str)> = b
        .lateral
        .services
        .iter()
        .map(|h| (h.target.as_str(), h.path.as_str()))
        .collect();
    let to_api = format!("web@h1 → api@h2:{}", ports.api.port());
    let to_db = format!("{to_api} → db@h3:{}", ports.db.port());
    assert_eq!(
        paths,
        [("api@h2", to_api.as_str()), ("db@h3", to_db.as_str())]
    );
    assert_eq!(b.lateral.size, 2);
    let reached: Vec<(&str, u64, u64)> = b
        .reached
        .iter()
        .map(|r| (r.to.as_str(), r.calls, r.denied))
        .collect();
    assert_eq!(
        reached,
        [("api@h2", 3, 0), ("db@h3", 0, 1)],
        "what web reached: api three times, db once refused"
    );
}

/// Calls `web` makes to `to` in one burst (each TCP connect a flow of its
/// own: a record, one call).
fn calls(web: &CgroupGuard, to: SocketAddr, n: usize) {
    let p = probe!().in_cgroup(web.path());
    for _ in 0..n {
        p.tcp_connect(to).assert_ok("web may call the listener");
    }
}

/// `web`, allowed to call a TCP listener on loopback, and its policy.
fn web_calling_a_listener() -> (CgroupGuard, Listener, PolicyDir) {
    let web = CgroupGuard::new();
    let listener = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[(
        "web.toml",
        &service_policy(
            &web,
            "enforce",
            &[Egress::to(["127.0.0.1"])
                .ports([listener.port()])
                .protocol("tcp")],
        ),
    )]);
    (web, listener, policies)
}

/// `web`'s calls stored in the flows table, and rows stored more than once.
fn stored(ch: &ClickHouse) -> (String, String) {
    (
        ch.query(
            "SELECT sum(calls) FROM bulkhead.flows WHERE service = 'web' \
             AND direction = 'egress' FORMAT TabSeparated",
        ),
        ch.query(
            "SELECT count() FROM (SELECT batch_id, row, count() AS n FROM bulkhead.flows \
             GROUP BY batch_id, row HAVING n > 1) FORMAT TabSeparated",
        ),
    )
}

#[test]
fn a_minute_without_clickhouse_and_a_restart_lose_nothing_and_store_nothing_twice() {
    if !require_bpf() {
        return;
    }
    let mut ch = ClickHouse::start();
    ch.fleet_init();
    let (web, listener, policies) = web_calling_a_listener();
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // One spool for both agents of this host, as one state directory gives.
    let config = format!(
        "{}spool_dir = \"{}\"\n",
        fleet_config(work.path(), "h1", &ch.url()),
        work.path().join("spool").display()
    );
    let mut agent = Daemon::start_with_config(&policies, &config);
    let wait_for = |ch: &ClickHouse, total: usize, agent: &Daemon| {
        let want = (format!("{total}\n"), "0\n".to_string());
        eventually(ARRIVAL, Duration::from_millis(250), || {
            let got = stored(ch);
            if got == want {
                Ok(())
            } else {
                Err(got)
            }
        })
        .unwrap_or_else(|got| {
            panic!(
                "stored (calls, duplicated rows) {got:?}, not {want:?}; agent log:\n{}",
                agent.log()
            )
        });
    };
    calls(&web, listener.addr(), 10);
    wait_for(&ch, 10, &agent);

    // A minute without ClickHouse while web goes on calling; halfway, the
    // agent restarts (what waited in memory goes to the spool's disk).
    ch.stop();
    for _ in 0..3 {
        calls(&web, listener.addr(), 5);
        std::thread::sleep(Duration::from_secs(10));
    }
    let status = agent.stop();
    assert!(status.success(), "the agent stopped with {status}");
    drop(agent);
    let spooled = fs::read_dir(work.path().join("spool"))
        .unwrap_or_else(|e| panic!("the spool: {e}"))
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".batch"))
        .count();
    assert!(spooled > 0, "the stopped agent left no batch in the spool");
    let agent = Daemon::start_with_config(&policies, &config);
    let metrics = metrics_addr(&agent);
    let files = ("bulkhead_fleet_spool_files", &[][..]);
    wait_sample(metrics, files, "the spool found at start", ARRIVAL, |n| {
        n > 0
    });
    for _ in 0..3 {
        calls(&web, listener.addr(), 5);
        std::thread::sleep(Duration::from_secs(10));
    }
    ch.start_again();
    wait_for(&ch, 40, &agent);
    let sent = (
        "bulkhead_fleet_rows_total",
        &[("table", "flows"), ("result", "sent")][..],
    );
    wait_sample(metrics, sent, "rows sent", ARRIVAL, |n| n > 0);
    wait_sample(metrics, files, "an empty spool", ARRIVAL, |n| n == 0);
}

/// The failure a retry cannot tell from a batch that never arrived: the
/// server stored the insert, and the answer was lost on the way back (a
/// relay cuts the connection as the answer starts). The agent sends the
/// batch again, finds it stored, and adds nothing: every call is stored
/// once, no row twice.
#[test]
fn inserts_whose_answers_were_lost_are_stored_once() {
    const LOST: usize = 2;
    if !require_bpf() {
        return;
    }
    let ch = ClickHouse::start();
    ch.fleet_init();
    let relay = Relay::losing_answers(ch.addr(), "query=INSERT%20INTO%20bulkhead.flows", LOST);
    let (web, listener, policies) = web_calling_a_listener();
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let url = format!("http://{}", relay.addr());
    let agent = Daemon::start_with_config(&policies, &fleet_config(work.path(), "h1", &url));
    // Two rounds of calls a few batches apart: each round's batch has its
    // answer lost.
    for _ in 0..LOST {
        calls(&web, listener.addr(), 5);
        std::thread::sleep(Duration::from_secs(3));
    }
    let want = (format!("{}\n", 5 * LOST), "0\n".to_string());
    eventually(ARRIVAL, Duration::from_millis(250), || {
        let got = stored(&ch);
        if got == want && relay.lost() == LOST {
            Ok(())
        } else {
            Err((got, relay.lost()))
        }
    })
    .unwrap_or_else(|(got, lost)| {
        panic!(
            "stored (calls, duplicated rows) {got:?}, not {want:?}, with {lost} of {LOST} \
             answers lost; agent log:\n{}",
            agent.log()
        )
    });
    // `sent` counts the rows stored, the lost answers' included, once.
    let rows = ch.query("SELECT count() FROM bulkhead.flows FORMAT TabSeparated");
    let rows: u64 = rows
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("count() {rows:?}: {e}"));
    let sent = (
        "bulkhead_fleet_rows_total",
        &[("table", "flows"), ("result", "sent")][..],
    );
    wait_sample(
        metrics_addr(&agent),
        sent,
        "every stored row",
        ARRIVAL,
        |n| n == rows,
    );
}

/// A real lookup through the agent's DNS proxy, then a connect to the
/// address it gave: the agent's `flows` row carries the name, and the
/// fleet's blast radius read back from `ClickHouse` lists the destination
/// by it. (dnsmasq answers `api.example.test` with a loopback address
/// where a listener outside every service stands in for it.)
#[test]
fn a_destination_reached_by_name_is_named_in_the_fleet() {
    if !require_bpf() {
        return;
    }
    let ch = ClickHouse::start();
    ch.fleet_init();
    let api = probe!().listen(Proto::Tcp, addr("127.0.201.1:0"));
    let resolver = addr("127.0.53.201:53");
    let server = DnsServer::start_at(resolver, &[("api.example.test", api.addr().ip())], &[]);
    let web = CgroupGuard::new();
    let policies = PolicyDir::with(&[(
        "web.toml",
        &service_policy(
            &web,
            "enforce",
            &[
                Egress::to([server.addr().ip()]).ports([53]),
                Egress::to(["api.example.test"])
                    .ports([api.port()])
                    .protocol("tcp"),
            ],
        ),
    )]);
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let agent = Daemon::start_with_config(&policies, &fleet_config(work.path(), "h1", &ch.url()));

    let out = dig_in(web.path(), server.addr(), "api.example.test", &[]);
    assert_eq!(
        dig_addresses(&out),
        [api.addr().ip().to_string()],
        "{}",
        dig_text(&out)
    );
    probe!()
        .in_cgroup(web.path())
        .tcp_connect(api.addr())
        .assert_ok("web connects to the address its lookup gave");
    let call = wait_event(&agent, "web's connect by name", |ev| {
        ev["service"] == "web" && ev["dst_port"] == api.port() && ev["type"] == "verdict"
    });
    assert_eq!(call["dst_name"], "api.example.test", "{call:#}");

    // The connection's byte summaries come in a row of their own without
    // the name (TCP lifecycle events carry none); the call is named.
    let sql = format!(
        "SELECT dst_name, sum(calls) FROM bulkhead.flows \
         WHERE service = 'web' AND remote_port = {} AND calls > 0 GROUP BY dst_name",
        api.port()
    );
    eventually(ARRIVAL, Duration::from_millis(250), || {
        let got = ch.query(&sql);
        if got == "api.example.test\t1\n" {
            Ok(())
        } else {
            Err(got)
        }
    })
    .unwrap_or_else(|got| panic!("{sql}: {got:?} within {ARRIVAL:?}; log:\n{}", agent.log()));

    let fleet = read_fleet(&ch);
    let b = fleet
        .blast_radius("web")
        .unwrap_or_else(|e| panic!("blast radius: {e}"));
    let label = format!("api.example.test:{}/tcp", api.port());
    let named = b
        .reached
        .iter()
        .find(|r| r.to == label)
        .unwrap_or_else(|| panic!("{label} not among what web reached: {:?}", b.reached));
    assert_eq!(named.addresses, [api.addr().ip().to_string()]);
    assert_eq!(named.calls, 1);
    assert_eq!(named.rule.as_deref(), Some("web.toml#egress[1]"));
    drop(agent);
}
