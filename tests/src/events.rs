//! Reading a test daemon's decision log (`--events`, JSON lines; see
//! `docs/events.md`).
//!
//! Events reach the log asynchronously (kernel ring buffer, then the
//! daemon's writer), so a test waits for the one it expects with
//! [`wait_event`] and then checks its fields exactly with [`assert_fields`].

use std::{fs, io, thread, time::Duration};

use serde_json::Value;

use crate::{daemon::Daemon, eventually::eventually};

/// How long an event may take from the kernel to the decision log.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every complete line of the daemon's decision log so far, parsed (a last
/// line still being written is left for the next look). Panics on a line
/// that is not JSON: the log must only ever hold events.
#[must_use]
pub fn events(daemon: &Daemon) -> Vec<Value> {
    let path = daemon.events_path();
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        // Nothing decided yet: the daemon creates the file lazily.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read the decision log {}: {e}", path.display()),
    };
    let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "not a JSON line in the decision log {} ({e}): {l:?}",
                    path.display()
                )
            })
        })
        .collect()
}

/// The kernel's host name: what every event of a daemon without
/// `[fleet] host` names as its `host`.
#[must_use]
pub fn kernel_hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|e| panic!("cannot read the host name: {e}"))
        .trim()
        .to_string()
}

/// Polls the decision log until an event satisfies `matches`, and returns
/// it; panics after [`EVENT_TIMEOUT`] with `what` and every event logged.
#[must_use]
pub fn wait_event(daemon: &Daemon, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    eventually(EVENT_TIMEOUT, Duration::from_millis(50), || {
        let all = events(daemon);
        match all.iter().find(|ev| matches(ev)) {
            Some(ev) => Ok(ev.clone()),
            None => Err(all),
        }
    })
    .unwrap_or_else(|all| {
        panic!(
            "no {what} in the decision log within {EVENT_TIMEOUT:?}; it holds {} events: {all:#?}",
            all.len()
        )
    })
}

/// Polls the decision log until `n` events satisfy `matches`, waits a
/// moment for any further one, and returns them all: the caller asserts
/// the exact number. Panics after [`EVENT_TIMEOUT`] with fewer.
#[must_use]
pub fn wait_events(
    daemon: &Daemon,
    what: &str,
    n: usize,
    matches: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    poll_matching(daemon, EVENT_TIMEOUT, &matches, |found| found.len() >= n).unwrap_or_else(
        |found| {
            panic!(
                "only {} of {n} {what} in the decision log within {EVENT_TIMEOUT:?}: {found:#?}",
                found.len()
            )
        },
    );
    // The reader drains on a timer of at most 80 ms: one more look after
    // it catches an event too many.
    thread::sleep(Duration::from_millis(200));
    matching_events(daemon, &matches)
}

fn matching_events(daemon: &Daemon, matches: &impl Fn(&Value) -> bool) -> Vec<Value> {
    events(daemon)
        .into_iter()
        .filter(|ev| matches(ev))
        .collect()
}

/// Polls the events satisfying `matches` until `done` says they are
/// enough; `Err` with the last ones after `timeout`.
fn poll_matching(
    daemon: &Daemon,
    timeout: Duration,
    matches: &impl Fn(&Value) -> bool,
    done: impl Fn(&[Value]) -> bool,
) -> Result<(), Vec<Value>> {
    eventually(timeout, Duration::from_millis(50), || {
        let found = matching_events(daemon, matches);
        if done(&found) {
            Ok(())
        } else {
            Err(found)
        }
    })
}

/// Asserts each `(field, value)` of `want` is exactly what `ev` holds.
pub fn assert_fields(ev: &Value, want: &[(&str, Value)], what: &str) {
    for (field, value) in want {
        assert_eq!(
            &ev[field], value,
            "{what}: field {field:?} of the event {ev:#}"
        );
    }
}

/// The calls the events report (`calls`: 1 for a verdict, the count of a
/// `flow` summary), summed.
#[must_use]
pub fn calls_of(events: &[Value]) -> u64 {
    events
        .iter()
        .map(|ev| ev["calls"].as_u64().unwrap_or(0))
        .sum()
}

/// Polls the decision log until the events satisfying `matches` report
/// `calls` calls in all (a flow's first record and its summaries), then
/// waits `settle` (a sweep interval and a margin) for any call too many,
/// and returns them: the caller asserts the exact sum. Panics after
/// `timeout` with fewer.
#[must_use]
pub fn wait_calls(
    daemon: &Daemon,
    what: &str,
    calls: u64,
    timeout: Duration,
    settle: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    wait_counted(daemon, what, calls, calls_of, timeout, settle, matches)
}

/// [`wait_calls`], the events' calls counted by `count` (say, with the
/// `suppressed` counts of their records).
#[must_use]
pub fn wait_counted(
    daemon: &Daemon,
    what: &str,
    calls: u64,
    count: impl Fn(&[Value]) -> u64,
    timeout: Duration,
    settle: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    poll_matching(daemon, timeout, &matches, |found| count(found) >= calls).unwrap_or_else(
        |found| {
            panic!(
                "the {what} in the decision log report {} of {calls} calls within {timeout:?}: \
                 {found:#?}",
                count(&found)
            )
        },
    );
    thread::sleep(settle);
    matching_events(daemon, &matches)
}
