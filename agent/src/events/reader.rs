//! The ring buffer consumer: woken by epoll (AsyncFd), never busy-polling;
//! drains in bounded batches so one busy producer cannot starve the rest of
//! the runtime.

use std::sync::{atomic::Ordering, Arc};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch, task::JoinHandle};
use tracing::error;

use super::{
    decode::{Decoder, Names},
    hub::Hub,
};

/// Records handled per wakeup before yielding to other tasks.
const BATCH: usize = 2048;

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
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut batch = Vec::with_capacity(64);
        let mut taken = 0;
        while taken < BATCH {
            let Some(item) = ring.next() else {
                break;
            };
            taken += 1;
            // Per record (an atomic load): a reload may switch policies at
            // any moment, and the next record may carry the new ids.
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
        // Fewer than a full batch means the ring is empty: wait for epoll.
        let drained = taken < BATCH;
        if drained {
            guard.clear_ready();
        }
        drop(guard);
        hub.publish(batch);
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}
