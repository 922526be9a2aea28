//! Process identity (issue 22, docs/policy.md "Executables and users"):
//! every decision names the executable that made the call, by its real
//! path, however the process came to be (started before the agent, short
//! lived, a forked child, a thread, run through a symlink), and a rule
//! that names executables or users allows only their calls: a service's
//! own binary reaches its database, a shell or an interpreter started in
//! the same cgroup gets EPERM, a forged `comm` changes nothing, and an
//! upgrade (a new file renamed over the path) keeps the rule.
//!
//! The executables are copies of the probe under other paths: each copy
//! is its own file, so its own identity to the kernel.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use integration_tests::{
    addr, bulkhead,
    control::{cli, status, wait_status, SharedPins},
    events::{calls_of, wait_calls, wait_event},
    executables::{Executables, Forger, Overlay},
    maps, policy_with, probe,
    process::scaled,
    require_bpf,
    resolving::exec_in,
    service_policy, CgroupGuard, Daemon, Egress, Ingress, Listener, PolicyDir, Probe, Proto,
};
use serde_json::Value;

/// Summaries every second, so a test waits about one.
const CONFIG: &str = "[flows]\ninterval_secs = 1\n";
/// How long every call may take to be reported, and the wait after for a
/// call too many: two sweeps.
const REPORTED: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_millis(2500);
/// How long an interpreter or a shell may take to run its one connect
/// (times `BULKHEAD_TIMEOUT_SCALE`: see `run_limit`).
const RUN: Duration = Duration::from_secs(20);
/// How long Python's connect may wait for an answer: a refused or allowed
/// connect to loopback has its answer at once, so reaching this says the
/// connect hung (a handshake dropped), not that the interpreter was slow.
const CONNECT_WAIT_S: u32 = 10;

/// [`RUN`], scaled: an interpreter's start in an emulated guest late in a
/// long suite has been seen to pass 20 s.
fn run_limit() -> Duration {
    scaled(RUN)
}
/// Connects per executable in the attribution test.
const CONNECTS: u64 = 50;

/// The real path of `p` (what `exe` must say).
fn real(p: &Path) -> String {
    fs::canonicalize(p)
        .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", p.display()))
        .to_string_lossy()
        .into_owned()
}

/// The events of `service` to `port` that report calls (records and
/// summaries).
fn calls_to(service: &str, port: u16) -> impl Fn(&Value) -> bool + '_ {
    move |ev| {
        ev["service"] == service
            && ev["dst_port"] == port
            && (ev["type"] == "verdict" || ev["type"] == "flow")
            && ev["calls"].as_u64().is_some_and(|c| c > 0)
    }
}

/// Calls per (`exe`, verdict) over `events`; a call with no `exe` counts
/// under "(none)".
fn calls_by_exe(events: &[Value]) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for ev in events {
        let exe = ev["exe"].as_str().unwrap_or("(none)").to_owned();
        let verdict = ev["verdict"].as_str().unwrap_or("(none)").to_owned();
        *out.entry((exe, verdict)).or_insert(0) += ev["calls"].as_u64().unwrap_or(0);
    }
    out
}

/// A TCP listener on loopback, unmanaged.
fn listener() -> Listener {
    probe!().listen(Proto::Tcp, addr("127.0.0.1:0"))
}

/// A TCP rule to `to` on loopback.
fn tcp_to(to: &Listener) -> Egress {
    Egress::to(["127.0.0.1"]).ports([to.port()]).protocol("tcp")
}

/// The scene most tests share: a database listener, a service cgroup, the
/// app (a copy of the probe in a directory of executables) and a policy
/// whose database rule names the app.
struct Shop {
    db: Listener,
    svc: CgroupGuard,
    exes: Executables,
    app: PathBuf,
    policies: PolicyDir,
}

impl Shop {
    fn new() -> Self {
        Self::on(Executables::new())
    }

    fn on(exes: Executables) -> Self {
        let db = listener();
        let svc = CgroupGuard::new();
        let app = exes.copy(probe!().bin(), "app");
        let policies = PolicyDir::with(&[(
            "shop.toml",
            &service_policy(&svc, "enforce", &[tcp_to(&db).exe([&app])]),
        )]);
        Self {
            db,
            svc,
            exes,
            app,
            policies,
        }
    }
}

