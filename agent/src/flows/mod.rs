//! Flow summaries: the kernel counts every judged call in its flow's entry
//! (agent-ebpf/src/flows.rs) and sends a record only for a flow's first
//! call; this sweeper turns the counts into `flow` events. Every interval
//! it closes the table's epoch, reports each flow's calls not yet
//! reported, carries the active flows over and ends the idle ones
//! (docs/events.md, "Flows").

mod plan;
mod tcp;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::watch;
use tracing::warn;

use agent_common::FlowKey;

use crate::{
    config::FlowsConfig,
    events::{Decoder, FlowEvent, Hub, Names},
    kernel::{flow_table::FlowTable, sock_owners::SockOwners},
};

pub use plan::{plan, Plan, Rules};
pub use tcp::OpenConnections;

/// The sweeper's counters, for the metrics.
#[derive(Debug, Default)]
pub struct FlowStats {
    /// Entries in the table after the last sweep.
    pub active: AtomicU64,
    /// The table's capacity.
    pub capacity: AtomicU64,
    /// `flow` events sent.
    pub summaries: AtomicU64,
    /// Flows ended: no call for the idle timeout; their policy replaced;
    /// let go to keep room in the table.
    pub ended_idle: AtomicU64,
    pub ended_policy: AtomicU64,
    pub evicted: AtomicU64,
    /// New flows that found the table full (each call then had a record
    /// of its own), as the kernel counts them.
    pub table_full: AtomicU64,
    /// Connecting TCP sockets whose owner found the kernel's table of them
    /// full (kept in socket storage instead), as the kernel counts them.
    pub tcp_table_full: AtomicU64,
    /// Of those, the ones whose socket refused its storage too: their
    /// connection goes unreported.
    pub tcp_unobserved: AtomicU64,
    /// Entries in the kernel's table of connecting sockets' owners at the
    /// last sweep, and those the sweeps removed as stale.
    pub tcp_table_entries: AtomicU64,
    pub tcp_table_stale: AtomicU64,
    /// Sweeps that failed (logged).
    pub sweep_errors: AtomicU64,
}

/// The sweeper thread; [`Sweeper::stop`] runs a last sweep.
pub struct Sweeper {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
    open: Arc<OpenConnections>,
}

impl Sweeper {
    /// Sweeps `table` every `config.interval_secs`, publishing to `hub`,
    /// with byte summaries of the TCP connections `open` follows (a stage
    /// of `hub` since before the first event was read).
    /// A thread of its own: a sweep is map syscalls and an RCU grace
    /// period, blocking work that must not hold up the runtime.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn spawn(
        table: FlowTable,
        owners: SockOwners,
        names: watch::Receiver<Arc<Names>>,
        hub: Arc<Hub>,
        config: &FlowsConfig,
        stats: Arc<FlowStats>,
        open: Arc<OpenConnections>,
    ) -> std::io::Result<Self> {
        let interval = Duration::from_secs(u64::from(config.interval_secs));
        let capacity = table.capacity();
        stats.capacity.store(u64::from(capacity), Ordering::Relaxed);
        let rules = Rules {
            idle_sweeps: config.idle_timeout_secs.div_ceil(config.interval_secs),
            // Half the table: the open epoch's new flows need the rest.
            carry_max: (capacity / 2) as usize,
        };
        let followed = Arc::clone(&open);
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("flow-sweeper".to_string())
            .spawn(move || {
                let first = Arc::clone(&names.borrow());
                let mut sweeper = Task {
                    table,
                    owners,
                    decoder: Decoder::new(first),
                    names,
                    hub,
                    stats,
                    rules,
                    open,
                };
                loop {
                    let last = match stopped.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => false,
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
                    };
                    sweeper.sweep(last);
                    if last {
                        break;
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread,
            open: followed,
        })
    }

    /// Runs a last sweep (what the flows counted since the previous one is
    /// reported), ends the thread, and saves the open TCP connections in
    /// `state_dir` for the next agent.
    pub fn stop(self, state_dir: &std::path::Path) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            warn!("the flow sweeper panicked");
        }
        self.open.save(state_dir);
    }
}

struct Task {
    table: FlowTable,
    /// Swept with the flows (see kernel::sock_owners).
    owners: SockOwners,
    decoder: Decoder,
    names: watch::Receiver<Arc<Names>>,
    hub: Arc<Hub>,
    stats: Arc<FlowStats>,
    rules: Rules,
    open: Arc<OpenConnections>,
}

