//! Drift between the kernel maps and the policy in force (issue 14): a
//! change that fails part-way (a switch, a retire, a service add) leaves
//! the old policy or the new one, never a mix or a leftover; and the
//! self-check notices a map changed behind the agent's back, says so (log,
//! `bulkhead_enforcement_drift*`, `status`) and repairs it.
//!
//! Map writes are made to fail by filling SERVICES through its pin with
//! `bpftool`; a retire (deletes, which never fail for lack of room) by the
//! agent's test-only fault seam (`BULKHEAD_TEST_FAULTS_FILE`).

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    addr, allowing,
    control::{is_change, status, status_service, wait_status, PolicyChanges},
    eventually,
    faults::Faults,
    http::metrics_addr,
    maps, probe,
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, Egress, Enforced, Listener, PolicyDir, Probe,
    Proto,
};
use serde_json::{json, Value};

/// A self-check every second, for the tests that wait for one.
const EVERY_SECOND: &str = "[self_check]\ninterval_secs = 1\n";
/// No periodic check during the test: only those at start, after a
/// reload and after a failed service update run.
const ONLY_TRIGGERED: &str = "[self_check]\ninterval_secs = 3600\n";
/// A reload (300 ms settle) or a periodic check and its repair.
const TIMEOUT: Duration = Duration::from_secs(15);

/// Junk SERVICES keys (no cgroup has such an id) and their value: a
/// `ServiceEntry` of service id `0xffff_fff0`, everything else zero.
const JUNK_KEY: u64 = 0x0b0b_0000_0000_0000;
const JUNK_ENTRY: [u8; size_of::<agent_common::ServiceEntry>()] = {
    let mut e = [0; size_of::<agent_common::ServiceEntry>()];
    e[0] = 0xf0;
    e[1] = 0xff;
    e[2] = 0xff;
    e[3] = 0xff;
    e
};

fn listen(at: &str) -> Listener {
    probe!().listen(Proto::Tcp, addr(at))
}

/// Asserts that, of `targets`, `client` reaches exactly `allowed`.
fn assert_reaches(client: &Probe, targets: &[&Listener], allowed: &[&Listener], why: &str) {
    for t in targets {
        let outcome = client.tcp_connect(t.addr());
        if allowed.iter().any(|a| a.addr() == t.addr()) {
            outcome.assert_ok(&format!("{why}: {} allowed", t.addr()));
        } else {
            outcome.assert_eperm(&format!("{why}: {} denied", t.addr()));
        }
    }
}

/// The `self_check` object of a status.
fn check(st: &Value) -> &Value {
    &st["self_check"]
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(u64::MAX)
}

/// Waits for a self-check that found drift and repaired it; returns the
/// status then.
fn wait_repaired(daemon: &Daemon, repairs: u64) -> Value {
    wait_status(daemon, &format!("{repairs} drift repairs"), TIMEOUT, |st| {
        count(&check(st)["repairs"]) >= repairs && count(&check(st)["drift"]) == 0
    })
}

/// Waits for `n` applied reloads, then for the self-check that follows
/// each; returns the status then.
fn wait_applied(daemon: &Daemon, n: u64) -> Value {
    wait_status(daemon, &format!("{n} applied reloads"), TIMEOUT, |st| {
        st["reloads_applied"] == n
    })
}

/// Asserts the last check found nothing left, and the metric agrees.
fn assert_no_drift(daemon: &Daemon, st: &Value, why: &str) {
    assert_eq!(check(st)["drift"], 0, "{why}: status {:#}", check(st));
    assert_eq!(
        check(st)["check_errors"],
        0,
        "{why}: status {:#}",
        check(st)
    );
    let samples = scrape(metrics_addr(daemon));
    for kind in [
        "service_missing",
        "service_entry",
        "service_unknown",
        "service_path",
        "prefix_missing",
        "prefix_wrong",
        "prefix_stale",
        "ruleset",
        "active_flags",
    ] {
        assert_eq!(
            sample_count(&samples, "bulkhead_enforcement_drift", &[("kind", kind)]),
            Some(0),
            "{why}: bulkhead_enforcement_drift{{kind={kind:?}}}"
        );
    }
}