/// What a Python `connect()` to `port` came to (`connected` or `errno N`),
/// and the executable the kernel says the interpreter runs
/// (`/proc/self/exe`: on PATH there may be a wrapper script, such as a
/// version manager's shim).
fn python_connect(client: &Probe, port: u16) -> (String, String) {
    let script = format!(
        "import os, socket\nprint(os.readlink('/proc/self/exe'), flush=True)\ns = socket.socket()\n\
         s.settimeout({CONNECT_WAIT_S})\ntry:\n    s.connect(('127.0.0.1', {port}))\n    \
         print('connected')\nexcept OSError as e:\n    print('errno', e.errno if e.errno is not None else repr(e))\n"
    );
    let out = exec_in(client, &["python3", "-c", &script], run_limit());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let exe = lines.next().unwrap_or_default().to_owned();
    (lines.next().unwrap_or_default().to_owned(), exe)
}

/// What a bash `/dev/tcp` connect to `port` came to (`connected` or bash's
/// error), and bash's executable as the kernel says.
fn bash_connect(client: &Probe, port: u16) -> (String, String) {
    let script =
        format!("readlink /proc/$$/exe; exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");
    let out = exec_in(client, &["bash", "-c", &script], run_limit());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let exe = lines.next().unwrap_or_default().to_owned();
    let rest = format!(
        "{}{}",
        lines.collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (rest, exe)
}

/// 20 executables × 50 connects, each made another way: one process
/// started before the agent, 50 short-lived processes through a symlink,
/// 50 forked children (no exec), 50 threads, 50 `clone(CLONE_VM |
/// CLONE_VFORK)` children, and 15 copies connecting from 5 processes each.
/// Every call is attributed to its executable's real path, exactly.
#[test]
fn every_decision_names_the_executable_that_made_it() {
    if !require_bpf() {
        return;
    }
    let server = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let base = probe!();
    let copies: Vec<PathBuf> = (0..20)
        .map(|i| exes.copy(base.bin(), &format!("client-{i:02}")))
        .collect();
    let link = exes.symlink(&copies[0], "client-link");
    let run = |bin: &Path| base.with_bin(bin).in_cgroup(svc.path());
    let policies = PolicyDir::with(&[(
        "who.toml",
        &service_policy(&svc, "enforce", &[tcp_to(&server)]),
    )]);
    let fifty = vec![server.addr(); 50];

    let early = run(&copies[1]).waiting("tcp-connect-each", &fifty);
    let daemon = Daemon::start_with_config(&policies, CONFIG);
    early.go().assert_ok("the process started before the agent");

    let mut lifetimes = Vec::new();
    for _ in 0..CONNECTS {
        let started = Instant::now();
        run(&link)
            .tcp_connect(server.addr())
            .assert_ok("a short-lived process run through a symlink");
        lifetimes.push(started.elapsed());
    }
    for _ in 0..CONNECTS {
        run(&copies[2])
            .tcp_connect_via("fork", server.addr())
            .assert_ok("a forked child");
        run(&copies[3])
            .tcp_connect_via("thread", server.addr())
            .assert_ok("a thread");
        run(&copies[4])
            .tcp_connect_via("vfork", server.addr())
            .assert_ok("a vfork child");
    }
    for copy in &copies[5..] {
        for _ in 0..5 {
            run(copy)
                .tcp_connect_each(&fifty[..10])
                .assert_ok("ten connects");
        }
    }

    lifetimes.sort();
    // Under emulation (a guest kernel) everything is slower by the scale.
    let short = scaled(Duration::from_millis(100));
    assert!(
        lifetimes[lifetimes.len() / 2] < short,
        "the short-lived processes live under {short:?} (median, from spawn to exit): {lifetimes:?}"
    );
    let events = wait_calls(
        &daemon,
        "connects",
        CONNECTS * 20,
        REPORTED,
        SETTLE,
        calls_to("who", server.port()),
    );
    let want: BTreeMap<(String, String), u64> = copies
        .iter()
        .map(|c| ((real(c), "allow".to_owned()), CONNECTS))
        .collect();
    assert_eq!(
        calls_by_exe(&events),
        want,
        "every call under its executable's real path ({} events)",
        events.len()
    );
    assert_eq!(calls_of(&events), CONNECTS * 20);
}

/// A database rule that names the service's own binary: that binary
/// connects, python3 and bash in the same cgroup (started by it, as an
/// attacker's shell would be) get EPERM, and so does another binary; a
/// rule without `exe` still serves them all.
#[test]
fn only_the_services_own_binary_reaches_its_database() {
    if !require_bpf() {
        return;
    }
    let (db, cache) = (listener(), listener());
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    let tool = exes.copy(probe!().bin(), "tool");
    // The rule names the app through a symlink: the file it resolves to counts.
    let link = exes.symlink(&app, "app-link");
    let policies = PolicyDir::with(&[(
        "shop.toml",
        &service_policy(&svc, "enforce", &[tcp_to(&db).exe([&link]), tcp_to(&cache)]),
    )]);
    let daemon = Daemon::start(&policies);
    let as_app = probe!().with_bin(&app).in_cgroup(svc.path());
    let as_tool = probe!().with_bin(&tool).in_cgroup(svc.path());

    as_app
        .tcp_connect(db.addr())
        .assert_ok("the service's own binary");
    as_tool
        .tcp_connect(db.addr())
        .assert_eperm("another binary in the same cgroup");
    as_tool
        .tcp_connect(cache.addr())
        .assert_ok("a rule without exe serves every binary");
    let (python, python_exe) = python_connect(&as_app, db.port());
    assert_eq!(python, "errno 1", "python3");
    assert_eq!(
        python_connect(&as_app, cache.port()).0,
        "connected",
        "python3"
    );
    let (bash, bash_exe) = bash_connect(&as_app, db.port());
    assert!(
        bash.contains("Operation not permitted") && !bash.contains("connected"),
        "bash's /dev/tcp connect to the database gets EPERM: {bash:?}"
    );
    assert_eq!(bash_connect(&as_app, cache.port()).0, "connected", "bash");

    for (program, exe) in [("python3", python_exe), ("bash", bash_exe)] {
        assert!(exe.starts_with('/'), "{program}'s /proc/self/exe: {exe:?}");
        let denied = wait_event(&daemon, &format!("{program}'s denied connect"), |ev| {
            ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["exe"] == exe.as_str()
        });
        assert_eq!(
            (&denied["verdict"], &denied["rule"]),
            (&"deny".into(), &"shop.toml#default-deny".into()),
            "{denied:#}"
        );
    }
    let allowed = wait_event(&daemon, "the app's allowed connect", |ev| {
        ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["verdict"] == "allow"
    });
    assert_eq!(allowed["exe"], real(&app), "{allowed:#}");
}

/// A script runs as its interpreter: a rule naming the interpreter lets a
/// script it runs through (the record names the interpreter, the `comm`
/// the script), and a shell in the same cgroup still gets EPERM.
#[test]
fn a_rule_naming_the_interpreter_serves_its_scripts() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    // The interpreter as the kernel runs it (PATH may hold a wrapper).
    let (_, python) = python_connect(&probe!(), db.port());
    let script = exes.path().join("job.py");
    fs::write(
        &script,
        format!(
            "#!{python}\nimport socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', \
             {}))\n    print('connected')\nexcept OSError as e:\n    print('errno', e.errno)\n",
            db.port()
        ),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", script.display()));
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", script.display()));
    let policies = PolicyDir::with(&[(
        "jobs.toml",
        &service_policy(&svc, "enforce", &[tcp_to(&db).exe([&python])]),
    )]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());

    let ran = exec_in(&client, &[&script.to_string_lossy()], run_limit());
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "connected",
        "the script, run by the interpreter the rule names: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let (bash, _) = bash_connect(&client, db.port());
    assert!(
        bash.contains("Operation not permitted"),
        "a shell in the same service: {bash:?}"
    );
    let ev = wait_event(&daemon, "the script's connect", |ev| {
        ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["verdict"] == "allow"
    });
    assert_eq!(
        (&ev["exe"], &ev["comm"]),
        (&python.as_str().into(), &"job.py".into()),
        "{ev:#}"
    );
}

/// The graph counts each destination's calls per executable, and `learn
/// --exe` writes them as each rule's `exe` list; once the learned policy is
/// in force, each program reaches what it used and gets EPERM for what
/// only the other used.
#[test]
fn learn_with_exe_names_the_programs_that_used_each_destination() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let cache = probe!().listen(Proto::Tcp, addr("127.0.0.2:0"));
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    let tool = exes.copy(probe!().bin(), "tool");
    let policies = PolicyDir::with(&[("shop.toml", &service_policy(&svc, "audit", &[]))]);
    let daemon = Daemon::start(&policies);
    let as_app = probe!().with_bin(&app).in_cgroup(svc.path());
    let as_tool = probe!().with_bin(&tool).in_cgroup(svc.path());
    for _ in 0..2 {
        as_app.tcp_connect(db.addr()).assert_ok("audit mode");
    }
    as_tool.tcp_connect(cache.addr()).assert_ok("audit mode");

    let used = |port: u16| {
        move |g: &Value| {
            g["edges"].as_array().and_then(|edges| {
                edges
                    .iter()
                    .find(|e| e["from"] == "service:shop" && e["port"] == port)
                    .map(|e| e["executables"].clone())
            })
        }
    };
    let graph =
        integration_tests::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let g: Value = serde_json::from_str(&cli(&daemon, &["graph"])).unwrap_or(Value::Null);
            match (used(db.port())(&g), used(cache.port())(&g)) {
                (Some(a), Some(b)) if a != Value::Null && b != Value::Null => Ok(g),
                _ => Err(g),
            }
        })
        .unwrap_or_else(|g| panic!("no edges to both destinations in the graph: {g:#}"));
    assert_eq!(
        used(db.port())(&graph),
        Some(serde_json::json!({ real(&app): 2 }))
    );
    assert_eq!(
        used(cache.port())(&graph),
        Some(serde_json::json!({ real(&tool): 1 }))
    );

    let file = policies.path().join("shop.toml");
    let file_arg = file.to_string_lossy();
    let said = cli(
        &daemon,
        &[
            "learn",
            "shop",
            "--enforce",
            "--exe",
            "--output",
            &file_arg,
            "--force",
        ],
    );
    assert!(said.contains("passes `bulkhead check`"), "{said}");
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    for (port, exe) in [(db.port(), &app), (cache.port(), &tool)] {
        let want = format!(
            "ports = [{port}]\nprotocol = \"tcp\"\nexe = [{:?}]\n",
            real(exe)
        );
        assert!(
            text.contains(&want),
            "the learned rule for {port}: {want:?} in\n{text}"
        );
    }
    let _applied = wait_status(&daemon, "the learned policy applied", RELOAD, |st| {
        st["reloads_applied"] == 1
    });
    as_app
        .tcp_connect(db.addr())
        .assert_ok("the app, to what it used");
    as_tool
        .tcp_connect(cache.addr())
        .assert_ok("the tool, to what it used");
    as_tool
        .tcp_connect(db.addr())
        .assert_eperm("the tool, to what only the app used");
    as_app
        .tcp_connect(cache.addr())
        .assert_eperm("the app, to what only the tool used");
}

