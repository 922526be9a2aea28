//! The export's CPU at 1,000 flow rows per second: one agent whose service
//! cycles through 5,000 loopback destinations at 1,000 UDP connect()s per
//! second, batches every 5 s (each batch sums every destination once:
//! 5,000 rows), ClickHouse up. Measured over a window after a warm-up: the
//! exporter thread's CPU (`bulkhead-fleet`), and the whole agent's with
//! `[fleet]` on and, under the same load, off; rounds alternate on, off.

use std::{thread, time::Duration};

use anyhow::{ensure, Result};

use super::{
    agent::{ticks_per_second, Agent, Fleet, EXPORTER_THREAD},
    load::{Generator, Load},
    median,
    server::Server,
    Env,
};
use crate::bench::sandbox::check_interrupted;

pub const RATE: u64 = 1_000;
pub const DESTINATIONS: u64 = 5_000;
pub const BATCH_INTERVAL_SECS: u64 = 5;
pub const WARMUP: Duration = Duration::from_secs(10);

/// One window of one agent.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// CPU seconds per second (1.0 = one core), whole agent.
    pub agent: f64,
    /// The exporter thread's, when fleet mode is on.
    pub exporter: Option<f64>,
    /// Flow rows stored per second over the window (fleet mode on).
    pub rows_per_s: Option<f64>,
}

pub struct ExportCpu {
    pub window_s: u64,
    pub on: Vec<Window>,
    pub off: Vec<Window>,
}

impl ExportCpu {
    pub fn exporter(&self) -> f64 {
        median(
            &self
                .on
                .iter()
                .filter_map(|w| w.exporter)
                .collect::<Vec<_>>(),
        )
    }
    pub fn rows_per_s(&self) -> f64 {
        median(
            &self
                .on
                .iter()
                .filter_map(|w| w.rows_per_s)
                .collect::<Vec<_>>(),
        )
    }
    pub fn agent_on(&self) -> f64 {
        median(&self.on.iter().map(|w| w.agent).collect::<Vec<_>>())
    }
    pub fn agent_off(&self) -> f64 {
        median(&self.off.iter().map(|w| w.agent).collect::<Vec<_>>())
    }
    /// What fleet mode costs: the whole agent's CPU with it on less off.
    /// The exporter thread alone leaves out the collecting, which a tap
    /// does on the event reader's thread.
    pub fn export_cost(&self) -> f64 {
        self.agent_on() - self.agent_off()
    }
}

pub fn measure(env: &Env, server: &Server, rounds: usize, window: Duration) -> Result<ExportCpu> {
    let url = server.url();
    let fleet = Fleet {
        url: &url,
        batch_interval_secs: BATCH_INTERVAL_SECS,
        queue_rows: 100_000,
        spool_bytes: 256 << 20,
    };
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        for fleet in [Some(&fleet), None] {
            let w = one(env, fleet, window)?;
            eprintln!(
                "xtask bench-fleet: export CPU round {round}, fleet {}: agent {:.2}% of a core, \
                 exporter {}, {} rows/s",
                if fleet.is_some() { "on" } else { "off" },
                w.agent * 100.0,
                w.exporter
                    .map_or("-".into(), |e| format!("{:.2}%", e * 100.0)),
                w.rows_per_s.map_or("-".into(), |r| format!("{r:.0}")),
            );
            if fleet.is_some() {
                on.push(w);
            } else {
                off.push(w);
            }
        }
    }
    Ok(ExportCpu {
        window_s: window.as_secs(),
        on,
        off,
    })
}

fn one(env: &Env, fleet: Option<&Fleet>, window: Duration) -> Result<Window> {
    let agent = Agent::start(&env.bin, &env.mount, "bench-cpu", fleet)?;
    let load = Load {
        rate: RATE,
        calls: u64::MAX,
        run: WARMUP + window + Duration::from_secs(2),
        cycle: DESTINATIONS,
    };
    let generator = Generator::start(&agent.cgroup.path, load)?;
    sleep(WARMUP)?;
    let cpu0 = agent.cpu_ticks()?;
    let exp0 = fleet
        .map(|_| agent.thread_cpu_ticks(EXPORTER_THREAD))
        .transpose()?;
    let sent0 = agent.metrics()?.flow_rows("sent");
    sleep(window)?;
    let cpu1 = agent.cpu_ticks()?;
    let exp1 = fleet
        .map(|_| agent.thread_cpu_ticks(EXPORTER_THREAD))
        .transpose()?;
    let metrics = agent.metrics()?;
    let sent1 = metrics.flow_rows("sent");
    ensure!(
        metrics.flow_rows_lost() == 0,
        "the agent lost or dropped {} flow rows",
        metrics.flow_rows_lost()
    );
    let calls = generator.finish()?;
    ensure!(calls > 0, "the load generator made no call");
    agent.stop()?;
    let per_s = |ticks: u64| ticks as f64 / ticks_per_second() / window.as_secs_f64();
    Ok(Window {
        agent: per_s(cpu1 - cpu0),
        exporter: exp0.zip(exp1).map(|(a, b)| per_s(b - a)),
        rows_per_s: fleet.map(|_| (sent1 - sent0) as f64 / window.as_secs_f64()),
    })
}

/// Sleeps, waking every 100 ms to see whether Ctrl-C was pressed.
fn sleep(d: Duration) -> Result<()> {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        check_interrupted()?;
        thread::sleep(
            Duration::from_millis(100)
                .min(until.saturating_duration_since(std::time::Instant::now())),
        );
    }
    Ok(())
}
