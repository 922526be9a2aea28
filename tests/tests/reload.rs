//! Changing the policy of a running agent (issue 5): reloads on inotify,
//! SIGHUP and `bulkhead reload` switch atomically, an invalid or insecure
//! policy leaves the one in force untouched, and policy files anyone but
//! root can write are refused. `bulkhead reload` (the unit's `ExecReload=`)
//! says which, by its output and exit code (issue 20).
//!
//! Services whose cgroup appears, or appears again, after the agent started
//! are in `services.rs` (`service_started_after_bulkhead_is_enforced`,
//! `restarted_service_is_enforced_again`).

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::{chown, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    addr, allowing, conn,
    conn::{monotonic_ns, Attempt, Verdict},
    control::{is_change, reload, status, status_service, wait_status, PolicyChanges},
    http::metrics_addr,
    probe,
    process::{output_with_timeout, signal},
    prometheus::Scrape,
    require_bpf, CgroupGuard, Daemon, Listener, PolicyDir, Probe, Proto, EPERM,
};
use serde_json::{json, Value};

/// How long one reload may take from the change to its audit event
/// (300 ms settle time, plus at most one 50 ms retire grace, plus slack).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How a reload's audit record describes that rule.
fn rule_line(port: u16) -> String {
    format!("egress to=127.0.0.1/32 ports={port} protocol=any")
}

/// Replaces `name` in `dir` the way an editor or a configuration manager
/// does: written to a name the agent ignores (not `*.toml`), mode 0644,
/// then renamed over the old file. Returns the policy file's path.
fn replace(dir: &PolicyDir, name: &str, contents: &str) -> PathBuf {
    let tmp = dir.path().join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
    let path = dir.path().join(name);
    fs::rename(&tmp, &path)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), path.display()));
    path
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {mode:o} {}: {e}", path.display()));
}

/// The SHA-256 of `path`'s content, by `sha256sum` (lower-case hex).
fn sha256(path: &Path) -> String {
    let out = output_with_timeout(Command::new("sha256sum").arg(path), Duration::from_secs(10));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Three loopback listeners: two that one of the two policies allows each,
/// and one that neither allows.
struct Targets {
    p1: Listener,
    p2: Listener,
    p3: Listener,
}

impl Targets {
    fn new() -> Self {
        Self {
            p1: probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
            p2: probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
            p3: probe!().listen(Proto::Tcp, addr("127.0.0.1:0")),
        }
    }

    /// Asserts that exactly `allowed` (one of p1, p2) is reachable from `client`.
    fn assert_only(&self, client: &Probe, allowed: u16, why: &str) {
        for l in [&self.p1, &self.p2, &self.p3] {
            let outcome = client.tcp_connect(l.addr());
            if l.port() == allowed {
                outcome.assert_ok(why);
            } else {
                outcome.assert_eperm(why);
            }
        }
    }
}

/// Which of the two policies a reload test alternates is in force after
/// `k` reloads: A (the one it starts with) allows p1 only, B p2 only.
fn policy_after(k: usize) -> char {
    if k.is_multiple_of(2) {
        'A'
    } else {
        'B'
    }
}

/// What policy `policy` makes of a connect to `port`.
fn expected(policy: char, port: u16, t: &Targets) -> Verdict {
    let allowed = match policy {
        'A' => t.p1.port(),
        _ => t.p2.port(),
    };
    if port == allowed {
        Verdict::Ok
    } else {
        Verdict::Errno(EPERM)
    }
}

/// One applied reload: when the test changed the file, and the `ktime_ns`
/// of the audit event (stamped after the switch), both `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy)]
struct Switch {
    changed_ns: u64,
    applied_ns: u64,
}

/// The policies (indexes into the alternation) that may have judged
/// `a`: policy k was in force from its switch, somewhere in
/// `[changed_k, applied_k]`, until the next switch.
fn possible(a: &Attempt, switches: &[Switch]) -> std::ops::RangeInclusive<usize> {
    // Policy 0 is the one the agent started with.
    let first = switches
        .iter()
        .rposition(|s| s.applied_ns < a.start_ns)
        .map_or(0, |i| i + 1);
    let last = switches
        .iter()
        .rposition(|s| s.changed_ns <= a.end_ns)
        .map_or(0, |i| i + 1);
    first..=last
}

/// How many reloads the acceptance test makes.
const RELOADS: usize = 100;
/// After a switch the agent keeps the old half for 50 ms (`RETIRE_GRACE`
/// in agent/src/engine.rs), and a reload before then waits for it: 220 ms
/// after an applied reload plus the 300 ms settle time lands well after
/// that grace, so no reload of the test waits for one.
const PACE: Duration = Duration::from_millis(220);

/// The two policies the acceptance test alternates, and their hashes.
struct Alternation {
    a: String,
    b: String,
    sha_a: String,
    sha_b: String,
}

impl Alternation {
    /// Policy text, hash and allowed port of policy `p`.
    fn of<'s>(&'s self, p: char, t: &Targets) -> (&'s str, &'s str, u16) {
        if p == 'A' {
            (&self.a, &self.sha_a, t.p1.port())
        } else {
            (&self.b, &self.sha_b, t.p2.port())
        }
    }
}

