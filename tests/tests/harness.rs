//! The harness itself, without the daemon: guards clean up even when a test
//! panics, and the probe reports what the kernel said.

use std::{
    fs,
    panic::{catch_unwind, AssertUnwindSafe},
    path::PathBuf,
};

use integration_tests::{
    addr, cgroup2_mount,
    netns::{link_exists, netns_exists},
    probe, require_bpf, CgroupGuard, NetnsGuard, Proto,
};

/// What the panicking scope made, to look for afterwards.
#[derive(Default)]
struct Made {
    cgroup: Option<PathBuf>,
    netns: Option<String>,
    veth: Option<String>,
    pids: Vec<u32>,
}

/// Whether `pid` is still a live process (a killed, unreaped child is a
/// zombie: dead, but still in /proc).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        !matches!(state, Some(Some('Z' | 'X')))
    })
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    if !require_bpf() {
        return;
    }
    let mut made = Made::default();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let remote = NetnsGuard::new();
        let svc = CgroupGuard::new();
        let inner = svc.child("worker/inner");
        made.cgroup = Some(svc.path().to_path_buf());
        made.netns = Some(remote.name().to_owned());
        made.veth = Some(remote.host_if().to_owned());
        // Processes the guards must deal with: one in a nested cgroup, one
        // inside the namespace. Forgotten, so only the guards can end them.
        let in_cgroup = probe!()
            .in_cgroup(&inner)
            .listen(Proto::Tcp, addr("127.0.0.1:0"));
        let in_netns = probe!().in_netns(remote.name()).listen(
            Proto::Udp,
            std::net::SocketAddr::new(remote.v4(2).into(), 0),
        );
        made.pids = vec![in_cgroup.pid(), in_netns.pid()];
        assert_eq!(
            svc.pids(),
            vec![in_cgroup.pid()],
            "probe joined the nested cgroup"
        );
        std::mem::forget(in_cgroup);
        std::mem::forget(in_netns);
        panic!("deliberate panic inside the guards' scope (expected)");
    }));
    assert!(result.is_err(), "the closure was meant to panic");

    let cgroup = made.cgroup.expect("the cgroup was made");
    assert!(
        !cgroup.exists(),
        "cgroup {} is still there after a panic",
        cgroup.display()
    );
    let netns = made.netns.expect("the netns was made");
    assert!(
        !netns_exists(&netns),
        "netns {netns} is still there after a panic"
    );
    let veth = made.veth.expect("the veth was made");
    assert!(
        !link_exists(&veth),
        "veth {veth} is still there after a panic"
    );
    for pid in made.pids {
        assert!(!alive(pid), "process {pid} survived its guard");
    }
}

#[test]
fn cgroup_guard_makes_unique_nested_cgroups_under_the_cgroup2_mount() {
    if !require_bpf() {
        return;
    }
    let (a, b) = (CgroupGuard::new(), CgroupGuard::new());
    assert_ne!(a.path(), b.path());
    let mount = cgroup2_mount();
    assert_eq!(a.path().parent(), Some(mount.as_path()));
    assert!(
        a.path().join("cgroup.procs").is_file(),
        "{} is not a cgroup",
        a.path().display()
    );
    let expected = format!(
        "/{}",
        a.path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("cgroup names are UTF-8")
    );
    assert_eq!(a.policy_path(), expected);
    let inner = a.child("x/y");
    assert!(inner.join("cgroup.procs").is_file());
}

#[test]
fn probe_reports_the_kernels_answer() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let tcp = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let udp = probe!().listen(Proto::Udp, addr("[::1]:0"));
    let client = probe!().in_cgroup(svc.path());
    client
        .tcp_connect(tcp.addr())
        .assert_ok("plain loopback TCP");
    client
        .udp_connect(udp.addr())
        .assert_ok("plain loopback UDP");
    client
        .udp_sendto(udp.addr())
        .assert_ok("plain loopback UDP");
    // Nothing listens on the first port after tcp's once it is gone.
    let port = tcp.port();
    drop(tcp);
    let refused = client.tcp_connect(addr(&format!("127.0.0.1:{port}")));
    assert_eq!(
        (refused.ok, refused.errno, refused.stage.as_deref()),
        (false, Some(libc::ECONNREFUSED), Some("connect")),
        "a closed port is refused by the peer, not denied: {}",
        refused.json
    );
}

#[test]
fn remote_host_namespace_is_reachable_over_veth() {
    if !require_bpf() {
        return;
    }
    let remote = NetnsGuard::new();
    let there = probe!().in_netns(remote.name());
    let tcp4 = there.listen(
        Proto::Tcp,
        std::net::SocketAddr::new(remote.add_addr_v4(5).into(), 0),
    );
    let tcp6 = there.listen(
        Proto::Tcp,
        std::net::SocketAddr::new(remote.v6(2).into(), 0),
    );
    probe!()
        .tcp_connect(tcp4.addr())
        .assert_ok("IPv4 over the veth");
    probe!()
        .tcp_connect(tcp6.addr())
        .assert_ok("IPv6 over the veth");
    // The listener really is in the namespace: from inside it, the
    // root side's address answers nothing.
    let probe_back = there.tcp_connect(addr(&format!("{}:{}", remote.v4(1), tcp4.port())));
    assert!(
        !probe_back.ok,
        "root side has no listener: {}",
        probe_back.json
    );
}
