//! State and policy files the agent reads as root (issue 15): a damaged
//! state file never stops enforcement (set aside, logged, counted; a
//! quarantine the pinned programs enforce stays in force), a symlinked
//! policy file is refused by name, and a policy directory replaced as a
//! whole is followed.

use std::{ffi::OsString, fs, time::Duration};

use integration_tests::{
    addr,
    control::{assert_success, quarantine, release, SharedPins},
    eventually, probe, require_bpf, service_policy,
    state_files::{assert_handled, errors_counted},
    CgroupGuard, Daemon, Egress, PolicyDir, Probe, Proto,
};

/// A quarantine is in force, the agent stops, `quarantine.json` is
/// damaged: the next agent starts, the service stays cut off (the pinned
/// programs said so; without its exceptions), the file is set aside and
/// counted, and a release still works.
#[test]
fn a_damaged_quarantine_file_keeps_the_pinned_quarantine() {
    if !require_bpf() {
        return;
    }
    let web = CgroupGuard::new();
    let ok = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[(
        "web.toml",
        &service_policy(
            &web,
            "enforce",
            &[Egress::to(["127.0.0.1"]).ports([ok.port()])],
        ),
    )]);
    let shared = SharedPins::new();
    let client = probe!().in_cgroup(web.path());
    let mut first = shared.start(&policies);
    client
        .tcp_connect(ok.addr())
        .assert_ok("before the quarantine");
    assert_success(&quarantine(&first, "web", &[]), "bulkhead quarantine web");
    client.tcp_connect(ok.addr()).assert_eperm("quarantined");
    assert!(first.stop().success(), "first agent: {}", first.log());

    let state = shared.state_dir();
    let garbage = b"{\"services\": {\"web\": [\"not an exception\"]";
    fs::write(state.join("quarantine.json"), garbage).expect("damage quarantine.json");
    let second = shared.start(&policies);
    client
        .tcp_connect(ok.addr())
        .assert_eperm("quarantine.json damaged: the pinned quarantine stays");
    assert_handled(&second, &state, "quarantine.json", garbage);
    assert!(
        second
            .log()
            .contains("stay quarantined WITHOUT exceptions: web"),
        "{}",
        second.log()
    );
    assert_success(&release(&second, "web"), "bulkhead release web");
    client.tcp_connect(ok.addr()).assert_ok("released");
}

/// A damaged `anomaly.json` is set aside and counted, not silently
/// relearned over.
#[test]
fn a_damaged_anomaly_file_is_set_aside_and_counted() {
    if !require_bpf() {
        return;
    }
    damaged_at_start("anomaly.json", b"\x00\x01 not json", "quarantine.json");
}

/// A damaged `open-connections.json` is set aside and counted; the agent
/// starts, following no connection of a previous agent.
#[test]
fn a_damaged_open_connections_file_is_set_aside_and_counted() {
    if !require_bpf() {
        return;
    }
    damaged_at_start("open-connections.json", b"{\"boot_id\": 7", "anomaly.json");
}

/// An agent starts on a state directory whose `name` holds `garbage`: the
/// file is set aside and counted, and `other` is not.
fn damaged_at_start(name: &str, garbage: &[u8], other: &str) {
    let web = CgroupGuard::new();
    let policies = PolicyDir::with(&[("web.toml", &service_policy(&web, "audit", &[]))]);
    let shared = SharedPins::new();
    let state = shared.state_dir();
    fs::create_dir_all(&state).expect("state dir");
    fs::write(state.join(name), garbage).unwrap_or_else(|e| panic!("damage {name}: {e}"));
    let daemon = shared.start(&policies);
    assert_handled(&daemon, &state, name, garbage);
    assert_eq!(errors_counted(&daemon, other), Some(0));
}

/// A policy file that is a symbolic link is refused at start, by name,
/// saying it is a link.
#[test]
fn a_symlinked_policy_file_is_refused_by_name() {
    if !require_bpf() {
        return;
    }
    let web = CgroupGuard::new();
    let elsewhere = PolicyDir::with(&[("real.toml", &service_policy(&web, "audit", &[]))]);
    let policies = PolicyDir::new();
    let link = policies.path().join("web.toml");
    std::os::unix::fs::symlink(elsewhere.path().join("real.toml"), &link).expect("symlink");
    let mut daemon = Daemon::spawn_run(&[OsString::from("--policy-dir"), policies.path().into()]);
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "started on a symlinked policy");
    let log = daemon.log();
    assert!(
        log.contains(&format!("{}:", link.display())) && log.contains("is a symbolic link"),
        "{log}"
    );
}

/// Waits until `client` reaches `target` (allowed), at most `limit`.
fn wait_allowed(client: &Probe, target: std::net::SocketAddr, limit: Duration, why: &str) {
    eventually(limit, Duration::from_millis(100), || {
        let out = client.tcp_connect(target);
        if out.ok {
            Ok(())
        } else {
            // Boxed: an `Outcome` is large (clippy::result_large_err).
            Err(Box::new(out))
        }
    })
    .unwrap_or_else(|out| panic!("{why}: still refused after {limit:?}: {out:?}"));
}

/// `mv new-policies policies`: the new directory's policy is enforced
/// within seconds, and a later edit inside it is followed too (the watch
/// moved to the new directory).
#[test]
fn a_replaced_policy_directory_is_followed() {
    if !require_bpf() {
        return;
    }
    let web = CgroupGuard::new();
    let (p1, p2, p3) = (
        probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
        probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
        probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
    );
    let allowing =
        |port: u16| service_policy(&web, "enforce", &[Egress::to(["127.0.0.1"]).ports([port])]);
    let policies = PolicyDir::with(&[("web.toml", &allowing(p1.port()))]);
    let _daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(web.path());
    client
        .tcp_connect(p1.addr())
        .assert_ok("p1 allowed at start");
    client
        .tcp_connect(p2.addr())
        .assert_eperm("p2 refused at start");

    policies.replace_whole(&[("web.toml", &allowing(p2.port()))]);
    wait_allowed(
        &client,
        p2.addr(),
        Duration::from_secs(5),
        "directory replaced",
    );
    client
        .tcp_connect(p1.addr())
        .assert_eperm("p1 refused by the new directory");

    policies.write("web.toml", &allowing(p3.port()));
    wait_allowed(
        &client,
        p3.addr(),
        Duration::from_secs(5),
        "edited in the new directory",
    );
    client
        .tcp_connect(p2.addr())
        .assert_eperm("p2 refused after the edit");
}
