//! The ring buffer consumer: a tokio task on the ring's fd (AsyncFd), never
//! busy-polling. The kernel does not wake it per record (that would cost
//! every connect() a context switch): it drains on a timer that shortens
//! while records flow and lengthens while idle, and the kernel wakes it
//! early once the ring is a quarter full (`agent_common::WAKE_FRACTION`).
//! Drains go in bounded batches so one busy producer cannot starve the rest
//! of the runtime.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};
use tracing::error;

use super::{
    decode::{Decoder, Names},
    hub::Hub,
};

/// Records handled per batch before yielding to other tasks.
const BATCH: usize = 2048;
/// Drain period while records flow: how late an event may reach the log.
pub const DRAIN_MIN: Duration = Duration::from_millis(5);
/// Drain period after a quiet spell (the period doubles per empty drain).
pub const DRAIN_MAX: Duration = Duration::from_millis(80);

/// `names` delivers the names of each newly applied policy.
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    decoder: Decoder,
    names: watch::Receiver<Arc<Names>>,
    hub: Arc<Hub>,
) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the RingBuf owns its fd for its whole life, and the AsyncFd
    // owns the RingBuf.
    let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }?;
    hub.stats.consumer_alive.store(true, Ordering::Relaxed);
    Ok(tokio::spawn(async move {
        if let Err(e) = consume(fd, decoder, names, &hub).await {
            error!("event consumer stopped: {e}");
        }
        hub.stats.consumer_alive.store(false, Ordering::Relaxed);
    }))
}

async fn consume(
    mut fd: AsyncFd<RingBuf<MapData>>,
    mut decoder: Decoder,
    mut names: watch::Receiver<Arc<Names>>,
    hub: &Hub,
) -> std::io::Result<()> {
    let mut period = DRAIN_MIN;
    loop {
        // Woken by the kernel (ring filling up) or by the timer.
        let woken = match tokio::time::timeout(period, fd.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                // Edge-triggered: forget the readiness now, drain below.
                guard.clear_ready();
                true
            }
            Err(_elapsed) => false,
        };
        let mut total = 0;
        loop {
            let taken = drain_batch(fd.get_mut(), &mut decoder, &mut names, hub);
            total += taken;
            if taken < BATCH {
                break;
            }
            tokio::task::yield_now().await;
        }
        period = if total > 0 || woken {
            DRAIN_MIN
        } else {
            (period * 2).min(DRAIN_MAX)
        };
    }
}

/// Decodes and publishes up to [`BATCH`] records; returns how many it took.
fn drain_batch(
    ring: &mut RingBuf<MapData>,
    decoder: &mut Decoder,
    names: &mut watch::Receiver<Arc<Names>>,
    hub: &Hub,
) -> usize {
    let mut batch = Vec::with_capacity(BATCH);
    let mut taken = 0;
    while taken < BATCH {
        let Some(item) = ring.next() else {
            break;
        };
        taken += 1;
        // Per record (an atomic load): a reload may switch policies at any
        // moment, and the next record may carry the new ids.
        if names.has_changed().unwrap_or(false) {
            decoder.set_names(Arc::clone(&names.borrow_and_update()));
        }
        match decoder.decode(&item) {
            Some(ev) => batch.push(ev),
            None => {
                hub.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    hub.publish(batch);
    taken
}
