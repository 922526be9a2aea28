//! The ingest rate of the agents' delivery path, as a backlog drain:
//! three agents (three hosts) export to a ClickHouse that is down, so
//! their flow rows wait in memory and in the spool while each service
//! calls a new loopback destination per call (one `flows` row each);
//! then ClickHouse starts and the bench times until every row is stored.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    agent::{Agent, Fleet},
    load::{Generator, Load},
    server::Server,
    Env,
};
use crate::{bench::sandbox::check_interrupted, util::secs};

/// The hosts, one agent each.
pub const HOSTS: [&str; 3] = ["bench-h1", "bench-h2", "bench-h3"];
/// Calls per second of each host's service (a new flow row each). At
/// 15,000/s each, on this 2-core machine, the exporters of that time (a
/// subscriber of the agents' live event channel) fell behind and lost 8%
/// of the rows; the exporter is now a tap of the hub, which cannot fall
/// behind, but the rate was not raised again: see docs/fleet.md, "Scale".
pub const RATE: u64 = 6_000;
/// Batches every second, as the exporter's fastest setting.
pub const BATCH_INTERVAL_SECS: u64 = 1;
/// Each agent keeps this many rows in memory (the default, 100,000), the
/// rest go to the spool, whose bound is raised from 256 MiB so that a
/// third of a million rows per agent fit (about 350 bytes a row there).
pub const QUEUE_ROWS: u64 = 100_000;
pub const SPOOL_BYTES: u64 = 1 << 30;
/// How long the queues must stay the same before the backlog counts as
/// complete (flow summaries every second, batches every second).
const SETTLE: Duration = Duration::from_secs(3);
/// Give up on a drain after this long (the goal is 60 s).
const DRAIN_LIMIT: Duration = Duration::from_secs(300);
/// ... or when no row arrived for this long.
const STALL: Duration = Duration::from_secs(30);

pub struct Ingest {
    /// Rows the agents queued (calls made: one row each), and stored.
    pub rows: u64,
    pub stored: u64,
    /// Rows lost or dropped, per the agents' metrics.
    pub lost: u64,
    /// Seconds from ClickHouse answering to the last row stored.
    pub seconds: f64,
    /// Seconds the three services took to make the backlog.
    pub fill_s: f64,
    /// The backlog when ClickHouse started: rows in memory, spool bytes
    /// and files, summed over the agents.
    pub queued_rows: u64,
    pub spool_bytes: u64,
    pub spool_files: u64,
}

impl Ingest {
    pub fn rate(&self) -> f64 {
        self.stored as f64 / self.seconds.max(1e-9)
    }
}

/// `server` must be running; it is stopped for the fill and started again.
pub fn measure(env: &Env, server: &mut Server, rows: u64) -> Result<Ingest> {
    let devnull = std::path::Path::new("/dev/null");
    server.fleet(&env.bin, devnull, &["init"])?;
    let before = server.number("SELECT count() FROM bulkhead.flows")?;
    ensure!(
        before == 0,
        "bulkhead.flows holds {before} rows before the ingest"
    );
    server.ch.stop();
    let url = server.url();
    let fleet = Fleet {
        url: &url,
        batch_interval_secs: BATCH_INTERVAL_SECS,
        queue_rows: QUEUE_ROWS,
        spool_bytes: SPOOL_BYTES,
    };
    let mut agents = Vec::new();
    for host in HOSTS {
        agents.push(Agent::start(&env.bin, &env.mount, host, Some(&fleet))?);
    }
    let each = rows.div_ceil(HOSTS.len() as u64);
    let load = Load {
        rate: RATE,
        calls: each,
        run: Duration::from_secs(600),
        cycle: u64::MAX,
    };
    eprintln!(
        "xtask bench-fleet: ingest: {} services make {each} flow rows each at {RATE}/s \
         while ClickHouse is down",
        HOSTS.len()
    );
    let started = Instant::now();
    let mut generators = Vec::new();
    for agent in &agents {
        generators.push(Generator::start(&agent.cgroup.path, load)?);
    }
    let mut made = 0;
    for g in generators {
        made += g.finish()?;
    }
    let fill_s = secs(started);
    let want = each * HOSTS.len() as u64;
    ensure!(made == want, "the services made {made} calls, not {want}");
    let backlog = settle(&agents)?;
    let lost: u64 = backlog.iter().map(|b| b.lost).sum();
    eprintln!(
        "xtask bench-fleet: ingest: backlog of {made} rows in {fill_s:.1} s: {} in memory, \
         {} spool bytes in {} files, {lost} lost",
        backlog.iter().map(|b| b.queue_rows).sum::<u64>(),
        backlog.iter().map(|b| b.spool_bytes).sum::<u64>(),
        backlog.iter().map(|b| b.spool_files).sum::<u64>(),
    );

    // What the agents lost before queueing never reaches ClickHouse.
    let queued = made - lost.min(made);
    server.ch.start_again();
    let started = Instant::now();
    drain(server, queued)?;
    let seconds = secs(started);
    // Anything stored twice would show up now.
    thread::sleep(Duration::from_secs(2));
    let stored = server.number("SELECT count() FROM bulkhead.flows")?;
    let mut lost_after = 0;
    for a in &agents {
        lost_after += a.metrics()?.flow_rows_lost();
    }
    for a in agents {
        a.stop()?;
    }
    Ok(Ingest {
        rows: made,
        stored,
        lost: lost_after,
        seconds,
        fill_s,
        queued_rows: backlog.iter().map(|b| b.queue_rows).sum(),
        spool_bytes: backlog.iter().map(|b| b.spool_bytes).sum(),
        spool_files: backlog.iter().map(|b| b.spool_files).sum(),
    })
}

/// One agent's backlog.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Backlog {
    queue_rows: u64,
    spool_bytes: u64,
    spool_files: u64,
    lost: u64,
}

/// Waits until no agent's backlog changed for [`SETTLE`]: every call has
/// been summed into a row and queued.
fn settle(agents: &[Agent]) -> Result<Vec<Backlog>> {
    let read = || -> Result<Vec<Backlog>> {
        agents
            .iter()
            .map(|a| {
                let m = a.metrics()?;
                Ok(Backlog {
                    queue_rows: m.queue_rows(),
                    spool_bytes: m.spool_bytes(),
                    spool_files: m.spool_files(),
                    lost: m.flow_rows_lost(),
                })
            })
            .collect()
    };
    let mut last = read()?;
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupted()?;
        thread::sleep(Duration::from_millis(250));
        let now = read()?;
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= SETTLE {
            return Ok(last);
        }
        if Instant::now() > deadline {
            bail!("the agents' backlog still changes after 120 s: {last:?}");
        }
    }
}

/// Polls the row count until it reaches `want`.
fn drain(server: &Server, want: u64) -> Result<()> {
    let started = Instant::now();
    let (mut last, mut since) = (0, Instant::now());
    loop {
        check_interrupted()?;
        let stored = server
            .number("SELECT count() FROM bulkhead.flows")
            .context("count the stored rows")?;
        if stored >= want {
            return Ok(());
        }
        if stored != last {
            (last, since) = (stored, Instant::now());
        }
        if since.elapsed() > STALL {
            bail!("{stored} of {want} rows stored, and no more for {STALL:?}");
        }
        if started.elapsed() > DRAIN_LIMIT {
            bail!("only {stored} of {want} rows stored after {DRAIN_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}