/// `uid = [65534]`: the service's processes of that user connect, its
/// root processes get EPERM.
#[test]
fn a_uid_rule_allows_only_that_user() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[(
        "batch.toml",
        &service_policy(&svc, "enforce", &[tcp_to(&db).uid([65534])]),
    )]);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    client
        .as_nobody()
        .tcp_connect(db.addr())
        .assert_ok("uid 65534");
    client.tcp_connect(db.addr()).assert_eperm("uid 0");
    let allowed = wait_event(&daemon, "the allowed connect", |ev| {
        ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["verdict"] == "allow"
    });
    assert_eq!(allowed["uid"], 65534, "{allowed:#}");
}

/// A forged `comm` (`prctl(PR_SET_NAME)`) changes the name in the log,
/// not the identity: another binary calling itself `app` is denied, the
/// app calling itself `nginx` is allowed, and both records say who they
/// really are.
#[test]
fn a_forged_comm_does_not_change_the_executable() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    let tool = exes.copy(probe!().bin(), "tool");
    let policies = PolicyDir::with(&[(
        "shop.toml",
        &service_policy(&svc, "enforce", &[tcp_to(&db).exe([&app])]),
    )]);
    let daemon = Daemon::start(&policies);
    let run = |bin: &Path, comm: &str| probe!().with_bin(bin).in_cgroup(svc.path()).comm(comm);

    run(&tool, "app")
        .tcp_connect(db.addr())
        .assert_eperm("another binary naming itself app");
    run(&app, "nginx")
        .tcp_connect(db.addr())
        .assert_ok("the app naming itself nginx");
    for (comm, exe, verdict) in [("app", &tool, "deny"), ("nginx", &app, "allow")] {
        let ev = wait_event(&daemon, &format!("the connect of comm {comm}"), |ev| {
            ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["comm"] == comm
        });
        assert_eq!(
            (&ev["exe"], &ev["verdict"]),
            (&real(exe).into(), &verdict.into()),
            "{ev:#}"
        );
    }
}