/// Makes [`RELOADS`] reloads by replacing `svc.toml` with the policies of
/// `alt` in turn, each once the previous one is applied (plus [`PACE`]);
/// checks each one's audit record and returns when each was made and applied.
fn drive_reloads(
    policies: &PolicyDir,
    changes: &mut PolicyChanges,
    alt: &Alternation,
    t: &Targets,
) -> Vec<Switch> {
    let file = policies.path().join("svc.toml");
    let mut switches: Vec<Switch> = Vec::with_capacity(RELOADS);
    for k in 1..=RELOADS {
        if let Some(prev) = switches.last() {
            let due = prev.applied_ns + u64::try_from(PACE.as_nanos()).unwrap_or(u64::MAX);
            let now = monotonic_ns();
            if due > now {
                thread::sleep(Duration::from_nanos(due - now));
            }
        }
        let (new, sha_new, port_new) = alt.of(policy_after(k), t);
        let (_, sha_old, port_old) = alt.of(policy_after(k - 1), t);
        let changed_ns = monotonic_ns();
        replace(policies, "svc.toml", new);
        let ev = changes.wait_nth(k, "applied reloads", RELOAD_TIMEOUT, |e| {
            is_change(e, "reload", "applied")
        });
        let applied_ns = ev["ktime_ns"]
            .as_u64()
            .unwrap_or_else(|| panic!("reload {k}: no ktime_ns in {ev:#}"));
        assert_eq!(
            ev["change"],
            json!({
                "action": "reload",
                "result": "applied",
                "trigger": "inotify",
                "files": [{
                    "path": file.display().to_string(),
                    "sha256_before": sha_old,
                    "sha256_after": sha_new,
                    "owner_uid": 0,
                    "mode": "0644",
                }],
                "services": [{
                    "service": "svc",
                    "added": [rule_line(port_new)],
                    "removed": [rule_line(port_old)],
                }],
                "error": null,
            }),
            "reload {k}: the audit record of the switch to policy {}",
            policy_after(k)
        );
        assert!(
            applied_ns > changed_ns,
            "reload {k}: applied at {applied_ns} ns, before the file changed at {changed_ns} ns"
        );
        switches.push(Switch {
            changed_ns,
            applied_ns,
        });
    }
    switches
}

