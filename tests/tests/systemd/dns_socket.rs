//! `bulkhead-dns.socket` under a real systemd: the DNS proxy's sockets are
//! systemd's, passed to each agent, so lookups a service makes while
//! `systemctl restart bulkhead` runs wait in them and the next agent
//! answers (docs/dns-names.md, Restarts).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use integration_tests::{
    addr,
    dns_server::{dig_answers, dig_in, dig_text},
    free_port_block, probe, DnsServer, Proto,
};

use super::{
    namespace::{boot_ns_systemd, ns_systemd_prerequisites, AgentOutput, TEST_DNS_SOCKET},
    text,
};

#[test]
fn lookups_wait_in_the_socket_unit_across_systemctl_restart() {
    let Some(systemd) = ns_systemd_prerequisites() else {
        return;
    };
    let api = probe!().listen(Proto::Tcp, addr("127.0.70.1:0"));
    let resolver = SocketAddr::from(([127, 0, 53, 70], 53));
    let _server = DnsServer::start_at(resolver, &[("api.example.test", api.addr().ip())], &[]);
    let policy = format!(
        "cgroup = \"/svc\"\nmode = \"enforce\"\n\n\
         [[egress]]\nto = [\"{}\"]\nports = [53]\n\n\
         [[egress]]\nto = [\"api.example.test\"]\nports = [{}]\nprotocol = \"tcp\"\n",
        resolver.ip(),
        api.port()
    );
    let port = free_port_block(Ipv4Addr::LOCALHOST.into(), 1);
    let ns = boot_ns_systemd(&systemd, &policy, port, &|c| c, AgentOutput::File);
    ns.wait_state("active", Duration::from_secs(30));
    let socket = ns.run(&["systemctl", "is-active", "bulkhead-dns.socket"]);
    assert_eq!(text(&socket).trim(), "active", "the socket unit");
    let log = ns.log();
    assert!(
        log.contains(&format!("listen={TEST_DNS_SOCKET}")) && log.contains("held=true"),
        "the agent serves on the socket unit's sockets:\n{log}"
    );

    let svc = ns.cgroup.join("svc");
    fs::create_dir_all(&svc).expect("the service's cgroup");
    let look_up = {
        let svc = svc.clone();
        let want = api.addr().ip().to_string();
        move || {
            let out = dig_in(&svc, resolver, "api.example.test", &["+time=8"]);
            let answers = dig_answers(&out);
            (answers.len() == 1 && answers[0].0 == "NOERROR" && answers[0].1 == [want.clone()])
                .then_some(())
                .ok_or_else(|| dig_text(&out))
        }
    };
    look_up().unwrap_or_else(|e| panic!("a lookup before the restart: {e}"));
    probe!()
        .in_cgroup(&svc)
        .tcp_connect(api.addr())
        .assert_ok("right after the lookup");

    // Lookups every 100 ms while systemd restarts the agent.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = Arc::clone(&stop);
        let look_up = look_up.clone();
        std::thread::spawn(move || {
            let (mut lookups, mut failures) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                lookups += 1;
                if let Err(e) = look_up() {
                    failures.push(e);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (lookups, failures)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let pid = ns.show("MainPID");
    let out = ns.run(&["systemctl", "restart", "bulkhead"]);
    assert!(out.status.success(), "systemctl restart: {}", text(&out));
    ns.wait_state("active", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (lookups, failures) = client.join().expect("the client thread");
    assert_ne!(
        ns.show("MainPID"),
        pid,
        "systemctl restart made a new agent"
    );
    assert!(
        failures.is_empty(),
        "{} of {lookups} lookups during the restart failed:\n{}\nlog:\n{}",
        failures.len(),
        failures.join("\n"),
        ns.log()
    );
    let socket = ns.run(&["systemctl", "is-active", "bulkhead-dns.socket"]);
    assert_eq!(
        text(&socket).trim(),
        "active",
        "the socket unit after the restart"
    );
    probe!()
        .in_cgroup(&svc)
        .tcp_connect(api.addr())
        .assert_ok("after the restart");
    eprintln!("{lookups} lookups across systemctl restart, none failed");
}