/// An upgrade renames a new file over the app's path: the new file is a
/// new identity (its records say the path; the old process's say the path
/// and " (deleted)"), and both keep the rule, with no reload.
#[test]
fn a_replaced_binary_is_told_apart_and_keeps_its_rule() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes,
        app,
        policies,
    } = Shop::new();
    let daemon = Daemon::start(&policies);
    let as_app = probe!().with_bin(&app).in_cgroup(svc.path());
    let old = as_app.waiting("tcp-connect", &[db.addr()]);

    exes.replace(&app, probe!().bin());
    daemon.wait_log(
        "an `exe` path names a new file (replaced on disk)",
        Duration::from_secs(10),
    );
    as_app
        .tcp_connect(db.addr())
        .assert_ok("the new file at the rule's path");
    old.go().assert_ok("the old file, still running");

    let path = real(&app);
    let gone = format!("{path} (deleted)");
    for exe in [&path, &gone] {
        let ev = wait_event(&daemon, &format!("the connect of {exe}"), |ev| {
            ev["type"] == "verdict" && ev["dst_port"] == db.port() && ev["exe"] == exe.as_str()
        });
        assert_eq!(ev["verdict"], "allow", "{ev:#}");
    }
}

/// A new file at the rule's path that a user other than root owns is not
/// followed: whoever could put it there could make any program pass as
/// the app. The agent says so, and the new file gets EPERM.
#[test]
fn a_replacement_another_user_owns_is_not_followed() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes,
        app,
        policies,
    } = Shop::new();
    let daemon = Daemon::start(&policies);
    let staged = exes.copy(probe!().bin(), "app.staged");
    std::os::unix::fs::chown(&staged, Some(65534), Some(65534))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", staged.display()));
    fs::rename(&staged, &app).unwrap_or_else(|e| panic!("cannot rename over the app: {e}"));
    daemon.wait_log("that its rules do NOT allow", Duration::from_secs(10));
    probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .tcp_connect(db.addr())
        .assert_eperm("a new file another user owns");
}

