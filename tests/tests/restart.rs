//! Enforcement survives the agent (issue 5): a killed or stopped agent's
//! pinned programs keep enforcing, and a new agent on the same pins takes
//! over without a gap and reports the same state.
//!
//! Every daemon here runs on one [`SharedPins`] (the same `--pin-dir` and
//! `--state-dir`), declared before the daemons so that it detaches last.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    os::unix::process::ExitStatusExt as _,
    thread,
    time::{Duration, Instant},
};

use agent_common::{counter_slot, DIRECTION_EGRESS, PROTO_UDP, VERDICT_AUDIT};
use integration_tests::{
    addr, allowing,
    bpf::{bulkhead_progs, wait_unloaded},
    conn,
    conn::{monotonic_ns, Attempt, Verdict},
    control::{status, status_service, wait_status, SharedPins},
    events::{calls_of, events, wait_event},
    eventually, fixture, free_port_block,
    http::metrics_addr,
    pinned_map::PinnedPerCpuArray,
    probe,
    process::{scaled, signal},
    prometheus::{sample_count, scrape},
    require_bpf, service_policy, CgroupGuard, Daemon, Listener, PolicyDir, Probe, ProgSnapshot,
    Proto, EPERM,
};
use serde_json::Value;

/// How long the kernel may take to free programs nobody holds any more.
const UNLOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new agent may take to manage a cgroup made while none ran.
const MANAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// A service that may reach one listener and not the other.
struct Reach<'a> {
    client: Probe,
    allowed: &'a Listener,
    denied: &'a Listener,
}

impl Reach<'_> {
    fn assert_enforced(&self, why: &str) {
        fixture::assert_enforced(&self.client, (self.allowed, why), (self.denied, why));
    }
}

