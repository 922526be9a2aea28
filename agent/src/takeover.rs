//! Taking over from a previous agent: the events its pinned programs left
//! in their ring buffer (named with the policy names it saved), and what
//! they lost while no agent read them.

use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tracing::{info, warn};

use crate::{
    events::{Decoder, Hub, Names},
    kernel::pins,
};

/// The previous programs keep writing into their ring buffer until they
/// are detached, so a flood (an audit-mode service, allowed connections:
/// neither is rate-limited) could keep a drain going for ever and hold the
/// new agent back from READY. The drain stops after this long or this many
/// records (about five default ring buffers), whichever comes first; what
/// is left is read once they are detached (or, past `REST_TIME`, counted
/// as lost: `source="takeover_drain"`).
pub const DRAIN_TIME: Duration = Duration::from_millis(500);
pub const DRAIN_RECORDS: usize = 150_000;
/// After the detach the ring no longer grows: its rest (at most one ring
/// buffer, about 29,000 records by default) is read within this.
const REST_TIME: Duration = Duration::from_secs(5);
/// Decoded events are handed on in batches of this many, so the drain
/// holds no more than one batch in memory.
const BATCH: usize = 4096;

/// What a take-over found in the previous ring buffer.
#[derive(Debug, Default, PartialEq, Eq)]
struct Drained {
    /// Decoded and published.
    recovered: u64,
    /// Undecodable (counted like the reader's decode errors).
    undecodable: u64,
    /// Left in the ring when the drain stopped at its bound.
    left: u64,
    /// Whether the drain stopped at its bound rather than at an empty ring.
    bounded: bool,
}

/// Takes over from a previous agent's pinned programs: reads the events
/// they left in their ring buffer (bounded: `DRAIN_TIME`, `DRAIN_RECORDS`),
/// detaches them (ours are already attached: no gap), then reads the rest,
/// which no longer grows, and counts what they dropped.
/// `names`: the previous agent's ([`previous_names`], read before this
/// agent saves its own). `copy_lookups` copies the DNS proxy's lookups in
/// flight from its pin directory, called just before the detach and after.
pub fn take_over(previous: pins::Previous, names: Names, hub: &Hub, copy_lookups: impl Fn(&Path)) {
    let mut drained = Drained::default();
    let mut ring = previous.ring();
    let decoder = Decoder::new(Arc::new(names));
    if let Some(ring) = ring.as_mut() {
        drained = drain(ring, &decoder, hub, Instant::now() + DRAIN_TIME);
    }
    // The DNS proxy's lookups in flight, just before its programs go:
    // while they run, they redirect every lookup and ours none (ours let a
    // call already sent to the proxy through, names::is_proxy), so a
    // socket redirected since `prepare_dns` copied them is in its maps
    // alone, and if it sent only after the detach, our packet program
    // found no origin for it and the proxy refused its query.
    copy_lookups(previous.dir());
    // Its connect redirects go first, and their last lookups are copied
    // while its packet programs still run. A socket its connect4 sent to
    // the proxy after that copy has its origin in its maps alone: had
    // every program gone at once, that socket's first query after the
    // detach met only our packet programs, which found no origin for it,
    // so no client entry was ever written for it and the proxy refused it
    // (the 20-restart test, once in CI on 2026-12-07). Once they are gone
    // no socket is redirected at connect() by them any more, and this copy
    // has every such origin: our packet programs find it from here on.
    // (Its sendmsg redirects a datagram as it sends it, through its own
    // packet programs, and stays: see `pins::REDIRECTS`.)
    previous.detach_redirects();
    crate::kernel::quiesce();
    copy_lookups(previous.dir());
    previous.detach();
    // A program that was running when its link went away may still commit
    // a record or count a loss: wait for every such run to end first.
    crate::kernel::quiesce();
    // Its other maps are final too: the lookups of the last moments.
    copy_lookups(previous.dir());
    if let Some(ring) = ring.as_mut() {
        // Nothing writes into it any more, so the rest is read too: a
        // take-over under load loses nothing (found by `cargo xtask soak`:
        // tens of events per restart were counted lost). Bounded all the
        // same, in case a detach failed and the programs still write.
        let rest = drain(ring, &decoder, hub, Instant::now() + REST_TIME);
        drained.recovered += rest.recovered;
        drained.undecodable += rest.undecodable;
        drained.bounded = rest.bounded;
        if rest.bounded {
            drained.left = count_left(ring, Instant::now() + DRAIN_TIME);
        }
    }
    // Its flows' calls no record reported, final now that nothing counts.
    let flow_summaries = previous.flows().map_or(0, |table| {
        crate::flows::drain_previous(&table, &decoder, hub)
    });
    hub.stats
        .decode_errors
        .fetch_add(drained.undecodable, Ordering::Relaxed);
    hub.stats
        .lost_takeover_drain
        .fetch_add(drained.left, Ordering::Relaxed);
    // Read after the detach, so it includes what they dropped while the
    // drain ran.
    let lost = previous.lost();
    hub.stats.lost_while_down.fetch_add(lost, Ordering::Relaxed);
    previous.remove();
    if drained.bounded {
        warn!(
            recovered = drained.recovered,
            left = drained.left,
            flow_summaries,
            lost,
            "took over from the previous agent's pinned programs; reading the rest of their ring \
             buffer after the detach stopped at its bound ({} ms or {DRAIN_RECORDS} records: a \
             ring buffer larger than that, or a detach that failed) and what was left is counted \
             as lost (bulkhead_events_lost_total{{source=\"takeover_drain\"}})",
            REST_TIME.as_millis()
        );
    } else {
        info!(
            recovered = drained.recovered,
            flow_summaries, lost, "took over from the previous agent's pinned programs"
        );
    }
}