/// An upgrade frees the old binary's inode once nothing holds it, and the
/// filesystem gives its number to the next new file (ext4 hands out the
/// lowest free one): an attacker's file made then would have the old
/// binary's device and inode. While the agent runs it holds every file an
/// `exe` entry names open, so the number is not freed (64 new files, none
/// gets it); once it has stopped (the pinned programs enforce alone) the
/// number is reused, and the inode's generation, which ext4 draws anew for
/// each file, tells the new file apart: EPERM.
#[test]
fn a_file_reusing_an_upgraded_binarys_inode_is_not_the_binary() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes,
        app,
        policies,
    } = Shop::on(Executables::on_own_ext4());
    let mut daemon = Daemon::start_with_config(&policies, CONFIG);
    let as_app = probe!().with_bin(&app).in_cgroup(svc.path());
    as_app
        .tcp_connect(db.addr())
        .assert_ok("the app, before the upgrade");
    let ino_of = |p: &Path| {
        fs::metadata(p)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", p.display()))
            .ino()
    };
    let attacker = |file: &Path, what: &str| {
        probe!()
            .with_bin(file)
            .in_cgroup(svc.path())
            .tcp_connect(db.addr())
            .assert_eperm(what);
    };

    let first = ino_of(&app);
    exes.replace(&app, probe!().bin());
    daemon.wait_log(
        "an `exe` path names a new file (replaced on disk)",
        Duration::from_secs(10),
    );
    as_app
        .tcp_connect(db.addr())
        .assert_ok("the app after the upgrade");
    exes.files_not_reusing(first);

    assert!(daemon.stop().success(), "{}", daemon.log());
    let reuser = exes.reusing_inode(first, probe!().bin());
    attacker(&reuser, "a new file on the app's old inode, with no agent");
    // The file the agent followed to: its inode goes the same way.
    let second = ino_of(&app);
    exes.replace(&app, probe!().bin());
    let reuser = exes.reusing_inode(second, probe!().bin());
    attacker(
        &reuser,
        "a new file on the followed file's inode, with no agent",
    );
    daemon.detach();
}