/// Asserts every attempt (made from `loop_start` on) was judged by a
/// policy that may have been in force then, that no connection reached
/// p3, that each policy was seen while surely in force, and that the
/// verdicts changed policy exactly once per switch. Returns how many
/// connections were allowed under A and under B.
fn check_judgements(
    attempts: &[Attempt],
    switches: &[Switch],
    t: &Targets,
    loop_start: u64,
) -> (usize, usize) {
    let attempts: Vec<&Attempt> = attempts
        .iter()
        .filter(|at| at.start_ns >= loop_start)
        .collect();
    let mut wrong = Vec::new();
    for at in &attempts {
        let range = possible(at, switches);
        if !range
            .clone()
            .any(|k| expected(policy_after(k), at.port, t) == at.verdict)
        {
            wrong.push(format!(
                "{at:?}: policies possible {:?}",
                range.map(policy_after).collect::<String>()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} connections were judged by neither policy that may have been in force \
         (p1={} p2={} p3={}; A allows p1, B p2); the first: {:#?}",
        wrong.len(),
        attempts.len(),
        t.p1.port(),
        t.p2.port(),
        t.p3.port(),
        &wrong[..wrong.len().min(10)]
    );
    let reached = |port: u16| {
        attempts
            .iter()
            .filter(|at| at.port == port && at.verdict == Verdict::Ok)
            .count()
    };
    assert_eq!(
        reached(t.p3.port()),
        0,
        "p3, which neither policy allows, was reached"
    );
    let (by_a, by_b) = (reached(t.p1.port()), reached(t.p2.port()));
    assert!(
        by_a > 0 && by_b > 0,
        "p1 allowed {by_a} times, p2 {by_b} times"
    );

    // Each policy was seen between its switch and the next change...
    let judged: Vec<&&Attempt> = attempts
        .iter()
        .filter(|at| at.port != t.p3.port())
        .collect();
    let unseen: Vec<usize> = (0..=switches.len())
        .filter(|&k| {
            let from = k
                .checked_sub(1)
                .map_or(loop_start, |i| switches[i].applied_ns);
            let to = switches.get(k).map_or(u64::MAX, |s| s.changed_ns);
            !judged
                .iter()
                .any(|at| at.start_ns >= from && at.end_ns <= to)
        })
        .collect();
    assert!(
        unseen.is_empty(),
        "the client made no connection while these policies were surely in force: {unseen:?} \
         (is the machine overloaded?)"
    );
    // ...so with no verdict flipping back and forth in between, the
    // policy judging p1/p2 changes exactly once per switch.
    let by: Vec<char> = judged
        .iter()
        .map(|at| {
            if (at.port == t.p1.port()) == (at.verdict == Verdict::Ok) {
                'A'
            } else {
                'B'
            }
        })
        .collect();
    let flips = by.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(
        flips,
        switches.len(),
        "the verdicts on p1/p2 changed policy {flips} times over {} reloads: connections \
         between two switches were judged by different policies",
        switches.len()
    );
    (by_a, by_b)
}

/// The acceptance test of issue 5: a client loops connections through 100
/// reloads that alternate two valid policies, and every connection is
/// judged by one of the two: the one in force when it was made, or, for a
/// connection made during a switch, the one before or after it.
#[test]
fn a_hundred_reloads_never_judge_by_a_mix() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let (a, b) = (
        allowing(&svc, "127.0.0.1", &[t.p1.port()]),
        allowing(&svc, "127.0.0.1", &[t.p2.port()]),
    );
    let scratch = PolicyDir::new();
    let alt = Alternation {
        sha_a: sha256(&scratch.write("a", &a)),
        sha_b: sha256(&scratch.write("b", &b)),
        a,
        b,
    };
    let policies = PolicyDir::with(&[("svc.toml", &alt.a)]);
    let daemon = Daemon::start(&policies);
    let mut changes = PolicyChanges::of(&daemon);
    t.assert_only(
        &probe!().in_cgroup(svc.path()),
        t.p1.port(),
        "policy A at start",
    );

    let started = Instant::now();
    let looping = conn!().in_cgroup(svc.path()).connect_loop(
        &[t.p1.addr(), t.p2.addr(), t.p3.addr()],
        Duration::from_micros(500),
    );
    let loop_start = monotonic_ns();
    // The policy it starts with is seen too.
    looping
        .wait_attempt(Duration::from_secs(5), |at| {
            at.start_ns >= loop_start && at.port == t.p2.port()
        })
        .unwrap_or_else(|| panic!("the client made no connection within 5 s"));
    let switches = drive_reloads(&policies, &mut changes, &alt, &t);
    // Let the last policy be seen for a while too.
    thread::sleep(Duration::from_millis(200));
    let attempts = looping.stop();
    let took = started.elapsed();

    let refused: Vec<&Value> = changes
        .all()
        .iter()
        .filter(|e| e["change"]["result"] != "applied")
        .collect();
    assert!(refused.is_empty(), "reloads refused: {refused:#?}");
    let st = status(&daemon);
    assert_eq!(
        (&st["reloads_applied"], &st["reloads_refused"]),
        (&json!(RELOADS), &json!(0)),
        "status after {RELOADS} reloads: {st:#}"
    );
    let (by_a, by_b) = check_judgements(&attempts, &switches, &t, loop_start);
    let latencies: Vec<u64> = switches
        .iter()
        .map(|s| (s.applied_ns - s.changed_ns) / 1_000_000)
        .collect();
    eprintln!(
        "reload: {RELOADS} reloads in {took:?}, {} connections ({by_a} allowed under A, {by_b} \
         under B); file change to applied {}..{} ms",
        attempts.len(),
        latencies.iter().min().unwrap_or(&0),
        latencies.iter().max().unwrap_or(&0),
    );
    t.assert_only(
        &probe!().in_cgroup(svc.path()),
        t.p1.port(),
        "policy A after an even number of reloads",
    );
}

/// The status's reload counters and last error.
fn reload_counts(st: &Value) -> (u64, u64) {
    (
        st["reloads_applied"].as_u64().unwrap_or(u64::MAX),
        st["reloads_refused"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Waits for `refused` refused reloads; returns the status then.
fn wait_refused(daemon: &Daemon, refused: u64) -> Value {
    wait_status(
        daemon,
        &format!("{refused} refused reloads"),
        RELOAD_TIMEOUT,
        |st| st["reloads_refused"] == refused,
    )
}

/// An invalid policy set (a syntax error, a semantic error, an invalid
/// second file next to a valid change) is refused as a whole: the policy
/// in force stays, the error names the file and line, and a valid set
/// afterwards is applied.
#[test]
fn a_bad_policy_leaves_the_old_one_enforced() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let (a, b) = (
        allowing(&svc, "127.0.0.1", &[t.p1.port()]),
        allowing(&svc, "127.0.0.1", &[t.p2.port()]),
    );
    let policies = PolicyDir::with(&[("svc.toml", &a)]);
    let daemon = Daemon::start(&policies);
    let mut changes = PolicyChanges::of(&daemon);
    let client = probe!().in_cgroup(svc.path());
    t.assert_only(&client, t.p1.port(), "policy A at start");

    // 1. Not TOML: B with a missing comma on line 6.
    let broken = b.replace(
        &format!("ports = [{}]", t.p2.port()),
        &format!("ports = [{} 80]", t.p2.port()),
    );
    assert_ne!(broken, b, "test bug: the syntax error was not made");
    let line = broken
        .lines()
        .position(|l| l.starts_with("ports"))
        .map_or(0, |i| i + 1);
    let file = replace(&policies, "svc.toml", &broken);
    let st = wait_refused(&daemon, 1);
    assert_eq!(reload_counts(&st), (0, 1), "status: {st:#}");
    let error = st["last_reload_error"].as_str().unwrap_or_default();
    let at = format!("{}:{line}:", file.display());
    assert!(
        error.contains(&at) && error.contains("not a valid policy file"),
        "last_reload_error should name {at} and say it is not a valid policy file: {st:#}"
    );
    let ev = changes.wait_nth(1, "refused reload", RELOAD_TIMEOUT, |e| {
        is_change(e, "reload", "refused")
    });
    assert_eq!(
        (&ev["change"]["trigger"], &ev["change"]["error"]),
        (&json!("inotify"), &json!(error)),
        "the refused reload's audit event: {ev:#}"
    );
    t.assert_only(&client, t.p1.port(), "after a reload with a TOML error");

    // 2. Valid TOML, invalid policy: host bits set.
    let host_bits = b.replace("\"127.0.0.1\"", "\"127.0.0.1/8\"");
    replace(&policies, "svc.toml", &host_bits);
    let st = wait_refused(&daemon, 2);
    assert_eq!(reload_counts(&st), (0, 2), "status: {st:#}");
    let error = st["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{}:", file.display()))
            && error.contains("\"127.0.0.1/8\" has host bits set"),
        "last_reload_error should name {} and the host bits: {st:#}",
        file.display()
    );
    t.assert_only(&client, t.p1.port(), "after a reload with host bits set");

    // 3. A valid change next to an invalid new file: the whole set is refused.
    let other = replace(&policies, "other.toml", "mode = \"enforce\"\n");
    wait_refused(&daemon, 3);
    replace(&policies, "svc.toml", &b);
    let st = wait_refused(&daemon, 4);
    assert_eq!(reload_counts(&st), (0, 4), "status: {st:#}");
    let error = st["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("{}:", other.display())) && !error.contains("svc.toml"),
        "last_reload_error should name only {}: {st:#}",
        other.display()
    );
    t.assert_only(
        &client,
        t.p1.port(),
        "svc.toml is valid, but other.toml next to it is not",
    );
    assert_eq!(
        status_service(&st, "svc")["rules"],
        1,
        "the service's rules in the status: {st:#}"
    );

    // 4. Remove the bad file: the set is valid again and applied.
    fs::remove_file(&other).unwrap_or_else(|e| panic!("cannot remove {}: {e}", other.display()));
    let st = wait_status(&daemon, "1 applied reload", RELOAD_TIMEOUT, |st| {
        st["reloads_applied"] == 1
    });
    assert_eq!(reload_counts(&st), (1, 4), "status: {st:#}");
    assert_eq!(st["last_reload_error"], Value::Null, "status: {st:#}");
    t.assert_only(&client, t.p2.port(), "policy B, once the set is valid");
}

/// A policy file made group- or world-writable while the agent runs is
/// refused at the next reload, and the policy in force stays; so is a
/// change made to it while it is insecure. Fixing the mode applies it.
#[test]
fn an_insecure_file_on_reload_is_refused() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let (a, b) = (
        allowing(&svc, "127.0.0.1", &[t.p1.port()]),
        allowing(&svc, "127.0.0.1", &[t.p2.port()]),
    );
    let policies = PolicyDir::with(&[("svc.toml", &a)]);
    let file = policies.path().join("svc.toml");
    chmod(&file, 0o644);
    let daemon = Daemon::start(&policies);
    let client = probe!().in_cgroup(svc.path());
    t.assert_only(&client, t.p1.port(), "policy A at start");

    chmod(&file, 0o666);
    let st = wait_refused(&daemon, 1);
    let want = format!(
        "{}:0:0: mode 0666 is group- or world-writable: refused",
        file.display()
    );
    assert!(
        st["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains(&want)),
        "last_reload_error should say {want:?}: {st:#}"
    );
    t.assert_only(&client, t.p1.port(), "after chmod 0666");

    // Writing B in place keeps the insecure mode: refused too.
    fs::write(&file, &b).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    let st = wait_refused(&daemon, 2);
    assert_eq!(reload_counts(&st), (0, 2), "status: {st:#}");
    t.assert_only(&client, t.p1.port(), "policy B written to a 0666 file");

    chmod(&file, 0o644);
    let st = wait_status(&daemon, "1 applied reload", RELOAD_TIMEOUT, |st| {
        st["reloads_applied"] == 1
    });
    assert_eq!(reload_counts(&st), (1, 2), "status: {st:#}");
    t.assert_only(&client, t.p2.port(), "policy B once the file is 0644");
}

/// Waits for the daemon to exit on its own and returns its log; panics
/// unless it exited 1.
fn assert_refuses_to_start(daemon: &mut Daemon, why: &str) -> String {
    let status = daemon.wait_exit(Duration::from_secs(20));
    let log = daemon.log();
    assert_eq!(
        status.code(),
        Some(1),
        "{why}: bulkhead run should exit 1, got {status}; its log:\n{log}"
    );
    log
}

fn run_args(policies: &PolicyDir, extra: &[&str]) -> Vec<OsString> {
    let mut args = vec![OsString::from("--policy-dir"), policies.path().into()];
    args.extend(extra.iter().map(OsString::from));
    args
}

/// At start, a policy file or directory that is group- or world-writable
/// or not owned by root stops `bulkhead run` (exit 1, naming it), unless
/// `--allow-insecure-policy-files`, which starts, enforces and says
/// `INSECURE`.
#[test]
fn insecure_policy_files_are_refused_at_start() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let policy = allowing(&svc, "127.0.0.1", &[t.p1.port()]);
    let client = probe!().in_cgroup(svc.path());

    let policies = PolicyDir::with(&[("svc.toml", &policy)]);
    let file = policies.path().join("svc.toml");
    chmod(&file, 0o666);
    let mut daemon = Daemon::spawn_run(&run_args(&policies, &[]));
    let log = assert_refuses_to_start(&mut daemon, "policy file mode 0666");
    let want = format!(
        "{}:0:0: mode 0666 is group- or world-writable: refused",
        file.display()
    );
    assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    drop(daemon);
    client
        .tcp_connect(t.p2.addr())
        .assert_ok("nothing is enforced when bulkhead refused to start");

    chmod(&file, 0o644);
    chmod(policies.path(), 0o777);
    let mut daemon = Daemon::spawn_run(&run_args(&policies, &[]));
    let log = assert_refuses_to_start(&mut daemon, "policy directory mode 0777");
    let want = format!(
        "{}:0:0: mode 0777 is group- or world-writable: refused",
        policies.path().display()
    );
    assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    drop(daemon);

    chmod(policies.path(), 0o755);
    chown(&file, Some(65534), Some(65534))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", file.display()));
    let mut daemon = Daemon::spawn_run(&run_args(&policies, &[]));
    let log = assert_refuses_to_start(&mut daemon, "policy file owned by uid 65534");
    let want = format!("{}:0:0: owned by uid 65534, not root", file.display());
    assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    drop(daemon);

    chown(&file, Some(0), Some(0))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", file.display()));
    chmod(&file, 0o666);
    let mut daemon = Daemon::spawn_run(&run_args(&policies, &["--allow-insecure-policy-files"]));
    daemon.wait_ready();
    let log = daemon.log();
    let want = format!(
        "INSECURE policy file accepted (--allow-insecure-policy-files): {}:0:0: mode 0666",
        file.display()
    );
    assert!(log.contains(&want), "the log should say {want:?}:\n{log}");
    t.assert_only(&client, t.p1.port(), "policy accepted with the override");
}

/// SIGHUP re-reads the policy directory: an applied reload with trigger
/// `sighup`, here with nothing changed.
#[test]
fn sighup_reloads_the_policy() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let policies = PolicyDir::with(&[("svc.toml", &allowing(&svc, "127.0.0.1", &[t.p1.port()]))]);
    let daemon = Daemon::start(&policies);
    let mut changes = PolicyChanges::of(&daemon);
    // An answer to `status` comes from the main loop, so the signal
    // handlers are in place (see the next test for the time before).
    assert_eq!(reload_counts(&status(&daemon)), (0, 0));
    let pid = daemon.pid().expect("the daemon was just started");
    assert!(signal(pid, libc::SIGHUP), "cannot SIGHUP bulkhead ({pid})");
    let ev = changes.wait_nth(1, "reload", RELOAD_TIMEOUT, |e| {
        e["change"]["action"] == "reload"
    });
    assert_eq!(
        ev["change"],
        json!({
            "action": "reload",
            "result": "applied",
            "trigger": "sighup",
            "files": [],
            "services": [],
            "error": null,
        }),
        "a SIGHUP with nothing changed"
    );
    let st = wait_status(&daemon, "1 applied reload", RELOAD_TIMEOUT, |st| {
        st["reloads_applied"] == 1
    });
    assert_eq!(reload_counts(&st), (1, 0), "status: {st:#}");
    t.assert_only(
        &probe!().in_cgroup(svc.path()),
        t.p1.port(),
        "the same policy after SIGHUP",
    );
}

