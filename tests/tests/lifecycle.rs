//! The daemon's life: enforcement starts at READY=1 and ends, with every
//! program unloaded, when it is stopped by SIGTERM or SIGINT.

use std::{collections::BTreeSet, ffi::OsStr, time::Duration};

use integration_tests::{
    addr,
    bpf::{bulkhead_progs, wait_unloaded, LoadedProg},
    cgroup2_mount,
    control::{status, status_feature},
    daemon::STOP_TIMEOUT,
    http::metrics_addr,
    probe,
    process::signal,
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, Listener, PolicyDir, Probe, ProgSnapshot,
    Proto,
};

/// The programs issue 2 specifies.
const PROGRAMS: [&str; 4] = [
    "bulkhead_connect4",
    "bulkhead_connect6",
    "bulkhead_sendmsg4",
    "bulkhead_sendmsg6",
];

/// How long the kernel may take to free programs after the daemon exits.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Asserts every program in [`PROGRAMS`] is among `loaded` (the kernel keeps
/// the first 15 bytes of a name; bpftool may print the full one from BTF).
fn assert_all_programs(loaded: &[LoadedProg]) {
    for want in PROGRAMS {
        assert!(
            loaded
                .iter()
                .any(|p| p.name == want || (p.name.len() >= 15 && want.starts_with(&p.name))),
            "program {want} is not among the programs bulkhead holds: {loaded:?}"
        );
    }
}

/// The ids of the programs `daemon` holds, after asserting that every
/// program in [`PROGRAMS`] is among them.
fn our_programs(daemon: &Daemon) -> BTreeSet<u64> {
    let ours = daemon.prog_ids();
    let loaded: Vec<_> = bulkhead_progs()
        .into_iter()
        .filter(|p| ours.contains(&p.id))
        .collect();
    assert_all_programs(&loaded);
    ours
}

/// Asserts the daemon's programs are gone and that nothing loaded since
/// `before` is left behind with no process holding it (attached or pinned).
fn assert_unloaded(ours: &BTreeSet<u64>, before: &ProgSnapshot) {
    let left = wait_unloaded(ours, UNLOAD_TIMEOUT);
    assert!(
        left.is_empty(),
        "bulkhead's programs still loaded {UNLOAD_TIMEOUT:?} after it exited: {left:?}"
    );
    let orphans = before.orphans_since(UNLOAD_TIMEOUT);
    assert!(
        orphans.is_empty(),
        "bulkhead programs left loaded with no process holding them: {orphans:?}"
    );
}

/// Listeners a service with no rules is denied, and gets again once
/// bulkhead stops.
struct Targets {
    tcp4: Listener,
    tcp6: Listener,
    udp4: Listener,
    udp6: Listener,
}

impl Targets {
    fn new() -> Self {
        Self {
            tcp4: probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
            tcp6: probe!().listen(Proto::Tcp, addr("[::1]:0")),
            udp4: probe!().listen(Proto::Udp, addr("127.0.0.1:0")),
            udp6: probe!().listen(Proto::Udp, addr("[::1]:0")),
        }
    }

    fn assert_denied(&self, client: &Probe, why: &str) {
        client.tcp_connect(self.tcp4.addr()).assert_eperm(why);
        client.tcp_connect(self.tcp6.addr()).assert_eperm(why);
        client.udp_connect(self.udp4.addr()).assert_eperm(why);
        client.udp_sendto(self.udp6.addr()).assert_eperm(why);
    }

    fn assert_allowed(&self, client: &Probe, why: &str) {
        client.tcp_connect(self.tcp4.addr()).assert_ok(why);
        client.tcp_connect(self.tcp6.addr()).assert_ok(why);
        client.udp_connect(self.udp4.addr()).assert_ok(why);
        client.udp_sendto(self.udp6.addr()).assert_ok(why);
    }
}

/// The unit's normal stop keeps enforcing (the programs stay pinned);
/// `bulkhead detach` is what removes them.
#[test]
fn sigterm_keeps_enforcing_until_detach() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let targets = Targets::new();
    let client = probe!().in_cgroup(svc.path());
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let before = ProgSnapshot::take();
    let mut daemon = Daemon::start(&policies);

    targets.assert_denied(&client, "while bulkhead runs");
    let ours = our_programs(&daemon);

    let status = daemon.stop();
    assert_eq!(
        status.code(),
        Some(0),
        "bulkhead should exit 0 on SIGTERM, got {status} (its log follows)"
    );
    targets.assert_denied(&client, "after SIGTERM: the pinned programs keep enforcing");
    daemon.detach();
    assert_unloaded(&ours, &before);
    targets.assert_allowed(&client, "after bulkhead detach");
}