/// Reads and publishes records until the ring is empty, `deadline` passes
/// or `DRAIN_RECORDS` were read.
fn drain(ring: &mut RingBuf<MapData>, decoder: &Decoder, hub: &Hub, deadline: Instant) -> Drained {
    let mut out = Drained::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut read = 0usize;
    loop {
        if read >= DRAIN_RECORDS || Instant::now() >= deadline {
            out.bounded = true;
            break;
        }
        let Some(item) = ring.next() else { break };
        read += 1;
        match decoder.decode(&item) {
            Some(ev) => batch.push(ev),
            None => out.undecodable += 1,
        }
        if batch.len() == BATCH {
            out.recovered += BATCH as u64;
            hub.publish(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)));
        }
    }
    out.recovered += batch.len() as u64;
    hub.publish(batch);
    out
}

/// Counts, without decoding, the records left in a ring nobody writes
/// into any more. Bounded by `deadline` too, in case a detach failed (it
/// says so in the log) and the programs still write.
fn count_left(ring: &mut RingBuf<MapData>, deadline: Instant) -> u64 {
    let mut left = 0u64;
    while ring.next().is_some() {
        left += 1;
        if left.is_multiple_of(4096) && Instant::now() >= deadline {
            warn!(left, "the previous ring buffer is still being written after the detach; counting stopped");
            break;
        }
    }
    left
}

const NAMES_FILE: &str = "names.json";

/// Names of the policy in force, for a later agent to read this agent's
/// leftover events with.
pub fn save_names(state_dir: &Path, names: &Names) {
    let write = || -> std::io::Result<()> {
        let bytes = serde_json::to_vec(names).map_err(std::io::Error::other)?;
        crate::state_file::write_atomic(state_dir, NAMES_FILE, &bytes, 0o644)
    };
    if let Err(e) = write() {
        warn!(dir = %state_dir.display(), "cannot save the policy names: {e}");
    }
}

/// The names the previous agent saved, to read its leftover events with.
/// Call before [`save_names`] writes this agent's over them.
pub fn previous_names(state_dir: &Path) -> Names {
    load_names(state_dir).unwrap_or_default()
}

fn load_names(state_dir: &Path) -> Option<Names> {
    crate::state_file::load(
        state_dir,
        NAMES_FILE,
        |bytes| serde_json::from_slice(bytes).map_err(|e| format!("not valid policy names: {e}")),
        "the previous agent's leftover events are named with this agent's policy",
    )
}