/// Whether process `pid` has a handler for `sig` (its bit in `SigCgt:` of
/// `/proc/PID/status`).
fn catches(pid: u32, sig: libc::c_int) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SigCgt in /proc/{pid}/status:\n{status}"));
    mask & (1 << (sig - 1)) != 0
}

/// `systemctl reload` may come as soon as the unit is started, that is at
/// READY=1: a SIGHUP then must reload, not kill the agent (SIGHUP's
/// default action) because its handler is not installed yet.
#[test]
fn sighup_right_after_ready_reloads() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let policies = PolicyDir::with(&[("svc.toml", &allowing(&svc, "127.0.0.1", &[t.p1.port()]))]);
    let mut daemon = Daemon::start(&policies);
    let pid = daemon.pid().expect("the daemon was just started");
    // First, at once: does it catch SIGHUP at all yet?
    let caught = catches(pid, libc::SIGHUP);
    assert!(
        caught,
        "bulkhead ({pid}) said READY=1 without a SIGHUP handler (SigCgt in /proc/{pid}/status): \
         a `systemctl reload` now would kill it"
    );
    // Back to back for the first 20 ms after READY=1 (a pending SIGHUP
    // is not queued twice, so this makes a few reloads, not thousands).
    let sending = Instant::now();
    while sending.elapsed() < Duration::from_millis(20) && signal(pid, libc::SIGHUP) {}
    thread::sleep(Duration::from_millis(300));
    if let Some(status) = daemon.try_exit_status() {
        panic!(
            "bulkhead died of SIGHUPs sent right after READY=1 ({status}; its log follows): \
             the SIGHUP handler must be in place before READY=1"
        );
    }
    let st = wait_status(&daemon, "an applied reload", RELOAD_TIMEOUT, |st| {
        st["reloads_applied"].as_u64().is_some_and(|n| n >= 1)
    });
    assert_eq!(st["reloads_refused"], 0, "status: {st:#}");
    t.assert_only(
        &probe!().in_cgroup(svc.path()),
        t.p1.port(),
        "the same policy after SIGHUP",
    );
}