/// How many differences of `kind` the self-check has found so far.
fn found(daemon: &Daemon, kind: &str) -> Option<u64> {
    sample_count(
        &scrape(metrics_addr(daemon)),
        "bulkhead_enforcement_drift_found_total",
        &[("kind", kind)],
    )
}

/// The service id SERVICES holds for `svc`'s cgroup.
fn service_id(daemon: &Daemon, svc: &CgroupGuard) -> u32 {
    let entry = maps::service_entry(daemon, svc.id())
        .unwrap_or_else(|| panic!("SERVICES has no entry for cgroup {}", svc.id()));
    u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]])
}

/// Whether `EGRESS_V4` or `EGRESS_HOSTS_V4` holds a prefix for `ip` (any
/// service, any length).
fn has_prefix(daemon: &Daemon, ip: Ipv4Addr) -> bool {
    let in_trie = maps::dump(&maps::pinned(daemon, "EGRESS_V4"))
        .iter()
        .any(|(k, _)| k.len() == 12 && k[8..] == ip.octets());
    let in_hosts = maps::dump(&maps::pinned(daemon, "EGRESS_HOSTS_V4"))
        .iter()
        .any(|(k, _)| k.len() == 8 && k[4..] == ip.octets());
    in_trie || in_hosts
}

/// Waits until neither holds a prefix for `ip` (a retire runs 50 ms after
/// the switch that precedes it).
fn wait_no_prefix(daemon: &Daemon, ip: Ipv4Addr) {
    eventually(TIMEOUT, Duration::from_millis(100), || {
        if has_prefix(daemon, ip) {
            Err(())
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|()| {
        panic!("EGRESS_V4 or EGRESS_HOSTS_V4 still holds a prefix for {ip} after {TIMEOUT:?}")
    });
}

/// A service allowed to reach 127.0.0.1:`port` only, enforced by an agent
/// that checks its maps every second.
fn checked_every_second(port: u16) -> Enforced {
    Enforced::start_with(
        "svc.toml",
        |svc| allowing(svc, "127.0.0.1", &[port]),
        |policies| Daemon::start_with_config(policies, EVERY_SECOND),
    )
}

/// A service whose SERVICES entry is deleted behind the agent's back is
/// unmanaged until the self-check notices: it says so in the log, the
/// metrics and `status`, and puts the entry back.
#[test]
fn a_deleted_service_entry_is_reported_and_restored() {
    if !require_bpf() {
        return;
    }
    let (p1, p3) = (listen("127.0.0.1:0"), listen("127.0.0.1:0"));
    let Enforced {
        svc,
        policies: _policies,
        daemon,
    } = checked_every_second(p1.port());
    let client = probe!().in_cgroup(svc.path());
    let st = wait_status(&daemon, "a first self-check", TIMEOUT, |st| {
        count(&check(st)["checks"]) >= 1
    });
    assert_no_drift(&daemon, &st, "at start");
    assert_reaches(&client, &[&p1, &p3], &[&p1], "at start");

    maps::delete(&maps::pinned(&daemon, "SERVICES"), &svc.id().to_le_bytes());
    let st = wait_repaired(&daemon, 1);
    let last = &check(&st)["last_found"];
    assert_eq!(
        (&last["kinds"], &last["repaired"]),
        (&json!("service_missing=1"), &json!(true)),
        "status: {:#}",
        check(&st)
    );
    assert_eq!(found(&daemon, "service_missing"), Some(1));
    assert_no_drift(&daemon, &st, "after the repair");
    let log = daemon.log();
    assert!(
        log.contains("ENFORCEMENT DRIFT") && log.contains("service_missing"),
        "the log should report the drift"
    );
    assert!(maps::service_entry(&daemon, svc.id()).is_some());
    assert_reaches(&client, &[&p1, &p3], &[&p1], "after the repair");
}

/// A prefix written into the live half behind the agent's back (a
/// destination the policy never listed) is reported and removed.
#[test]
fn a_prefix_added_behind_the_agents_back_is_reported_and_removed() {
    if !require_bpf() {
        return;
    }
    let p1 = listen("127.0.0.1:0");
    // The same port on another loopback address the policy does not list.
    let other = listen(&format!("127.0.0.3:{}", p1.port()));
    let Enforced {
        svc,
        policies: _policies,
        daemon,
    } = checked_every_second(p1.port());
    let client = probe!().in_cgroup(svc.path());
    assert_reaches(&client, &[&p1, &other], &[&p1], "at start");

    // A whole address lives in the hash beside the trie. The service's id
    // (and so its keys) changes with every repair, which switches halves.
    let hosts = maps::pinned(&daemon, "EGRESS_HOSTS_V4");
    let allowed = || {
        let sid = service_id(&daemon, &svc);
        let key = maps::host_v4_key(sid, Ipv4Addr::LOCALHOST);
        let ruleset = maps::dump(&hosts)
            .into_iter()
            .find(|(k, _)| *k == key)
            .map_or_else(
                || panic!("EGRESS_HOSTS_V4 has no 127.0.0.1 for service id {sid}"),
                |(_, v)| v,
            );
        (sid, ruleset)
    };
    let stray = Ipv4Addr::new(127, 0, 0, 3);
    let (sid, ruleset) = allowed();
    maps::update(&hosts, &maps::host_v4_key(sid, stray), &ruleset);
    let st = wait_repaired(&daemon, 1);
    assert_eq!(
        check(&st)["last_found"]["kinds"],
        "prefix_wrong=1",
        "status: {:#}",
        check(&st)
    );
    assert_eq!(found(&daemon, "prefix_wrong"), Some(1));
    assert_no_drift(&daemon, &st, "after the repair");
    wait_no_prefix(&daemon, stray);
    assert_reaches(&client, &[&p1, &other], &[&p1], "after the repair");

    // The same address as a /32 in the trie, the map the programs look in
    // when the hash has no entry: drift too, though no policy puts a whole
    // address there.
    let (sid, ruleset) = allowed();
    maps::update(
        &maps::pinned(&daemon, "EGRESS_V4"),
        &maps::lpm_v4_key(sid, stray, 32),
        &ruleset,
    );
    let st = wait_repaired(&daemon, 2);
    assert_eq!(
        check(&st)["last_found"]["kinds"],
        "prefix_wrong=1",
        "status: {:#}",
        check(&st)
    );
    assert_eq!(found(&daemon, "prefix_wrong"), Some(2));
    assert_no_drift(&daemon, &st, "after the second repair");
    wait_no_prefix(&daemon, stray);
    assert_reaches(&client, &[&p1, &other], &[&p1], "after the second repair");
}

/// A switch that fails part-way (SERVICES is full, so the new service's
/// cgroup cannot be added after the kept service was already pointed at
/// the new policy) is undone: the old policy stays for every service, the
/// reload is refused (status, audit event). The next policy then applies
/// exactly, with no drift.
#[test]
fn a_switch_that_fails_part_way_leaves_the_old_policy() {
    if !require_bpf() {
        return;
    }
    let (svc1, svc2) = (CgroupGuard::new(), CgroupGuard::new());
    let (p1, p2, p3) = (
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
    );
    let all = [&p1, &p2, &p3];
    let policies = PolicyDir::with(&[("svc1.toml", &allowing(&svc1, "127.0.0.1", &[p1.port()]))]);
    let daemon = Daemon::start_with_config(&policies, ONLY_TRIGGERED);
    let mut changes = PolicyChanges::of(&daemon);
    let (c1, c2) = (
        probe!().in_cgroup(svc1.path()),
        probe!().in_cgroup(svc2.path()),
    );
    assert_reaches(&c1, &all, &[&p1], "policy A");
    assert_reaches(&c2, &all, &all, "svc2 is not in policy A");

    let junk = maps::fill(&maps::pinned(&daemon, "SERVICES"), JUNK_KEY, &JUNK_ENTRY);
    policies.write("svc2.toml", &allowing(&svc2, "127.0.0.1", &[p3.port()]));
    policies.write("svc1.toml", &allowing(&svc1, "127.0.0.1", &[p2.port()]));
    let st = wait_status(&daemon, "a refused reload", TIMEOUT, |st| {
        st["reloads_refused"] == 1
    });
    let error = st["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("switching to the new policy failed part-way and was undone")
            && error.contains("SERVICES")
            && !error.contains("putting the policy in force back also failed"),
        "last_reload_error: {error:?}"
    );
    let ev = changes.wait_nth(1, "refused reload", TIMEOUT, |e| {
        is_change(e, "reload", "refused")
    });
    assert_eq!(ev["change"]["error"], json!(error), "audit event: {ev:#}");
    assert_eq!(st["reloads_applied"], 0);
    assert_reaches(&c1, &all, &[&p1], "policy A after the failed switch");
    assert_reaches(&c2, &all, &all, "svc2 after the failed switch");

    // The self-check after the refused reload found the junk and nothing
    // else (the undone switch left no trace), and removed it.
    let st = wait_status(&daemon, "the junk repaired", TIMEOUT, |st| {
        count(&check(st)["repairs"]) >= 1
    });
    let last = &check(&st)["last_found"];
    assert_eq!(
        (&last["kinds"], &last["repaired"]),
        (&json!(format!("service_unknown={junk}")), &json!(true)),
        "{:#}",
        check(&st)
    );
    policies.write("svc2.toml", &allowing(&svc2, "127.0.0.1", &[p1.port()]));
    policies.write("svc1.toml", &allowing(&svc1, "127.0.0.1", &[p3.port()]));
    let st = wait_applied(&daemon, 1);
    assert_reaches(&c1, &all, &[&p3], "svc1 under policy C");
    assert_reaches(&c2, &all, &[&p1], "svc2 under policy C");
    assert_no_drift(&daemon, &st, "after policy C");
    assert_eq!(
        maps::dump(&maps::pinned(&daemon, "SERVICES")).len(),
        2,
        "SERVICES should hold svc1 and svc2 only"
    );
}

/// Writing the new policy into the other half fails: the reload is
/// refused, the old policy stays, and nothing of the new one is left.
#[test]
fn a_staging_that_fails_leaves_the_old_policy() {
    if !require_bpf() {
        return;
    }
    let one = listen("127.0.0.1:0");
    let port = one.port();
    let two = listen(&format!("127.0.0.2:{port}"));
    let both = [&one, &two];
    let faults = Faults::new();
    let Enforced {
        svc,
        policies,
        daemon,
    } = Enforced::start_with(
        "svc.toml",
        |svc| allowing(svc, "127.0.0.1", &[port]),
        |policies| faults.start(policies, ONLY_TRIGGERED),
    );
    let client = probe!().in_cgroup(svc.path());

    faults.fail("stage");
    policies.write("svc.toml", &allowing(&svc, "127.0.0.2", &[port]));
    let st = wait_status(&daemon, "a refused reload", TIMEOUT, |st| {
        st["reloads_refused"] == 1 && count(&check(st)["checks"]) >= 2
    });
    faults.clear();
    let error = st["last_reload_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("writing the new policy into the maps failed"),
        "last_reload_error: {error:?}"
    );
    assert_reaches(
        &client,
        &both,
        &[&one],
        "the old policy after the failed staging",
    );
    assert!(!has_prefix(&daemon, Ipv4Addr::new(127, 0, 0, 2)));
    assert_no_drift(&daemon, &st, "after the failed staging");
    assert_eq!(check(&st)["found_total"], 0, "{:#}", check(&st));

    policies.write("svc.toml", &allowing(&svc, "127.0.0.2", &[port, port + 1]));
    let st = wait_applied(&daemon, 1);
    assert_reaches(&client, &both, &[&two], "the next policy");
    assert_no_drift(&daemon, &st, "after the next policy");
}

/// Policy A allows 127.0.0.2; B moves to 127.0.0.1 and A's retire fails,
/// so A's prefix stays in the half the next policy is written into. C,
/// like B, never lists 127.0.0.2: it must not be reachable under C (the
/// leftover prefix would point at C's first ruleset).
#[test]
fn a_failed_retire_never_leaks_into_the_next_policy() {
    if !require_bpf() {
        return;
    }
    let one = listen("127.0.0.1:0");
    let port = one.port();
    let two = listen(&format!("127.0.0.2:{port}"));
    let both = [&one, &two];
    let faults = Faults::new();
    let Enforced {
        svc,
        policies,
        daemon,
    } = Enforced::start_with(
        "svc.toml",
        |svc| allowing(svc, "127.0.0.2", &[port]),
        |policies| faults.start(policies, ONLY_TRIGGERED),
    );
    let client = probe!().in_cgroup(svc.path());
    assert_reaches(&client, &both, &[&two], "policy A");

    faults.fail("retire");
    policies.write("svc.toml", &allowing(&svc, "127.0.0.1", &[port]));
    wait_applied(&daemon, 1);
    daemon.wait_log("cannot remove the previous policy's prefixes", TIMEOUT);
    faults.clear();
    assert!(
        has_prefix(&daemon, Ipv4Addr::new(127, 0, 0, 2)),
        "A's prefix should have stayed (the retire failed)"
    );
    assert_reaches(&client, &both, &[&one], "policy B");

    policies.write("svc.toml", &allowing(&svc, "127.0.0.1", &[port, port + 1]));
    let st = wait_applied(&daemon, 2);
    assert_reaches(&client, &both, &[&one], "policy C");
    assert!(
        !has_prefix(&daemon, Ipv4Addr::new(127, 0, 0, 2)),
        "staging C should have emptied its half"
    );
    assert_no_drift(&daemon, &st, "after policy C");
    assert_eq!(check(&st)["found_total"], 0, "{:#}", check(&st));
}

/// What a failed retire leaves is drift: the periodic self-check reports
/// the stale prefixes and repairs them.
#[test]
fn stale_prefixes_of_a_failed_retire_are_reported_and_removed() {
    if !require_bpf() {
        return;
    }
    let one = listen("127.0.0.1:0");
    let port = one.port();
    let two = listen(&format!("127.0.0.2:{port}"));
    let faults = Faults::new();
    let Enforced {
        svc,
        policies,
        daemon,
    } = Enforced::start_with(
        "svc.toml",
        |svc| allowing(svc, "127.0.0.2", &[port]),
        |policies| faults.start(policies, EVERY_SECOND),
    );
    let client = probe!().in_cgroup(svc.path());

    faults.fail("retire");
    policies.write("svc.toml", &allowing(&svc, "127.0.0.1", &[port]));
    wait_applied(&daemon, 1);
    daemon.wait_log("cannot remove the previous policy's prefixes", TIMEOUT);
    faults.clear();
    let st = wait_status(&daemon, "the stale prefix found", TIMEOUT, |st| {
        check(st)["last_found"]["kinds"]
            .as_str()
            .is_some_and(|k| k.contains("prefix_stale"))
    });
    assert!(count(&check(&st)["found_total"]) >= 1, "{:#}", check(&st));
    assert!(found(&daemon, "prefix_stale").is_some_and(|n| n >= 1));
    // Its repair retires a half once more: wait until that worked.
    wait_no_prefix(&daemon, Ipv4Addr::new(127, 0, 0, 2));
    let st = wait_status(&daemon, "a check with no drift", TIMEOUT, |st| {
        check(st)["drift"] == 0 && count(&check(st)["repairs"]) >= 1
    });
    assert_no_drift(&daemon, &st, "after the repair");
    assert_reaches(&client, &[&one, &two], &[&one], "policy B after the repair");
}

/// A service whose cgroup appears while SERVICES is full cannot be added
/// (by the kernel at mkdir, nor by the rescan): the failure triggers a
/// self-check at once, which removes the entries no service owns and
/// applies the policy again, so the service is enforced. A later reload
/// applies exactly.
#[test]
fn a_service_add_that_fails_is_repaired() {
    if !require_bpf() {
        return;
    }
    let (svc1, svc2) = (CgroupGuard::new(), CgroupGuard::new());
    svc2.remove();
    let (p1, p2, p3) = (
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
        listen("127.0.0.1:0"),
    );
    let all = [&p1, &p2, &p3];
    let policies = PolicyDir::with(&[
        ("svc1.toml", &allowing(&svc1, "127.0.0.1", &[p1.port()])),
        ("svc2.toml", &allowing(&svc2, "127.0.0.1", &[p2.port()])),
    ]);
    let daemon = Daemon::start_with_config(&policies, ONLY_TRIGGERED);
    assert_eq!(status_service(&status(&daemon), "svc2")["state"], "waiting");

    let junk = maps::fill(&maps::pinned(&daemon, "SERVICES"), JUNK_KEY, &JUNK_ENTRY);
    svc2.create_again();
    let st = wait_status(&daemon, "svc2 managed after a repair", TIMEOUT, |st| {
        status_service(st, "svc2")["state"] == "managed" && count(&check(st)["repairs"]) >= 1
    });
    assert!(
        daemon.log().contains("cannot update the managed cgroups"),
        "the failed add should be logged"
    );
    assert_eq!(found(&daemon, "service_unknown"), Some(junk));
    // The cgroup whose add failed is known as unenforced (and retried),
    // never counted as managed: no entry is missing behind the agent's back.
    assert_eq!(found(&daemon, "service_missing"), Some(0));
    assert_no_drift(&daemon, &st, "after the repair");
    let (c1, c2) = (
        probe!().in_cgroup(svc1.path()),
        probe!().in_cgroup(svc2.path()),
    );
    assert_reaches(&c2, &all, &[&p2], "svc2 after the repair");

    policies.write("svc2.toml", &allowing(&svc2, "127.0.0.1", &[p3.port()]));
    let st = wait_applied(&daemon, 1);
    assert_reaches(&c1, &all, &[&p1], "svc1 after the reload");
    assert_reaches(&c2, &all, &[&p3], "svc2 after the reload");
    assert_no_drift(&daemon, &st, "after the reload");
}

/// The self-check is cheap enough to run every minute at 100,000 rules: the
/// check at start reads every entry and takes a small fraction of the
/// default 60 s interval (its time is printed; BENCHMARKS.md has figures).
#[test]
fn the_self_check_at_100000_rules_takes_a_fraction_of_its_interval() {
    const RULES: u32 = 100_000;
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    // 100,000 distinct /32s in 198.18.0.0/15 (never sent to).
    let to: Vec<String> = (0..RULES)
        .map(|i| Ipv4Addr::from(0xc612_0000 + i).to_string())
        .collect();
    let policy = service_policy(
        &svc,
        "enforce",
        &[Egress::to(to.iter().map(String::as_str)).ports([443])],
    );
    let policies = PolicyDir::with(&[("svc.toml", &policy)]);
    let daemon = Daemon::start(&policies);
    let st = wait_status(&daemon, "the start-up check", 4 * TIMEOUT, |st| {
        count(&check(st)["checks"]) >= 1
    });
    let c = check(&st);
    assert_no_drift(&daemon, &st, "at 100,000 rules");
    assert!(
        count(&c["last_entries_read"]) > u64::from(RULES),
        "the check should read every prefix: {c:#}"
    );
    let took = Duration::from_micros(count(&c["last_duration_us"]));
    eprintln!(
        "self-check at {RULES} rules: {} entries read in {took:?}",
        c["last_entries_read"]
    );
    assert!(
        took < Duration::from_secs(6),
        "the check took {took:?}, over a tenth of the 60 s interval"
    );

    // A reload (emptying the other half, writing it, switching) and the
    // check after it, for the record.
    let wider = policy.replace("ports = [443]", "ports = [443, 444]");
    assert_ne!(wider, policy, "test bug: the policy did not change");
    policies.write("svc.toml", &wider);
    // The log, not `status`, while the agent is busy: a debug build on a
    // loaded machine may take longer than one status call waits.
    daemon.wait_log("policy reloaded", 8 * TIMEOUT);
    let st = wait_status(&daemon, "the reload and its check", 4 * TIMEOUT, |st| {
        st["reloads_applied"] == 1 && count(&check(st)["checks"]) >= 2
    });
    assert_no_drift(&daemon, &st, "after a reload at 100,000 rules");
    let applied = daemon
        .log()
        .lines()
        .find(|l| l.contains("policy reloaded"))
        .map(str::to_owned);
    eprintln!(
        "after the reload: {applied:?}; its self-check took {} us",
        check(&st)["last_duration_us"]
    );
}