/// What a restarted agent must report the same: everything but counters.
fn state_of(status: &Value) -> Vec<Value> {
    status["services"]
        .as_array()
        .map(|all| {
            all.iter()
                .map(|s| {
                    let mut s = s.clone();
                    for counter in ["allowed", "denied", "audited"] {
                        s.as_object_mut().map(|o| o.remove(counter));
                    }
                    s
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `N` of `KEY=N` in the first log line containing `marker`.
fn logged_number(log: &str, marker: &str, key: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(marker))?;
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Asserts every attempt was judged by the policy: the allowed port
/// reached, the denied one refused with `EPERM` (no gap, no overlap that
/// denies too much, no error).
fn assert_judged_throughout(attempts: &[Attempt], allowed: &Listener, denied: &Listener) {
    let odd: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| {
            let want = if a.port == allowed.port() {
                Verdict::Ok
            } else {
                Verdict::Errno(EPERM)
            };
            a.verdict != want
        })
        .collect();
    assert!(
        odd.is_empty(),
        "{} of {} connections through the kill and the restart were not judged by the policy \
         (allowed port {}, denied port {}): {:?}",
        odd.len(),
        attempts.len(),
        allowed.port(),
        denied.port(),
        &odd[..odd.len().min(10)]
    );
}

/// Asserts the second agent recovered the events the pinned programs
/// recorded while no agent ran (`(killed, restarted)`, monotonic ns), among
/// them denials of `denied_port`; returns (recovered, lost, such denials).
fn assert_downtime_recorded(
    second: &Daemon,
    denied_port: u16,
    (killed_at, restart_at): (u64, u64),
    down: usize,
) -> (u64, u64, usize) {
    let log = second.log();
    let recovered = logged_number(&log, "took over", "recovered").unwrap_or(0);
    let lost = logged_number(&log, "took over", "lost").unwrap_or(0);
    assert!(
        recovered > 0,
        "the second agent recovered no event of the {down} connections made while none ran:\n{log}"
    );
    let denied_while_down = events(second)
        .iter()
        .filter(|e| {
            e["type"] == "verdict"
                && e["verdict"] == "deny"
                && e["dst_port"] == denied_port
                && e["ktime_ns"]
                    .as_u64()
                    .is_some_and(|t| t > killed_at && t < restart_at)
        })
        .count();
    assert!(
        denied_while_down > 0,
        "no deny verdict from while no agent ran in the second agent's decision log"
    );
    (recovered, lost, denied_while_down)
}

/// SIGTERM keeps enforcing too; `bulkhead detach` removes everything,
/// leaving no program behind.
fn stop_and_detach(mut second: Daemon, shared: &SharedPins, before: &ProgSnapshot, reach: &Reach) {
    let second_progs = second.prog_ids();
    let exit = second.stop();
    assert_eq!(exit.code(), Some(0), "the second agent on SIGTERM: {exit}");
    reach.assert_enforced("after SIGTERM");
    shared
        .detach()
        .unwrap_or_else(|e| panic!("detach after the restart: {e}"));
    assert!(!shared.pinned(), "pins left after bulkhead detach");
    let left = wait_unloaded(&second_progs, UNLOAD_TIMEOUT);
    assert!(left.is_empty(), "programs loaded after detach: {left:?}");
    let orphans = before.orphans_since(UNLOAD_TIMEOUT);
    assert!(
        orphans.is_empty(),
        "bulkhead programs left with no holder: {orphans:?}"
    );
    reach
        .client
        .tcp_connect(reach.denied.addr())
        .assert_ok("after bulkhead detach nothing is enforced");
}

/// The name of each of `ids` that is loaded (the kernel keeps the first
/// 15 bytes of a name).
fn names_of(ids: &BTreeSet<u64>) -> BTreeMap<u64, String> {
    bulkhead_progs()
        .into_iter()
        .filter(|p| ids.contains(&p.id))
        .map(|p| (p.id, p.name))
        .collect()
}

/// After the agent that held `held` (id to name) was killed: every program
/// it attached is still loaded. The inbound one is attached only for a
/// policy that restricts inbound traffic, which these tests' do not:
/// loaded but never attached, it goes with the agent.
fn assert_attached_stay(held: &BTreeMap<u64, String>) {
    let loaded: Vec<u64> = bulkhead_progs().iter().map(|p| p.id).collect();
    let gone: Vec<&str> = held
        .iter()
        .filter(|(id, _)| !loaded.contains(id))
        .map(|(_, name)| name.as_str())
        .collect();
    assert!(
        gone.len() == 1 && gone[0].starts_with("bulkhead_ingres"),
        "programs unloaded with the agent: {gone:?} (only the unattached bulkhead_ingress may go)"
    );
}

/// SIGKILL: the pinned programs keep enforcing while no agent runs
/// (denied stays denied, allowed stays allowed, seen by a client looping
/// the whole time), a new agent on the same pins takes over without a gap,
/// recovers the decisions made while none ran, reports the same state, and
/// `bulkhead detach` finally removes everything.
#[test]
fn sigkill_keeps_enforcing_and_a_new_agent_takes_over() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies =
        PolicyDir::with(&[("svc.toml", &allowing(&svc, "127.0.0.1", &[allowed.port()]))]);
    let before = ProgSnapshot::take();
    let shared = SharedPins::new();
    let reach = Reach {
        client: probe!().in_cgroup(svc.path()),
        allowed: &allowed,
        denied: &denied,
    };

    let mut first = shared.start(&policies);
    reach.assert_enforced("while the first agent runs");
    let state = state_of(&status(&first));
    assert_eq!(
        status_service(&status(&first), "svc")["state"],
        "managed",
        "the service at start"
    );
    let first_progs = first.prog_ids();
    assert!(!first_progs.is_empty(), "the first agent holds no program");
    let first_names = names_of(&first_progs);
    let looping = conn!()
        .in_cgroup(svc.path())
        .connect_loop(&[allowed.addr(), denied.addr()], Duration::from_millis(1));
    thread::sleep(Duration::from_millis(200));

    let pid = first.pid().expect("the first agent runs");
    let killed_at = monotonic_ns();
    assert!(
        signal(pid, libc::SIGKILL),
        "cannot SIGKILL bulkhead ({pid})"
    );
    let exit = first.wait_exit(Duration::from_secs(10));
    assert_eq!(
        exit.signal(),
        Some(libc::SIGKILL),
        "the first agent: {exit}"
    );

    // No agent runs: the pins hold the programs, which keep enforcing.
    assert!(shared.pinned(), "nothing pinned after SIGKILL");
    assert_attached_stay(&first_names);
    reach.assert_enforced("while no agent runs (after SIGKILL)");
    reach
        .client
        .udp_sendto(denied.addr())
        .assert_eperm("UDP while no agent runs");
    thread::sleep(Duration::from_millis(500));

    let restart_at = monotonic_ns();
    let second = shared.start(&policies);
    let ready_at = monotonic_ns();
    let log = second.log();
    assert!(
        log.contains("took over from the previous agent's pinned programs"),
        "the second agent should say it took over:\n{log}"
    );
    assert_eq!(
        state_of(&status(&second)),
        state,
        "the second agent should report what the first did"
    );
    let left = wait_unloaded(&first_progs, UNLOAD_TIMEOUT);
    assert!(
        left.is_empty(),
        "the first agent's programs are still loaded after the take-over: {left:?}"
    );
    reach.assert_enforced("after the take-over");
    thread::sleep(Duration::from_millis(200));
    let attempts = looping.stop();

    assert_judged_throughout(&attempts, &allowed, &denied);
    let down = attempts
        .iter()
        .filter(|a| a.start_ns > killed_at && a.end_ns < restart_at)
        .count();
    let overlap = attempts
        .iter()
        .filter(|a| a.start_ns >= restart_at && a.end_ns <= ready_at)
        .count();
    assert!(down > 0, "no connection was tried while no agent ran");

    let (recovered, lost, denied_while_down) =
        assert_downtime_recorded(&second, denied.port(), (killed_at, restart_at), down);
    eprintln!(
        "restart: {} connections, {down} while no agent ran, {overlap} while the second \
         started; {recovered} events recovered ({denied_while_down} denials from the downtime), \
         {lost} lost",
        attempts.len()
    );

    stop_and_detach(second, &shared, &before, &reach);
}

/// What changed while no agent ran is picked up by the next one: a policy
/// change, a service whose cgroup was made, and one whose cgroup was made
/// again (new cgroup id); until then the old policy stays in force.
#[test]
fn changes_while_stopped_apply_when_an_agent_runs_again() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let late = CgroupGuard::new();
    late.remove();
    let p1 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let p2 = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let policies = PolicyDir::with(&[
        ("svc.toml", &allowing(&svc, "127.0.0.1", &[p1.port()])),
        ("late.toml", &service_policy(&late, "enforce", &[])),
    ]);
    let shared = SharedPins::new();
    let mut first = shared.start(&policies);
    let st = status(&first);
    assert_eq!(
        (
            &status_service(&st, "svc")["state"],
            &status_service(&st, "late")["state"]
        ),
        (&Value::from("managed"), &Value::from("waiting")),
        "at start: {st:#}"
    );
    let old_id = svc.id();
    assert_eq!(status_service(&st, "svc")["cgroup_id"], old_id);
    let exit = first.stop();
    assert_eq!(exit.code(), Some(0), "the first agent on SIGTERM: {exit}");

    // While none runs: a new policy (not applied yet), a new cgroup, a
    // cgroup made again.
    std::fs::write(
        policies.path().join("svc.toml"),
        allowing(&svc, "127.0.0.1", &[p2.port()]),
    )
    .unwrap_or_else(|e| panic!("cannot rewrite svc.toml: {e}"));
    let old_policy = Reach {
        client: probe!().in_cgroup(svc.path()),
        allowed: &p1,
        denied: &p2,
    };
    old_policy.assert_enforced("the policy changed while no agent runs: the old one stays");
    late.create_again();
    svc.remove();
    svc.create_again();
    let new_id = svc.id();
    assert_ne!(new_id, old_id, "test bug: the cgroup kept its id");

    let second = shared.start(&policies);
    let st = wait_status(&second, "both services managed", MANAGE_TIMEOUT, |st| {
        status_service(st, "svc")["state"] == "managed"
            && status_service(st, "late")["state"] == "managed"
    });
    assert_eq!(
        (
            &status_service(&st, "svc")["cgroup_id"],
            &status_service(&st, "late")["cgroup_id"]
        ),
        (&Value::from(new_id), &Value::from(late.id())),
        "the cgroup ids the second agent manages: {st:#}"
    );
    let new_policy = Reach {
        client: old_policy.client.clone(),
        allowed: &p2,
        denied: &p1,
    };
    new_policy.assert_enforced("the policy changed while no agent ran, in the new cgroup");
    let late_client = probe!().in_cgroup(late.path());
    for l in [&p1, &p2] {
        late_client
            .tcp_connect(l.addr())
            .assert_eperm("the service whose cgroup was made while no agent ran");
    }
}

/// How long the flood runs: through the second agent's start.
const FLOOD: Duration = Duration::from_secs(8);
/// The flood's head start, while no agent runs: far more than fills the
/// ring buffer (4 MiB by default, about 29,000 records).
const HEAD_START: Duration = Duration::from_millis(500);
/// The second agent must be READY within this under the flood: its usual
/// start and the take-over's drain (`takeover::DRAIN_TIME` while the old
/// programs write, then the rest of their ring buffer, at most one ring
/// buffer, once they are detached), with room for a loaded 2-core machine.
const READY_UNDER_FLOOD: Duration = Duration::from_secs(6);
/// How long the second agent's metrics may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(20);

/// Issue 14, item 4: a new agent takes over from pinned programs that a
/// flood keeps writing events into (an audit-mode service making UDP
/// connects as fast as it can: unlike enforce-mode denials these are not
/// rate-limited, every call is an event). It is READY within a bounded
/// time, and every event either program made is accounted for: the
/// decisions both programs counted (the previous agent's COUNTERS, held
/// open from its pin; the second agent's `bulkhead_connections_total`)
/// equal the events received plus every loss counted
/// (`bulkhead_events_lost_total`: kernel ring buffer, while no agent ran,
/// left by the take-over's bounded drain, undecodable).
#[test]
fn takeover_under_an_event_flood_is_ready_in_bounded_time_and_counts_every_event() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("flood.toml", &service_policy(&svc, "audit", &[]))]);
    let shared = SharedPins::new();
    let mut first = shared.start(&policies);
    let exit = first.stop();
    assert_eq!(exit.code(), Some(0), "the first agent on SIGTERM: {exit}");
    let slot = counter_slot(DIRECTION_EGRESS, PROTO_UDP, VERDICT_AUDIT);
    // Service id 0 (the only service, first half).
    let old_counters = PinnedPerCpuArray::open(
        &shared
            .pin_dir()
            .join("current/maps")
            .join(agent_common::maps::COUNTERS),
        8,
    );

    let client = probe!().in_cgroup(svc.path());
    let target = addr(&format!(
        "127.0.0.1:{}",
        free_port_block("127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")), 1)
    ));
    let flood_started = Instant::now();
    let flooding = thread::spawn(move || client.flood_for(Proto::Udp, scaled(FLOOD), target));
    thread::sleep(HEAD_START);
    let mut args = vec![OsString::from("--policy-dir"), policies.path().into()];
    args.extend(shared.args());
    // Flow summaries every second, so that the counts come in soon.
    let config = std::env::temp_dir().join(format!("bulkhead-restart-{}.toml", std::process::id()));
    std::fs::write(&config, "[flows]\ninterval_secs = 1\n")
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
    args.extend([OsString::from("--config"), config.clone().into()]);
    let spawned = Instant::now();
    let mut second = Daemon::spawn_run(&args);
    second.wait_ready();
    let ready_in = spawned.elapsed();
    let ready_at = flood_started.elapsed();
    let _ = std::fs::remove_file(&config);
    let flood = flooding
        .join()
        .unwrap_or_else(|_| panic!("the flooding thread panicked"));
    assert_eq!(
        flood.connected, flood.attempts,
        "audit mode: every connect goes through: {}",
        flood.json
    );
    assert!(
        ready_at < flood.elapsed,
        "test bug: the flood ({:?}) ended before the second agent was READY ({ready_at:?})",
        flood.elapsed
    );
    let log = second.log();
    assert!(
        ready_in <= scaled(READY_UNDER_FLOOD),
        "the second agent took {ready_in:?} to READY under a flood, more than \
         {:?}:\n{log}",
        scaled(READY_UNDER_FLOOD)
    );

    let old = old_counters.sum_u64(slot);
    let (new, reported, lost) = wait_accounted(&second, old);
    let lost_sum: u64 = lost.iter().map(|(_, n)| n).sum();
    eprintln!(
        "take-over under a flood: {} connects in {:?}; READY {ready_in:?} after start; judged \
         {old} by the previous programs, {new} by the new ones; {reported} calls reported, \
         lost {lost:?}",
        flood.attempts, flood.elapsed
    );
    assert!(
        old <= flood.attempts && new <= flood.attempts && old + new >= flood.attempts,
        "every one of the {} connects is judged by one program or both (previous {old}, new \
         {new})",
        flood.attempts
    );
    let left = lost
        .iter()
        .find(|(source, _)| *source == "takeover_drain")
        .map_or(0, |(_, n)| *n);
    assert_eq!(
        left, 0,
        "what the previous programs left in their ring buffer is read once they are \
         detached, not counted lost: {lost:?}\n{log}"
    );
    assert_eq!(
        reported + lost_sum,
        old + new,
        "every call the two programs judged ({old} + {new}) is reported (a record or a flow \
         summary, the previous programs' flow counts among them) or counted lost ({reported} \
         reported, lost {lost:?}):\n{log}"
    );
}