/// The table of executables holds one entry per process: a thread has
/// none of its own (its calls are its process's), so making threads fills
/// nothing; a thread that execs leaves no entry at its old id behind, and
/// the process's entry is the new program.
#[test]
fn threads_take_no_entries_and_an_exec_from_a_thread_leaves_none() {
    if !require_bpf() {
        return;
    }
    let policies = PolicyDir::with(&[]);
    let daemon = Daemon::start(&policies);
    let script = "import os, sys, threading, time\n\
        gate = threading.Event()\n\
        tids = []\n\
        def wait():\n    tids.append(threading.get_native_id())\n    gate.wait()\n\
        for _ in range(20):\n    threading.Thread(target=wait, daemon=True).start()\n\
        while len(tids) < 20:\n    time.sleep(0.01)\n\
        print(os.getpid(), *tids, flush=True)\n\
        sys.stdin.readline()\n\
        def run():\n    print(threading.get_native_id(), flush=True)\n    \
        os.execv('/bin/sleep', ['sleep', '60'])\n\
        threading.Thread(target=run).start()\n\
        time.sleep(60)\n";
    let mut py = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start python3: {e}"));
    let mut out = std::io::BufReader::new(py.stdout.take().expect("piped"));
    let mut line = String::new();
    let mut next_ids = |what: &str| -> Vec<u32> {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line)
            .unwrap_or_else(|e| panic!("python3 said nothing of {what}: {e}"));
        line.split_whitespace()
            .map(|t| t.parse().unwrap_or_else(|e| panic!("{what}: {t:?}: {e}")))
            .collect()
    };
    let ids = next_ids("its threads");
    let (pid, threads) = ids.split_first().expect("python3 printed its pid");
    assert_eq!(threads.len(), 20, "{ids:?}");
    let table = || -> BTreeMap<u32, Vec<u8>> {
        maps::dump(&maps::pinned(&daemon, "PROCESSES"))
            .into_iter()
            .map(|(k, v)| (u32::from_ne_bytes(k[..4].try_into().expect("u32 key")), v))
            .collect()
    };
    let now = table();
    assert!(now.contains_key(pid), "python3 ({pid}) has its entry");
    for t in threads {
        assert!(!now.contains_key(t), "thread {t} of {pid} has an entry");
    }

    std::io::Write::write_all(py.stdin.as_mut().expect("piped"), b"\n").expect("to python3");
    let execd = next_ids("the thread that execs")[0];
    assert_ne!(execd, *pid, "the exec is from a thread, not the leader");
    let sleep = fs::canonicalize("/bin/sleep").expect("sleep");
    let ino = fs::metadata(&sleep).expect("stat sleep").ino();
    // /proc names the new file before the exec tracepoint has run: wait
    // for the table's entry.
    let entry_ino = |t: &BTreeMap<u32, Vec<u8>>| {
        t.get(pid)
            .map(|e| u64::from_ne_bytes(e[..8].try_into().expect("ino")))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let t = table();
        if entry_ino(&t) == Some(ino) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "{pid}'s entry is not {}'s inode {ino} after its exec: {:?}",
            sleep.display(),
            t.get(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = py.kill();
    let _ = py.wait();
    assert!(
        !after.contains_key(&execd),
        "the exec'd thread's old id {execd} has an entry"
    );
}

/// `[[ingress]]` with `exe`: a peer reaches the service's socket that the
/// named binary listens on; the same peer's SYN to a socket another binary
/// of the service listens on is dropped.
#[test]
fn an_ingress_rule_names_the_listening_binary() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    let tool = exes.copy(probe!().bin(), "tool");
    let rule = Ingress::from(["127.0.0.1"]).protocol("tcp").exe([&app]);
    let policies = PolicyDir::with(&[("web.toml", &policy_with(&svc, "enforce", &[&rule]))]);
    let daemon = Daemon::start(&policies);
    // Started after the agent, so that bind() records the binder.
    let served = probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .listen(Proto::Tcp, addr("127.0.0.1:0"));
    let other = probe!()
        .with_bin(&tool)
        .in_cgroup(svc.path())
        .listen(Proto::Tcp, addr("127.0.0.1:0"));
    let peer = probe!().step_timeout(Duration::from_millis(1500));

    peer.tcp_connect(served.addr())
        .assert_ok("the socket the named binary listens on");
    peer.tcp_connect(other.addr())
        .assert_timed_out("connect", "a socket another binary listens on");
    let dropped = wait_event(&daemon, "the dropped SYN", |ev| {
        ev["type"] == "verdict" && ev["hook"] == "ingress" && ev["src_port"] == other.port()
    });
    assert_eq!(dropped["verdict"], "deny", "{dropped:#}");
}

/// A process the kernel's table has no record of (here: its entry deleted,
/// as an eviction from the full table would) satisfies no `exe` list: the
/// app's own process is then denied, and its record has no `exe`.
#[test]
fn a_process_the_kernel_has_no_record_of_satisfies_no_exe_rule() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes: _exes,
        app,
        policies,
    } = Shop::new();
    let daemon = Daemon::start(&policies);
    let as_app = probe!().with_bin(&app).in_cgroup(svc.path());
    let forgotten = as_app.waiting("tcp-connect", &[db.addr()]);
    let pid = forgotten.pid();
    maps::delete(&maps::pinned(&daemon, "PROCESSES"), &pid.to_ne_bytes());

    forgotten
        .go()
        .assert_eperm("the app, once the kernel has no record of it");
    as_app
        .tcp_connect(db.addr())
        .assert_ok("a new process of the app");
    let ev = wait_event(&daemon, "the forgotten process's connect", |ev| {
        ev["type"] == "verdict" && ev["pid"] == pid
    });
    assert_eq!(
        (&ev["verdict"], &ev["exe"]),
        (&"deny".into(), &Value::Null),
        "{ev:#}"
    );
}

