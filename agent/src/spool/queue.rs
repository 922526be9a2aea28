//! The spool's one queue: every batch waits in push order, each either in
//! memory or in a file of its own. Because memory and disk are places in
//! one queue rather than two queues, the order holds whichever way batches
//! move (memory, then disk once memory is full, then memory again once
//! deliveries made room), and [`Queue::oldest`] is always the oldest.
//!
//! What is on disk is known by its metadata (table, id, rows, file length);
//! its body is read back only when it is the oldest.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
};

use bytes::Bytes;
use tracing::{info, warn};

use super::{
    batch::{check_table, Batch},
    dir::{self, Listed},
    format,
    stats::{DropReason, SpoolCounts},
};

/// The spool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Rows held in memory at most (0: every batch goes to disk).
    pub memory_rows: u64,
    /// Bytes of batch files on disk at most, headers included (0: no disk).
    pub disk_bytes: u64,
}

/// What [`super::Spool::push`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Waits in memory.
    Queued,
    /// Memory was full: written to disk (flushed) and waits there.
    Spooled,
    /// Not kept; its rows are counted under the table and reason.
    Dropped(DropReason),
}

/// What [`super::Spool::persist`] did with the batches in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Persisted {
    /// Written to disk.
    pub written: u64,
    /// Dropped (no room on disk, or the write failed) and counted.
    pub dropped: u64,
}

/// Counted under this table name when a batch's own is not acceptable (it
/// would make a bad metric label).
pub const INVALID_TABLE: &str = "_invalid";

enum Place {
    Memory(Bytes),
    /// In the file named by the sequence number, of this many bytes.
    Disk {
        len: u64,
    },
}

struct Entry {
    /// Push order, and the file name on disk.
    seq: u64,
    table: String,
    batch_id: String,
    rows: u32,
    place: Place,
}

impl Entry {
    fn new(seq: u64, batch: Batch, place: impl FnOnce(Bytes) -> Place) -> Self {
        Self {
            seq,
            table: batch.table,
            batch_id: batch.batch_id,
            rows: batch.rows,
            place: place(batch.body),
        }
    }

    fn batch(&self, body: Bytes) -> Batch {
        Batch {
            table: self.table.clone(),
            batch_id: self.batch_id.clone(),
            rows: self.rows,
            body,
        }
    }
}

/// A file that cannot be delivered: why, and its table and rows when they
/// can be trusted.
struct Unusable {
    problem: String,
    header: Option<(String, u32)>,
}

pub struct Queue {
    dir: PathBuf,
    limits: SpoolLimits,
    entries: VecDeque<Entry>,
    next_seq: u64,
    /// Pushes are being refused for want of room: the warning is logged
    /// once when that starts, not once per batch.
    refusing: bool,
    pub counts: SpoolCounts,
}

impl Queue {
    /// The queue of what `dir` holds, oldest first. Unfinished and damaged
    /// files are set aside (a warning names each) and the others kept.
    ///
    /// # Errors
    /// The directory cannot be read.
    pub fn load(dir: &Path, limits: SpoolLimits) -> std::io::Result<Self> {
        let mut q = Self {
            dir: dir.to_path_buf(),
            limits,
            entries: VecDeque::new(),
            next_seq: 0,
            refusing: false,
            counts: SpoolCounts::default(),
        };
        let mut found = Vec::new();
        let mut last_seq = None;
        for (name, listed) in dir::list(dir)? {
            match listed {
                Listed::Batch(seq) => {
                    last_seq = last_seq.max(Some(seq));
                    found.push((seq, name));
                }
                Listed::Unfinished(seq) => {
                    last_seq = last_seq.max(Some(seq));
                    let header = match read_batch(&dir.join(&name)) {
                        Ok((b, _)) => Some((b.table, b.rows)),
                        Err(u) => u.header,
                    };
                    q.set_aside(
                        &name,
                        "its writing never finished (the agent stopped mid-write)",
                        header,
                    );
                }
                Listed::Other if name == dir::SET_ASIDE || name == dir::LOCK => {}
                Listed::Other => {
                    warn!(file = %dir.join(&name).display(), "unknown file in the spool directory: left alone");
                }
            }
        }
        found.sort_unstable();
        for (seq, name) in found {
            match read_batch(&dir.join(&name)) {
                Ok((batch, len)) => q.add(Entry::new(seq, batch, |_| Place::Disk { len })),
                Err(u) => q.set_aside(&name, &u.problem, u.header),
            }
        }
        q.next_seq = last_seq.map_or(0, |s| s.saturating_add(1));
        if !q.entries.is_empty() {
            info!(
                dir = %dir.display(),
                batches = q.counts.disk_files,
                bytes = q.counts.disk_bytes,
                "spooled batches found: they are delivered first, oldest first"
            );
        }
        Ok(q)
    }