/// The second agent's (decisions counted, calls its events report, losses by
/// source), once reported + losses = `old` + decisions (or after
/// [`CATCH_UP`], as they then are).
fn wait_accounted(second: &Daemon, old: u64) -> (u64, u64, Vec<(&'static str, u64)>) {
    let metrics = metrics_addr(second);
    let judged = [
        ("service", "flood"),
        ("direction", "egress"),
        ("protocol", "udp"),
        ("verdict", "audit"),
    ];
    let lost_sources = [
        "kernel_ringbuf_verdict",
        "while_agent_down",
        "takeover_drain",
        "decode",
    ];
    eventually(CATCH_UP, Duration::from_millis(200), || {
        let samples = scrape(metrics);
        let count = |name: &str, labels: &[(&str, &str)]| {
            sample_count(&samples, name, labels)
                .unwrap_or_else(|| panic!("no {name}{labels:?} in the metrics"))
        };
        let new = count("bulkhead_connections_total", &judged);
        let received = calls_of(
            &events(second)
                .into_iter()
                .filter(|ev| {
                    ev["service"] == "flood" && (ev["type"] == "verdict" || ev["type"] == "flow")
                })
                .collect::<Vec<_>>(),
        );
        let lost: Vec<(&str, u64)> = lost_sources
            .iter()
            .map(|s| (*s, count("bulkhead_events_lost_total", &[("source", s)])))
            .collect();
        let accounted = received + lost.iter().map(|(_, n)| n).sum::<u64>();
        if accounted == old + new {
            Ok((new, received, lost))
        } else {
            Err((new, received, lost))
        }
    })
    .unwrap_or_else(|last| last)
}

/// A decision made while no agent ran is logged by the next agent under
/// the service name of the policy that made it, even when the next agent's
/// policy names the service otherwise (it used to read the names it had
/// just saved over the previous agent's).
#[test]
fn leftover_events_carry_the_previous_policys_names() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let allowed = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let denied = probe!().listen(Proto::Tcp, addr("127.0.0.1:0"));
    let shared = SharedPins::new();
    let before = PolicyDir::with(&[(
        "alpha.toml",
        &allowing(&svc, "127.0.0.1", &[allowed.port()]),
    )]);
    let mut first = shared.start(&before);
    let exit = first.stop();
    assert_eq!(exit.code(), Some(0), "the first agent on SIGTERM: {exit}");

    let stopped_at = monotonic_ns();
    probe!()
        .in_cgroup(svc.path())
        .tcp_connect(denied.addr())
        .assert_eperm("while no agent runs");
    let after = PolicyDir::with(&[("beta.toml", &allowing(&svc, "127.0.0.1", &[allowed.port()]))]);
    let second = shared.start(&after);
    let leftover = wait_event(&second, "the denial made while no agent ran", |e| {
        e["type"] == "verdict"
            && e["dst_port"] == denied.port()
            && e["ktime_ns"].as_u64().is_some_and(|t| t > stopped_at)
    });
    assert_eq!(
        leftover["service"], "alpha",
        "named by the policy in force when it was made: {leftover:#}"
    );
    drop(second);
    shared
        .detach()
        .unwrap_or_else(|e| panic!("detach after the test: {e}"));
}
