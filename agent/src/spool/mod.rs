//! The delivery buffer in front of a server that may be down: batches of
//! rows wait here, oldest first, until the sender acknowledges each one
//! (docs/spool.md).
//!
//! A bounded queue in memory (bound in rows) backed by a bounded directory
//! on disk (bound in bytes): while the server is down, batches stay in
//! memory until its bound is reached, then each new one is written to a
//! file of its own; past both bounds new batches are dropped and counted
//! (`queue.rs` says why the new ones). After a restart the files are read
//! back and delivered first, in order. Damaged files are set aside, named
//! in a warning, and never stop the others.
//!
//! - `batch`: what a batch is, and what is accepted
//! - `format`: a spooled batch's file (header, checksums)
//! - `dir`: the directory (names, whole-or-nothing writes, set-aside, lock)
//! - `queue`: the one ordered queue over memory and disk, and the bounds
//! - `stats`: what is held and dropped, for the metrics
//!
//! **Threads.** A [`Spool`] is `Send + Sync`: share it in an `Arc`; each
//! call takes an internal lock. [`Spool::open`], [`Spool::push`] (past
//! the memory bound), [`Spool::oldest`] and [`Spool::ack`] (of a batch on
//! disk) and [`Spool::persist`] read, write, rename or flush files while
//! holding it, so call them only from the exporter's own thread or from
//! `tokio::task::spawn_blocking`, never from the enforcement or event
//! path: producers hand their rows to the exporter, which pushes them.
//! [`Spool::stats`] gives the metrics a copy that never waits on that I/O.

mod batch;
mod dir;
mod format;
mod queue;
mod stats;
#[cfg(test)]
mod tests;

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

pub use batch::{Batch, MAX_ID_BYTES, MAX_TABLE_BYTES};
pub use queue::{Persisted, Pushed, SpoolLimits, INVALID_TABLE};
pub use stats::{DropReason, SpoolCounts, SpoolStats, TableCounts};

use queue::Queue;

/// The spool directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("spool directory {}: {problem}", dir.display())]
pub struct OpenError {
    pub dir: PathBuf,
    pub problem: io::Error,
}

/// An open spool (see the module's notes on threads).
pub struct Spool {
    dir: PathBuf,
    queue: Mutex<Queue>,
    stats: Arc<SpoolStats>,
    /// Holds the directory's lock while the spool is open.
    _lock: File,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Opens the spool in `dir`, creating it (mode 0700) when missing, and
    /// reads back what an earlier agent left there: those batches come
    /// first, oldest first. Unfinished and damaged files are set aside in
    /// `dir/set-aside/`, each named in a warning. Files found are kept even
    /// past `limits.disk_bytes` (a lowered bound); nothing new is written
    /// to disk until they are under it.
    ///
    /// # Errors
    /// The directory cannot be created or read, is a symbolic link or not a
    /// directory, belongs to another user, or another process has it open.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<Self, OpenError> {
        let failed = |problem| OpenError {
            dir: dir.to_path_buf(),
            problem,
        };
        dir::ensure(dir).map_err(failed)?;
        let lock = dir::lock(dir).map_err(failed)?;
        let queue = Queue::load(dir, limits).map_err(failed)?;
        let stats = Arc::new(SpoolStats::default());
        stats.publish(&queue.counts);
        Ok(Self {
            dir: dir.to_path_buf(),
            queue: Mutex::new(queue),
            stats,
            _lock: lock,
        })
    }

    /// Takes `batch`: in memory while the memory bound allows, else on disk
    /// while the disk bound allows, else dropped and counted.
    pub fn push(&self, batch: Batch) -> Pushed {
        self.with(|q| q.push(batch))
    }

    /// The oldest batch, left in the spool until [`Spool::ack`]. Damaged
    /// files met on the way are set aside (see [`Spool::open`]).
    pub fn oldest(&self) -> Option<Batch> {
        self.with(Queue::oldest)
    }

    /// Removes the batch `batch_id` after its delivery, and its file if it
    /// has one. False when no batch has that id.
    pub fn ack(&self, batch_id: &str) -> bool {
        self.with(|q| q.ack(batch_id))
    }

    /// Writes the batches waiting in memory to disk (in order, within the
    /// disk bound; the rest are dropped and counted), so that a clean stop
    /// loses nothing that fits. Call it when the exporter stops.
    pub fn persist(&self) -> Persisted {
        self.with(Queue::persist)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The counts, for the metrics: a copy taken after every change, read
    /// without waiting on the spool.
    #[must_use]
    pub fn stats(&self) -> Arc<SpoolStats> {
        Arc::clone(&self.stats)
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the queue, then publishes the counts.
    fn with<T>(&self, f: impl FnOnce(&mut Queue) -> T) -> T {
        let mut q = self.lock();
        let out = f(&mut q);
        self.stats.publish(&q.counts);
        out
    }
}
