//! The decision log writer: a thread of its own, so that writing (with
//! encoding, the larger part of what an event costs the agent) runs beside
//! the ring buffer reader instead of after it. Publishers encode their
//! batch themselves (the work is split about evenly between the two
//! threads that way) and queue the bytes.
//!
//! Batches queue in a bounded channel. When the writer falls
//! [`QUEUE`] batches behind, publishing blocks: the reader then stops
//! draining, and the kernel counts what its full ring buffer cannot take.
//! Nothing queues without bound and nothing is dropped uncounted.

use std::{
    io,
    sync::{atomic::Ordering, mpsc, Arc},
    thread::JoinHandle,
};

use tracing::warn;

use super::{
    model::FlowEvent,
    sink::{encode_line, Sink},
    stats::EventStats,
};

/// Batches waiting for the writer before publishers wait for it.
const QUEUE: usize = 16;
/// Encoded bytes written out even while more batches wait.
const FLUSH_AT: usize = 1 << 20;
/// About one line's length, to size a batch's buffer.
const LINE_GUESS: usize = 512;

enum Job {
    /// JSON lines of this many events.
    Write(Vec<u8>, u64),
    Reopen(mpsc::SyncSender<io::Result<()>>),
    /// Answers once everything queued before it is written.
    Sync(mpsc::SyncSender<()>),
}

pub struct LogWriter {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<EventStats>,
}

impl LogWriter {
    /// Starts the thread that owns `sink`; failures are counted in
    /// `stats.sink_errors`.
    pub fn spawn(sink: Sink, stats: Arc<EventStats>) -> io::Result<Self> {
        let (jobs, queue) = mpsc::sync_channel(QUEUE);
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("decision-log".to_string())
            .spawn(move || run(sink, &queue, &thread_stats))?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
            stats,
        })
    }

    /// Encodes a batch here and queues its lines (waits while [`QUEUE`]
    /// batches are ahead of it). An event that cannot be encoded is counted
    /// in `stats.sink_errors`.
    pub fn write(&self, batch: &[Arc<FlowEvent>]) {
        let mut lines = Vec::with_capacity(batch.len() * LINE_GUESS);
        let mut events = 0;
        for ev in batch {
            match encode_line(ev, &mut lines) {
                Ok(()) => events += 1,
                Err(e) => failed(&self.stats, &e, 1),
            }
        }
        if events > 0 {
            self.stats.log_queued.fetch_add(1, Ordering::Relaxed);
            self.send(Job::Write(lines, events));
        }
    }

    /// Writes what is queued, then re-opens the file at its path.
    pub fn reopen(&self) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Job::Reopen(tx));
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("the decision log writer stopped")))
    }

    /// Returns once everything queued so far is written.
    pub fn sync(&self) {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Job::Sync(tx));
        let _ = rx.recv();
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // Fails only once the thread is gone (it never exits before
            // the channel closes), so there is nothing left to do.
            let _ = jobs.send(job);
        }
    }
}

impl Drop for LogWriter {
    /// Writes what is queued and stops the thread.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(mut sink: Sink, queue: &mpsc::Receiver<Job>, stats: &EventStats) {
    while let Ok(first) = queue.recv() {
        // Encode everything already waiting, then write it at once.
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(lines, events) => {
                    stats.log_queued.fetch_sub(1, Ordering::Relaxed);
                    sink.append_encoded(lines, events);
                }
                Job::Reopen(reply) => {
                    flush(&mut sink, stats);
                    let _ = reply.send(sink.reopen());
                }
                Job::Sync(reply) => {
                    flush(&mut sink, stats);
                    let _ = reply.send(());
                }
            }
            if sink.buffered_bytes() >= FLUSH_AT {
                flush(&mut sink, stats);
            }
            next = queue.try_recv().ok();
        }
        flush(&mut sink, stats);
    }
}

fn flush(sink: &mut Sink, stats: &EventStats) {
    let pending = sink.pending();
    let bytes = sink.buffered_bytes() as u64;
    match sink.flush() {
        Ok(()) => {
            stats.log_written_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        Err(e) => failed(stats, &e, pending),
    }
}

/// `events` could not be written: counted, and logged now and then.
fn failed(stats: &EventStats, e: &io::Error, events: u64) {
    let n = stats.sink_errors.fetch_add(events, Ordering::Relaxed);
    // Log the first failure and then at every power of two.
    if n == 0 || (n + events).ilog2() > n.ilog2() {
        warn!(
            "cannot write the decision log ({} events lost so far): {e}",
            n + events
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;

    fn event() -> Arc<FlowEvent> {
        Arc::new(FlowEvent::from_agent(EventType::PolicyChange, "policy"))
    }

    #[test]
    fn reopen_writes_what_came_before_to_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let rotated = dir.path().join("events.jsonl.1");
        let stats = Arc::new(EventStats::default());
        let writer = LogWriter::spawn(
            Sink::open(path.to_str().expect("utf-8")).expect("opens"),
            Arc::clone(&stats),
        )
        .expect("the writer thread starts");
        writer.write(&[event(), event(), event()]);
        std::fs::rename(&path, &rotated).expect("rename");
        writer.reopen().expect("re-opens");
        writer.write(&[event(), event()]);
        drop(writer); // writes what is queued and joins the thread
        let lines = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .expect("read")
                .lines()
                // Only whole events count: a torn line fails the test.
                .filter(|l| serde_json::from_str::<FlowEvent>(l).is_ok())
                .count()
        };
        assert_eq!((lines(&rotated), lines(&path)), (3, 2));
        assert_eq!(stats.sink_errors.load(Ordering::Relaxed), 0);
        let on_disk = std::fs::metadata(&rotated).expect("stat").len()
            + std::fs::metadata(&path).expect("stat").len();
        assert_eq!(stats.log_written_bytes.load(Ordering::Relaxed), on_disk);
        assert_eq!(stats.log_queued.load(Ordering::Relaxed), 0);
    }
}