/// `bulkhead_policy_last_reload_successful` and
/// `bulkhead_policy_last_reload_success_timestamp_seconds` of `daemon`.
fn last_reload_gauges(daemon: &Daemon) -> (u64, u64) {
    let scrape = Scrape::get(metrics_addr(daemon));
    (
        scrape.count("bulkhead_policy_last_reload_successful", &[]),
        scrape.count("bulkhead_policy_last_reload_success_timestamp_seconds", &[]),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Asserts `out` is exactly (exit code, stdout, stderr).
fn assert_output(out: &std::process::Output, code: i32, stdout: &str, stderr: &str, what: &str) {
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (Some(code), stdout, stderr),
        "{what}: exit code, stdout and stderr of bulkhead reload"
    );
}

/// Writes two problems in two files: host bits set in `svc.toml` (policy
/// `b` otherwise), and a world-writable `other.toml`. Returns the path of
/// `other.toml` and the error lines a reload or a check must print for them.
fn write_two_problems(policies: &PolicyDir, b: &str) -> (PathBuf, String) {
    let host_bits = b.replace("\"127.0.0.1\"", "\"127.0.0.1/8\"");
    let (line, col) = host_bits
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("\"127.0.0.1/8\"").map(|c| (i + 1, c + 1)))
        .expect("test bug: no host bits written");
    let file = replace(policies, "svc.toml", &host_bits);
    let other = replace(
        policies,
        "other.toml",
        "cgroup = \"/bulkhead-reload-other\"\nmode = \"audit\"\n",
    );
    chmod(&other, 0o666);
    let errors = format!(
        "{}:0:0: mode 0666 is group- or world-writable: refused (chmod go-w)\n\
         {}:{line}:{col}: egress[0]: \"127.0.0.1/8\" has host bits set; did you mean \"127.0.0.0/8\"?\n",
        other.display(),
        file.display()
    );
    (other, errors)
}