/// An executable on an overlay whose layers are on two filesystems: `stat`
/// gives it another device than the kernel records for it running, so a
/// rule naming it can never match. `bulkhead check` says so at the rule's
/// line, the rule denies (fail closed), and the record still names the
/// file, not as deleted.
#[test]
fn an_exe_whose_device_the_kernel_sees_otherwise_is_flagged_and_denies() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    exes.copy(probe!().bin(), "app");
    let overlay = Overlay::over(&exes);
    let app = overlay.path().join("app");
    let text = service_policy(&svc, "enforce", &[tcp_to(&db).exe([&app])]);
    let line = text
        .lines()
        .position(|l| l.starts_with("exe"))
        .map_or(0, |i| i + 1);
    let policies = PolicyDir::with(&[("shop.toml", &text)]);
    let checked = bulkhead(&[
        std::ffi::OsStr::new("check"),
        "--policy-dir".as_ref(),
        policies.path().as_os_str(),
    ]);
    let said = String::from_utf8_lossy(&checked.stderr);
    let at = format!("{}:{line}:", policies.path().join("shop.toml").display());
    assert!(
        checked.status.success()
            && said.contains(&at)
            && said.contains("never matches, and denies"),
        "bulkhead check warns at {at}: {said}"
    );
    let daemon = Daemon::start(&policies);
    probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .tcp_connect(db.addr())
        .assert_eperm("the rule cannot match the file as the kernel sees it");
    let ev = wait_event(&daemon, "the denied connect", |ev| {
        ev["type"] == "verdict" && ev["dst_port"] == db.port()
    });
    assert_eq!(
        (&ev["verdict"], &ev["exe"]),
        (&"deny".into(), &app.to_string_lossy().as_ref().into()),
        "{ev:#}"
    );
}

/// A process that forged its executable (`prctl(PR_SET_MM_MAP)` in a user
/// namespace of its own: `/proc/PID/exe` then names the app) is not taken
/// for the app: not by an agent that starts after the forgery (its scan
/// leaves processes of other user namespaces unknown), and not through a
/// fork once its own entry is gone (a child of an unknown parent is
/// unknown; the live `mm` is never read).
#[test]
fn a_forged_executable_is_never_taken_for_the_real_one() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes: _exes,
        app,
        policies,
    } = Shop::new();
    let mut before_agent = Forger::start(svc.path(), &app, db.addr());
    assert_eq!(
        before_agent.proc_exe,
        real(&app),
        "the forgery shows in /proc"
    );
    let daemon = Daemon::start(&policies);
    assert_eq!(
        before_agent.connect(),
        (i64::from(libc::EPERM), -i64::from(libc::EPERM)),
        "forged before the agent started: its child and itself get EPERM"
    );
    let mut after_agent = Forger::start(svc.path(), &app, db.addr());
    assert_eq!(
        after_agent.connect(),
        (i64::from(libc::EPERM), -i64::from(libc::EPERM)),
        "forged under the agent"
    );
    // What an eviction from the full table does to its entry.
    maps::delete(
        &maps::pinned(&daemon, "PROCESSES"),
        &after_agent.pid.to_ne_bytes(),
    );
    assert_eq!(
        after_agent.connect(),
        (i64::from(libc::EPERM), -i64::from(libc::EPERM)),
        "its entry gone, then a fork"
    );
    probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .tcp_connect(db.addr())
        .assert_ok("the app itself");
}