#[test]
fn sigint_keeps_enforcing_until_detach() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let targets = Targets::new();
    let client = probe!().in_cgroup(svc.path());
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let before = ProgSnapshot::take();
    let mut daemon = Daemon::start(&policies);
    targets.assert_denied(&client, "while bulkhead runs");
    let ours = our_programs(&daemon);

    let pid = daemon.pid().expect("the daemon was just started");
    assert!(signal(pid, libc::SIGINT), "cannot SIGINT bulkhead ({pid})");
    let status = daemon.wait_exit(STOP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(0),
        "bulkhead should exit 0 on SIGINT, got {status} (its log follows)"
    );
    targets.assert_denied(&client, "after SIGINT: the pinned programs keep enforcing");
    daemon.detach();
    assert_unloaded(&ours, &before);
    targets.assert_allowed(&client, "after bulkhead detach");
}

#[test]
fn config_file_names_the_policy_dir() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let targets = Targets::new();
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let config_dir = PolicyDir::new();
    let dir = policies.path().to_str().expect("temporary paths are UTF-8");
    let config = config_dir.write("bulkhead.toml", &format!("policy_dir = {dir:?}\n"));
    let mut daemon = Daemon::spawn_run(&[OsStr::new("--config"), config.as_os_str()]);
    daemon.wait_ready();

    targets.assert_denied(
        &probe!().in_cgroup(svc.path()),
        "policy found through --config's policy_dir",
    );
}

/// `log_file` in the config sends the agent's own log to a file (created
/// 0640), with no colour codes, instead of stderr.
#[test]
fn log_file_receives_the_agent_log() {
    use std::os::unix::fs::PermissionsExt;
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let config_dir = PolicyDir::new();
    let log = config_dir.path().join("logs").join("agent.log");
    let config = config_dir.write(
        "bulkhead.toml",
        &format!(
            "policy_dir = {:?}\nlog_file = {:?}\n",
            policies.path().to_str().expect("temporary paths are UTF-8"),
            log.to_str().expect("temporary paths are UTF-8")
        ),
    );
    let mut daemon = Daemon::spawn_run(&[OsStr::new("--config"), config.as_os_str()]);
    daemon.wait_ready();
    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("the log file {} was not written: {e}", log.display()));
    assert!(
        text.lines()
            .any(|l| l.contains("enforcing: 1 of 1 services managed")),
        "the log file lacks the enforcing line:\n{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in the log file:\n{text}"
    );
    let mode = std::fs::metadata(&log)
        .expect("stat the log")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "log file mode");
    assert!(
        !daemon.log().contains("enforcing: 1 of 1"),
        "the log also went to stderr:\n{}",
        daemon.log()
    );
}

#[test]
fn daemon_guard_stops_bulkhead_when_a_test_panics() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let targets = Targets::new();
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let before = ProgSnapshot::take();
    let mut pid = None;
    let mut ours = BTreeSet::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let daemon = Daemon::start(&policies);
        pid = daemon.pid();
        ours = our_programs(&daemon);
        panic!("deliberate panic with a running daemon (the log printed below is expected)");
    }));
    assert!(result.is_err(), "the closure was meant to panic");

    let pid = pid.expect("the daemon started before the panic");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "bulkhead ({pid}) still exists after its guard was dropped"
    );
    assert_unloaded(&ours, &before);
    targets.assert_allowed(
        &probe!().in_cgroup(svc.path()),
        "after the guard stopped bulkhead",
    );
}

/// `status` names the cgroup2 mount the agent found (`/sys/fs/cgroup` on a
/// pure v2 host, `/sys/fs/cgroup/unified` on a hybrid one) and whether the
/// cgroup creation tracepoint is attached; the metric says the same.
#[test]
fn status_reports_the_cgroup_mount_and_the_creation_hook() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("svc.toml", &service_policy(&svc, "enforce", &[]))]);
    let daemon = Daemon::start(&policies);
    let status = status(&daemon);
    assert_eq!(
        status["cgroup2"].as_str(),
        cgroup2_mount().to_str(),
        "status must name the cgroup2 mount: {status:#}"
    );
    // tracefs and the tracepoint are there on every kernel the suite runs
    // on (the agent mounts tracefs when it is not).
    let (active, says) = status_feature(&status, "cgroup_creation");
    assert!(
        active,
        "the cgroup_mkdir tracepoint must be attached: {says}"
    );
    assert_eq!(
        sample_count(
            &scrape(metrics_addr(&daemon)),
            "bulkhead_kernel_feature",
            &[("feature", "cgroup_creation")]
        ),
        Some(1)
    );
}