impl Task {
    /// One sweep; `last` at the agent's stop.
    fn sweep(&mut self, last: bool) {
        if self.names.has_changed().unwrap_or(false) {
            let names = Arc::clone(&self.names.borrow_and_update());
            self.decoder.set_names(names);
        }
        // Not at the stop: it comes at once after the sweep before, and
        // "unarmed three sweeps in a row" would no longer mean two full
        // intervals. Before the epoch: that sweep may fail.
        if !last {
            let owners = self.owners.sweep();
            let s = &self.stats;
            s.tcp_table_entries.store(owners.entries, Ordering::Relaxed);
            s.tcp_table_stale
                .fetch_add(owners.removed, Ordering::Relaxed);
        }
        let closed = match self.table.close_epoch() {
            Ok(closed) => closed,
            Err(e) => {
                self.stats.sweep_errors.fetch_add(1, Ordering::Relaxed);
                warn!("flow sweep: cannot close the epoch: {e}; counts stay in the table until the next sweep");
                return;
            }
        };
        // One walk of the table: the closed epoch's entries to report, and
        // how many the open one holds (for the gauge).
        let (entries, open): (Vec<_>, Vec<_>) = self
            .table
            .entries()
            .into_iter()
            .partition(|(key, _)| key.epoch == closed);
        let closed_keys: Vec<FlowKey> = entries.iter().map(|(key, _)| *key).collect();
        let names = Arc::clone(&self.names.borrow());
        let plan = plan(entries, self.rules, |id| names.is_live(id));
        let events = summaries(&self.decoder, &plan, crate::events::monotonic_ns());
        // Carried over before the old entries go, so that a call between
        // the two finds its flow in one epoch or the other (else it would
        // count as a new flow and send a record again).
        let mut carried = 0u64;
        for (key, value) in &plan.carry {
            carried += u64::from(self.table.carry(key, value));
        }
        for key in &closed_keys {
            self.table.remove(key);
        }
        let s = &self.stats;
        s.summaries
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        s.ended_idle.fetch_add(plan.ended_idle, Ordering::Relaxed);
        s.ended_policy
            .fetch_add(plan.ended_policy, Ordering::Relaxed);
        s.evicted.fetch_add(plan.evicted, Ordering::Relaxed);
        s.table_full.store(self.table.full(), Ordering::Relaxed);
        s.tcp_table_full
            .store(self.table.owners_full(), Ordering::Relaxed);
        s.tcp_unobserved
            .store(self.table.owners_lost(), Ordering::Relaxed);
        // New flows made since the walk show at the next sweep.
        s.active
            .store(open.len() as u64 + carried, Ordering::Relaxed);
        self.hub.publish(events);
        let bytes = self.open.summaries();
        s.summaries.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.hub.publish(bytes);
    }
}

/// The `flow` events of a plan: one per flow with a record, one per group
/// of held-back flows (no destination; `suppressed`: how many flows).
fn summaries(decoder: &Decoder, plan: &Plan, now_ns: u64) -> Vec<FlowEvent> {
    let flows = plan
        .summaries
        .iter()
        .filter_map(|(key, value, calls)| decoder.flow_summary(key, value, *calls, now_ns));
    let held = plan.held_back.iter().filter_map(|(key, value, calls, n)| {
        let anywhere = FlowKey {
            addr: [0; 16],
            family: 0,
            port: 0,
            local_port: 0,
            ..*key
        };
        let mut ev = decoder.flow_summary(&anywhere, value, *calls, now_ns)?;
        ev.suppressed = Some(u32::try_from(*n).unwrap_or(u32::MAX));
        Some(ev)
    });
    flows.chain(held).collect()
}

/// A previous agent's flow table, once its programs are detached: every
/// call its entries hold that no record reported is published as a
/// summary. Returns how many summaries.
pub fn drain_previous(table: &FlowTable, decoder: &Decoder, hub: &Hub) -> u64 {
    // Every flow ends here: nothing is carried into this agent's table.
    let rules = Rules {
        idle_sweeps: 0,
        carry_max: 0,
    };
    let plan = plan(table.entries(), rules, |_| false);
    let events = summaries(decoder, &plan, crate::events::monotonic_ns());
    let n = events.len() as u64;
    hub.publish(events);
    n
}
