//! Talking to the service manager (systemd `Type=notify`, sd_notify(3)):
//! readiness, a short status line, and watchdog pings.
//!
//! Everything here is a no-op when `NOTIFY_SOCKET` is unset or empty, so
//! the daemon behaves the same outside systemd. A failed send is logged,
//! never fatal: enforcement does not depend on the service manager hearing
//! from us.
//!
//! The watchdog (`WatchdogSec=` in the unit; systemd passes `WATCHDOG_USEC`)
//! pings at half the interval, and only while the daemon is healthy: the
//! event consumer is alive and the main loop has beaten recently. A wedged
//! daemon stops pinging, and systemd kills and restarts it.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::events::EventStats;

const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// `READY=1` with a status line: the programs are attached and the policy
/// is in the kernel.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A short status line (`systemctl status` shows it).
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1` with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

fn enabled() -> bool {
    std::env::var_os(NOTIFY_SOCKET).is_some_and(|s| !s.is_empty())
}

fn send(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// What `WATCHDOG_USEC`/`WATCHDOG_PID` ask of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchdogEnv {
    /// No watchdog (unset, or meant for another process).
    Off,
    /// Ping at least this often (systemd's `WatchdogSec=`).
    Every(Duration),
}

/// Reads the watchdog request from the environment; `Err` says what is
/// wrong with it (the daemon then logs it and does not ping).
pub fn watchdog_env() -> Result<WatchdogEnv, String> {
    let usec = std::env::var(WATCHDOG_USEC).ok();
    let pid = std::env::var(WATCHDOG_PID).ok();
    parse_watchdog_env(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// sd_watchdog_enabled(3): `WATCHDOG_USEC` is a positive number of
/// microseconds; `WATCHDOG_PID`, when set, must name this process.
fn parse_watchdog_env(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<WatchdogEnv, String> {
    let Some(usec) = usec else {
        return Ok(WatchdogEnv::Off);
    };
    let usec: u64 = usec
        .trim()
        .parse()
        .map_err(|_| format!("{WATCHDOG_USEC}={usec:?} is not a number of microseconds"))?;
    if usec == 0 {
        return Err(format!("{WATCHDOG_USEC}=0: the interval must be positive"));
    }
    if let Some(pid) = pid {
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| format!("{WATCHDOG_PID}={pid:?} is not a process id"))?;
        if pid != own_pid {
            return Ok(WatchdogEnv::Off);
        }
    }
    Ok(WatchdogEnv::Every(Duration::from_micros(usec)))
}

/// Proof of life from the daemon's main loop, read by the watchdog task.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds from `start` to the last beat.
    last_ms: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that the main loop is turning. Cheap: one atomic store.
    pub fn beat(&self) {
        self.last_ms
            .store(millis(self.start.elapsed()), Ordering::Relaxed);
    }

    fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The watchdog: the main loop calls [`Watchdog::beat`]; dropping it stops
/// the pings. Inert (beats go nowhere) when the service manager asked for
/// no watchdog.
#[derive(Debug)]
pub struct Watchdog {
    heartbeat: Arc<Heartbeat>,
    task: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts pinging if the service manager asked for it (`WATCHDOG_USEC`),
    /// at half its interval, while `stats.consumer_alive` holds and the main
    /// loop beats at least every `beat_every` (with slack). Call after
    /// `READY=1`, inside the runtime.
    pub fn start(stats: Arc<EventStats>, beat_every: Duration) -> Self {
        let heartbeat = Arc::new(Heartbeat::new());
        let interval = match watchdog_env() {
            Ok(WatchdogEnv::Every(interval)) if enabled() => interval,
            Ok(_) => {
                return Self {
                    heartbeat,
                    task: None,
                }
            }
            Err(e) => {
                warn!("watchdog disabled: {e}");
                return Self {
                    heartbeat,
                    task: None,
                };
            }
        };
        let plan = Plan::new(interval, beat_every);
        info!(
            interval = ?interval,
            ping_every = ?plan.ping_every,
            "service manager watchdog on"
        );
        let task = tokio::spawn(ping_loop(plan, stats, Arc::clone(&heartbeat)));
        Self {
            heartbeat,
            task: Some(task),
        }
    }

    /// Records that the main loop is turning.
    pub fn beat(&self) {
        self.heartbeat.beat();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// When to ping, and how old a heartbeat may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    ping_every: Duration,
    /// A heartbeat older than this means the main loop is stuck.
    stale_after: Duration,
}

impl Plan {
    fn new(interval: Duration, beat_every: Duration) -> Self {
        let ping_every = (interval / 2).max(Duration::from_millis(1));
        // Half the interval, but never less than a few main-loop turns: a
        // loop that beats every 200 ms is not stuck after 250 ms.
        let stale_after = ping_every.max(beat_every.saturating_mul(3));
        Self {
            ping_every,
            stale_after,
        }
    }
}

/// Why a ping is withheld; `None` when the daemon is healthy.
fn unhealthy(consumer_alive: bool, since_beat: Duration, plan: Plan) -> Option<String> {
    if !consumer_alive {
        return Some("the event consumer has stopped".to_owned());
    }
    if since_beat > plan.stale_after {
        return Some(format!(
            "the main loop has not turned for {}",
            humantime::format_duration(Duration::from_millis(millis(since_beat)))
        ));
    }
    None
}

async fn ping_loop(plan: Plan, stats: Arc<EventStats>, heartbeat: Arc<Heartbeat>) {
    heartbeat.beat();
    let mut tick = tokio::time::interval(plan.ping_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut withheld = false;
    loop {
        tick.tick().await;
        let alive = stats.consumer_alive.load(Ordering::Relaxed);
        match unhealthy(alive, heartbeat.since_last(), plan) {
            None => {
                if withheld {
                    info!("watchdog: healthy again; pinging");
                    withheld = false;
                }
                send(&[NotifyState::Watchdog]);
            }
            Some(why) => {
                if !withheld {
                    error!(
                        "watchdog: {why}; no more pings, so the service manager restarts bulkhead"
                    );
                    status(&format!("unhealthy: {why}"));
                    withheld = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_env_follows_sd_watchdog_enabled() {
        let ms = Duration::from_millis;
        assert_eq!(parse_watchdog_env(None, None, 7), Ok(WatchdogEnv::Off));
        assert_eq!(
            parse_watchdog_env(Some("30000000"), None, 7),
            Ok(WatchdogEnv::Every(ms(30_000)))
        );
        assert_eq!(
            parse_watchdog_env(Some("500000"), Some("7"), 7),
            Ok(WatchdogEnv::Every(ms(500)))
        );
        // Meant for another process (e.g. inherited by a child).
        assert_eq!(
            parse_watchdog_env(Some("500000"), Some("8"), 7),
            Ok(WatchdogEnv::Off)
        );
        // WATCHDOG_PID without WATCHDOG_USEC is no watchdog.
        assert_eq!(parse_watchdog_env(None, Some("7"), 7), Ok(WatchdogEnv::Off));
    }

    #[test]
    fn bad_watchdog_env_is_reported() {
        for (usec, pid, says) in [
            ("", None, "not a number"),
            ("30s", None, "not a number"),
            ("-1", None, "not a number"),
            ("0", None, "must be positive"),
            ("1000", Some("me"), "not a process id"),
        ] {
            let err = parse_watchdog_env(Some(usec), pid, 7)
                .expect_err(&format!("WATCHDOG_USEC={usec:?} WATCHDOG_PID={pid:?}"));
            assert!(err.contains(says), "{err:?} should say {says:?}");
        }
    }

    #[test]
    fn pings_at_half_the_interval() {
        let plan = Plan::new(Duration::from_secs(30), Duration::from_millis(200));
        assert_eq!(plan.ping_every, Duration::from_secs(15));
        assert_eq!(plan.stale_after, Duration::from_secs(15));
        // A short interval never calls a loop that beats every 200 ms stuck.
        let plan = Plan::new(Duration::from_millis(300), Duration::from_millis(200));
        assert_eq!(plan.ping_every, Duration::from_millis(150));
        assert_eq!(plan.stale_after, Duration::from_millis(600));
    }

    #[test]
    fn withholds_pings_when_the_pipeline_or_the_loop_is_stuck() {
        let plan = Plan::new(Duration::from_secs(2), Duration::from_millis(200));
        let fresh = Duration::from_millis(100);
        assert_eq!(unhealthy(true, fresh, plan), None);
        let dead = unhealthy(false, fresh, plan).expect("a dead consumer is unhealthy");
        assert!(dead.contains("event consumer"), "{dead}");
        let stuck = unhealthy(true, Duration::from_millis(1500), plan)
            .expect("a loop silent for 1.5 s is stuck (pings every 1 s)");
        assert!(stuck.contains("main loop"), "{stuck}");
        assert!(stuck.contains("1s 500ms"), "{stuck}");
    }

    #[test]
    fn heartbeat_measures_from_the_last_beat() {
        let hb = Heartbeat::new();
        std::thread::sleep(Duration::from_millis(30));
        assert!(hb.since_last() >= Duration::from_millis(30));
        hb.beat();
        assert!(hb.since_last() < Duration::from_millis(30));
    }
}
