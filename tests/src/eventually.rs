//! Waiting for a condition: the one polling loop of the harness and suites.

use std::{
    thread,
    time::{Duration, Instant},
};

/// Calls `attempt` until it returns `Ok`, at most until `timeout` from now,
/// sleeping `every` between attempts; returns that `Ok`, or the last `Err`
/// once the deadline has passed.
///
/// The first attempt is made at once, and one is always made before the
/// deadline is checked, so a condition already true never waits. `Err`
/// carries what the caller needs to say what it saw: a test panics with it
/// (`.unwrap_or_else(|last| panic!(...))`), or asserts on it
/// (`.unwrap_or_else(|last| last)` when `Ok` and `Err` are the same type).
///
/// # Errors
///
/// The last `Err` of `attempt`, once `timeout` has passed without an `Ok`.
pub fn eventually<T, E>(
    timeout: Duration,
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(done) => return Ok(done),
            Err(last) if Instant::now() >= deadline => return Err(last),
            Err(_) => thread::sleep(every),
        }
    }
}

/// Reads `value` until it equals `want`, at most until `timeout` from now,
/// sleeping `every` between reads; returns the last value read (`want`,
/// or what it was instead), for the caller to assert on.
pub fn settles_at<T: PartialEq>(
    timeout: Duration,
    every: Duration,
    want: &T,
    mut value: impl FnMut() -> T,
) -> T {
    eventually(timeout, every, || {
        let now = value();
        if now == *want {
            Ok(now)
        } else {
            Err(now)
        }
    })
    .unwrap_or_else(|now| now)
}