/// `bulkhead reload` waits for the reload and tells the outcome: exit 0
/// when applied; exit 1 with every error as `FILE:LINE:COL: message` (the
/// same lines `bulkhead check` prints) when refused, the kernel then still
/// enforcing the old policy; the last-reload gauges follow.
#[test]
fn bulkhead_reload_reports_every_error_and_a_refusal_changes_nothing() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let t = Targets::new();
    let (a, b) = (
        allowing(&svc, "127.0.0.1", &[t.p1.port()]),
        allowing(&svc, "127.0.0.1", &[t.p2.port()]),
    );
    let policies = PolicyDir::with(&[("svc.toml", &a)]);
    let before_start = unix_now();
    let daemon = Daemon::start(&policies);
    let mut changes = PolicyChanges::of(&daemon);
    let client = probe!().in_cgroup(svc.path());
    t.assert_only(&client, t.p1.port(), "policy A at start");

    // The load at start counts as the last successful one.
    let (ok, started_at) = last_reload_gauges(&daemon);
    assert_eq!(ok, 1, "last_reload_successful after the start");
    assert!(
        (before_start..=unix_now()).contains(&started_at),
        "last_reload_success_timestamp_seconds {started_at} is not the start ({before_start}..)"
    );

    // 1. Nothing changed: applied, through the control socket.
    let out = reload(&daemon);
    assert_output(
        &out,
        0,
        "bulkhead reload: the policy was applied\n",
        "",
        "a reload with nothing changed",
    );
    let ev = changes.wait_nth(1, "reload", RELOAD_TIMEOUT, |e| {
        is_change(e, "reload", "applied")
    });
    assert_eq!(ev["change"]["trigger"], "control", "{ev:#}");
    let (ok, applied_at) = last_reload_gauges(&daemon);
    assert_eq!(ok, 1);
    assert!(applied_at >= started_at, "{applied_at} < {started_at}");

    // 2. Two problems in two files: host bits set in svc.toml (B), and a
    // world-writable other.toml. The agent's own reload (inotify) refuses
    // them too; `bulkhead reload` must say exactly why.
    let (other, errors) = write_two_problems(&policies, &b);
    let out = reload(&daemon);
    assert_output(
        &out,
        1,
        "",
        &format!(
            "{errors}bulkhead reload: refused (2 error(s)); the policy in force is unchanged\n"
        ),
        "a refused reload",
    );
    // The same lines as `bulkhead check`: one loader for both.
    let check = integration_tests::bulkhead(&[
        OsString::from("check"),
        "--policy-dir".into(),
        policies.path().into(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&check.stderr),
        format!("{errors}2 error(s); nothing was loaded\n"),
        "bulkhead check of the same directory"
    );
    let ev = changes.wait_nth(
        1,
        "refused reload from the control socket",
        RELOAD_TIMEOUT,
        |e| is_change(e, "reload", "refused") && e["change"]["trigger"] == "control",
    );
    assert_eq!(
        ev["change"]["error"].as_str().map(|e| format!("{e}\n")),
        Some(errors.clone()),
        "{ev:#}"
    );
    assert_eq!(
        last_reload_gauges(&daemon),
        (0, applied_at),
        "after a refused reload: not successful, the time of the last applied one kept"
    );
    t.assert_only(
        &client,
        t.p1.port(),
        "policy A after the refused bulkhead reload",
    );

    // 3. Fixed: B applies, and the gauges say so.
    chmod(&other, 0o644);
    replace(&policies, "svc.toml", &b);
    let out = reload(&daemon);
    assert_output(
        &out,
        0,
        "bulkhead reload: the policy was applied\n",
        "",
        "the fixed policy",
    );
    let (ok, fixed_at) = last_reload_gauges(&daemon);
    assert_eq!(ok, 1, "last_reload_successful after the fix");
    assert!(fixed_at >= applied_at, "{fixed_at} < {applied_at}");
    t.assert_only(&client, t.p2.port(), "policy B after bulkhead reload");
}

/// With no agent to answer, `bulkhead reload` exits 3 (not 1: nothing was
/// refused) and says why.
#[test]
fn bulkhead_reload_without_an_agent_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("control.sock");
    let out = integration_tests::bulkhead(&[
        OsString::from("reload"),
        "--socket".into(),
        socket.clone().into(),
    ]);
    assert_output(
        &out,
        3,
        "",
        &format!(
            "bulkhead reload: no bulkhead daemon is running (cannot connect to {}: No such file or directory)\n",
            socket.display()
        ),
        "no agent",
    );
}