    /// Keeps `batch` in memory while its rows fit under the memory bound,
    /// else writes it to disk while its file fits under the disk bound,
    /// else drops it.
    ///
    /// Past both bounds the NEW batch is refused, never an older one
    /// dropped to make room: what is kept stays one unbroken run from the
    /// oldest batch on, so the loss is one gap (from when the bounds were
    /// reached, which the warning marks, until deliveries make room) rather
    /// than holes spread through the history; an outage already that long
    /// costs no more disk writes and deletions; and a batch once accepted
    /// is never given up for a newer one. The OTLP exporter's queue drops the same way.
    pub fn push(&mut self, batch: Batch) -> Pushed {
        if let Err(problem) = batch.check() {
            let table = counted_table(&batch.table);
            warn!(table, rows = batch.rows, batch_id = ?batch.batch_id, "batch refused by the spool: {problem}");
            self.counts
                .drop_rows(table, batch.rows, DropReason::Invalid);
            return Pushed::Dropped(DropReason::Invalid);
        }
        let rows = u64::from(batch.rows);
        if self.counts.memory_rows.saturating_add(rows) <= self.limits.memory_rows {
            self.room();
            let seq = self.take_seq();
            self.add(Entry::new(seq, batch, Place::Memory));
            return Pushed::Queued;
        }
        let len = format::encoded_len(&batch);
        if self.counts.disk_bytes.saturating_add(len) > self.limits.disk_bytes {
            self.counts
                .drop_rows(&batch.table, batch.rows, DropReason::Full);
            if !self.refusing {
                self.refusing = true;
                warn!(
                    dir = %self.dir.display(),
                    memory_rows = self.limits.memory_rows,
                    disk_bytes = self.limits.disk_bytes,
                    table = %batch.table,
                    rows = batch.rows,
                    "spool full (memory and disk at their bounds): new batches are dropped and counted until deliveries make room"
                );
            }
            return Pushed::Dropped(DropReason::Full);
        }
        let seq = self.take_seq();
        match dir::write(&self.dir, seq, &format::encode_header(&batch), &batch.body) {
            Ok(()) => {
                self.room();
                self.add(Entry::new(seq, batch, |_| Place::Disk { len }));
                Pushed::Spooled
            }
            Err(e) => {
                warn!(
                    file = %self.dir.join(dir::file_name(seq)).display(),
                    table = %batch.table,
                    rows = batch.rows,
                    "cannot spool a batch to disk, dropped: {e}"
                );
                self.counts
                    .drop_rows(&batch.table, batch.rows, DropReason::DiskError);
                Pushed::Dropped(DropReason::DiskError)
            }
        }
    }

    /// The oldest batch, left in place. One on disk is read and checked
    /// again; if it has become unreadable or damaged it is set aside (a
    /// warning names it, its rows are counted) and the next one is tried.
    pub fn oldest(&mut self) -> Option<Batch> {
        loop {
            let front = self.entries.front()?;
            if let Place::Memory(body) = &front.place {
                return Some(front.batch(body.clone()));
            }
            let name = dir::file_name(front.seq);
            let problem = match read_batch(&self.dir.join(&name)) {
                Ok((b, _))
                    if b.table == front.table
                        && b.batch_id == front.batch_id
                        && b.rows == front.rows =>
                {
                    return Some(b)
                }
                Ok(_) => "it no longer holds the batch it held at start (replaced)".to_string(),
                Err(u) => u.problem,
            };
            let entry = self.entries.pop_front()?;
            self.sub(&entry);
            self.set_aside(&name, &problem, Some((entry.table, entry.rows)));
        }
    }

    /// Removes the batch `batch_id` (delivered) and its file; false when
    /// no batch has that id. With two of the same id, the older goes.
    pub fn ack(&mut self, batch_id: &str) -> bool {
        let Some(entry) = self
            .entries
            .iter()
            .position(|e| e.batch_id == batch_id)
            .and_then(|i| self.entries.remove(i))
        else {
            return false;
        };
        self.sub(&entry);
        self.counts.table(&entry.table).delivered_rows += u64::from(entry.rows);
        if let Place::Disk { .. } = entry.place {
            let path = self.dir.join(dir::file_name(entry.seq));
            if let Err(e) = dir::remove(&path) {
                warn!(file = %path.display(), "cannot remove a delivered batch's file (after a restart it is delivered again, and stored once by its batch id): {e}");
            }
        }
        true
    }