/// A policy naming an executable that is not there, or not by an absolute
/// path, is refused at reload with the file and line; the policy in force
/// stays (the app still connects, another binary still gets EPERM).
#[test]
fn a_bad_exe_is_refused_and_the_old_policy_stays() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    let tool = exes.copy(probe!().bin(), "tool");
    let good = service_policy(&svc, "enforce", &[tcp_to(&db).exe([&app])]);
    let policies = PolicyDir::with(&[("shop.toml", &good)]);
    let daemon = Daemon::start(&policies);
    let assert_old = |why: &str| {
        probe!()
            .with_bin(&app)
            .in_cgroup(svc.path())
            .tcp_connect(db.addr())
            .assert_ok(why);
        probe!()
            .with_bin(&tool)
            .in_cgroup(svc.path())
            .tcp_connect(db.addr())
            .assert_eperm(why);
    };
    assert_old("at start");

    let missing = exes.path().join("not-there");
    let bad = [
        (
            missing.to_string_lossy().into_owned(),
            "No such file or directory",
        ),
        ("bin/app".to_owned(), "is not an absolute path"),
    ];
    for (refused, (exe, problem)) in (1u64..).zip(bad) {
        let text = service_policy(&svc, "enforce", &[tcp_to(&db).exe([&exe])]);
        let line = text
            .lines()
            .position(|l| l.starts_with("exe"))
            .map_or(0, |i| i + 1);
        let file = policies.write("shop.toml", &text);
        let st = wait_status(&daemon, "a refused reload", RELOAD, |st| {
            st["reloads_refused"] == refused
        });
        let error = st["last_reload_error"].as_str().unwrap_or_default();
        let at = format!("{}:{line}:", file.display());
        assert!(
            error.contains(&at) && error.contains(problem),
            "the error names {at} and says {problem:?}: {st:#}"
        );
        assert_old(&format!("after a reload naming exe {exe:?}"));
    }
    assert_eq!(status(&daemon)["reloads_applied"], 0);
}

/// A file the agent cannot open (its unit gives it no `CAP_DAC_OVERRIDE`:
/// here `bulkhead check` runs without it) is refused at its line: the
/// agent could neither hold it open nor read its inode generation, so a
/// new file given its inode number later would pass as it.
#[test]
fn an_exe_the_agent_cannot_open_is_refused() {
    if !require_bpf() {
        return;
    }
    let db = listener();
    let svc = CgroupGuard::new();
    let exes = Executables::new();
    let app = exes.copy(probe!().bin(), "app");
    std::os::unix::fs::chown(&app, Some(65534), Some(65534))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", app.display()));
    fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", app.display()));
    let text = service_policy(&svc, "enforce", &[tcp_to(&db).exe([&app])]);
    let line = text
        .lines()
        .position(|l| l.starts_with("exe"))
        .map_or(0, |i| i + 1);
    let policies = PolicyDir::with(&[("shop.toml", &text)]);
    let out = integration_tests::process::output_with_timeout(
        std::process::Command::new("setpriv")
            .arg("--bounding-set=-dac_override,-dac_read_search")
            .arg(integration_tests::daemon::bulkhead_bin())
            .arg("check")
            .arg("--policy-dir")
            .arg(policies.path()),
        run_limit(),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    let at = format!("{}:{line}:", policies.path().join("shop.toml").display());
    assert!(
        !out.status.success() && said.contains(&at) && said.contains("cannot open it"),
        "bulkhead check without CAP_DAC_OVERRIDE refuses {} at {at}: {said}",
        app.display()
    );
}

/// After a restart the new agent carries the previous one's table of
/// executables over rather than reading `/proc`: a process that forged
/// what `/proc/PID/exe` says through a memory map it shares with a child
/// in a user namespace of its own (the forger itself stays in the
/// agent's) is still its real executable to the new agent, and gets EPERM;
/// a process of the app started before the first agent still connects.
#[test]
fn a_restart_keeps_each_processs_executable_from_the_kernel_not_proc() {
    if !require_bpf() {
        return;
    }
    let Shop {
        db,
        svc,
        exes: _exes,
        app,
        policies,
    } = Shop::new();
    let shared = SharedPins::new();
    let early = probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .waiting("tcp-connect", &[db.addr()]);
    let mut first = shared.start(&policies);
    let mut forger = Forger::start_sharing_mm(svc.path(), &app, db.addr());
    assert_eq!(forger.proc_exe, real(&app), "the forgery shows in /proc");
    let denied = (i64::from(libc::EPERM), -i64::from(libc::EPERM));
    assert_eq!(
        forger.connect(),
        denied,
        "the first agent: its child and itself"
    );
    assert!(first.stop().success(), "{}", first.log());

    let second = shared.start(&policies);
    assert_eq!(
        forger.connect(),
        denied,
        "the second agent: its child and itself"
    );
    assert!(
        second
            .log()
            .contains("carried over from the previous agent"),
        "{}",
        second.log()
    );
    early
        .go()
        .assert_ok("the app, started before the first agent");
    probe!()
        .with_bin(&app)
        .in_cgroup(svc.path())
        .tcp_connect(db.addr())
        .assert_ok("the app, started after the restart");
}

/// How long a reload may take from the file's change to its outcome.
const RELOAD: Duration = Duration::from_secs(10);