    /// Writes every batch waiting in memory to disk, in order, each while
    /// it fits under the disk bound; the others are dropped and counted.
    /// For a clean stop: what is in memory would be lost with the process.
    pub fn persist(&mut self) -> Persisted {
        let mut done = Persisted::default();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for mut entry in std::mem::take(&mut self.entries) {
            let Place::Memory(body) = &entry.place else {
                kept.push_back(entry);
                continue;
            };
            let batch = entry.batch(body.clone());
            self.sub(&entry);
            let len = format::encoded_len(&batch);
            let reason = if self.counts.disk_bytes.saturating_add(len) > self.limits.disk_bytes {
                DropReason::Full
            } else {
                match dir::write(
                    &self.dir,
                    entry.seq,
                    &format::encode_header(&batch),
                    &batch.body,
                ) {
                    Ok(()) => {
                        entry.place = Place::Disk { len };
                        self.add_counts(&entry);
                        kept.push_back(entry);
                        done.written += 1;
                        continue;
                    }
                    Err(e) => {
                        warn!(file = %self.dir.join(dir::file_name(entry.seq)).display(), table = %entry.table, rows = entry.rows, "cannot spool a batch to disk, dropped: {e}");
                        DropReason::DiskError
                    }
                }
            };
            self.counts.drop_rows(&entry.table, entry.rows, reason);
            done.dropped += 1;
        }
        self.entries = kept;
        if done.dropped > 0 {
            warn!(dir = %self.dir.display(), written = done.written, dropped = done.dropped, "batches in memory not all written to disk: the rest are dropped and counted");
        }
        done
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    /// Pushes are accepted again after a refusal.
    fn room(&mut self) {
        if self.refusing {
            self.refusing = false;
            info!(dir = %self.dir.display(), "spool has room again: new batches are kept");
        }
    }

    fn add(&mut self, entry: Entry) {
        self.add_counts(&entry);
        self.entries.push_back(entry);
    }

    fn add_counts(&mut self, e: &Entry) {
        let rows = u64::from(e.rows);
        let c = &mut self.counts;
        match e.place {
            Place::Memory(_) => {
                c.memory_batches += 1;
                c.memory_rows += rows;
                c.table(&e.table).queued_rows += rows;
            }
            Place::Disk { len } => {
                c.disk_files += 1;
                c.disk_bytes += len;
                c.table(&e.table).spooled_rows += rows;
            }
        }
    }

    fn sub(&mut self, e: &Entry) {
        let rows = u64::from(e.rows);
        let c = &mut self.counts;
        match e.place {
            Place::Memory(_) => {
                c.memory_batches -= 1;
                c.memory_rows -= rows;
                c.table(&e.table).queued_rows -= rows;
            }
            Place::Disk { len } => {
                c.disk_files -= 1;
                c.disk_bytes -= len;
                c.table(&e.table).spooled_rows -= rows;
            }
        }
    }

    /// Moves the damaged file `name` aside, says so, and counts it (its
    /// rows too when its table and rows are known).
    fn set_aside(&mut self, name: &str, problem: &str, header: Option<(String, u32)>) {
        self.counts.set_aside_files += 1;
        let file = self.dir.join(name);
        let (table, rows) = header.as_ref().map(|(t, r)| (counted_table(t), *r)).unzip();
        if let (Some(table), Some(rows)) = (table, rows) {
            self.counts.drop_rows(table, rows, DropReason::Corrupt);
        }
        match dir::set_aside(&self.dir, name) {
            Ok(to) => warn!(
                file = %file.display(),
                moved_to = %to.display(),
                table,
                rows,
                "damaged spool file set aside: {problem}; the other batches are delivered"
            ),
            Err(e) => warn!(
                file = %file.display(),
                table,
                rows,
                "damaged spool file (and it cannot be set aside: {e}): {problem}; the other batches are delivered"
            ),
        }
    }
}

/// The table a drop is counted under: its own name when acceptable (it
/// becomes a metric label), else [`INVALID_TABLE`].
fn counted_table(table: &str) -> &str {
    if check_table(table).is_ok() {
        table
    } else {
        INVALID_TABLE
    }
}

/// Reads, decodes and checks a batch file; returns the batch and the
/// file's length.
fn read_batch(path: &Path) -> Result<(Batch, u64), Unusable> {
    let bytes = dir::read(path).map_err(|e| Unusable {
        problem: format!("cannot be read: {e}"),
        header: None,
    })?;
    let len = bytes.len() as u64;
    let batch = format::decode(Bytes::from(bytes)).map_err(|d| Unusable {
        problem: d.problem.to_string(),
        header: d.header.map(|h| (h.table, h.rows)),
    })?;
    batch.check().map_err(|problem| Unusable {
        problem,
        header: None,
    })?;
    Ok((batch, len))
}
