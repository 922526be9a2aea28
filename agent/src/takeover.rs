//! Taking over from a previous agent: the events its pinned programs left
//! in their ring buffer (named with the policy names it saved), and what
//! they lost while no agent read them.

use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
};

use tracing::{info, warn};

use crate::{
    events::{Decoder, Hub, Names},
    kernel::pins,
};

/// Takes over from a previous agent's pinned programs: reads the events
/// they left in their ring buffer, counts what they lost while no agent was
/// reading, then detaches them (ours are already attached: no gap).
pub fn take_over(previous: pins::Previous, state_dir: &Path, hub: &Hub) {
    let lost = previous.lost();
    let mut recovered = 0usize;
    if let Some(mut ring) = previous.ring() {
        let names = load_names(state_dir).unwrap_or_default();
        let decoder = Decoder::new(Arc::new(names));
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            match decoder.decode(&item) {
                Some(ev) => batch.push(ev),
                // Counted like the reader's: never dropped silently.
                None => {
                    hub.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        recovered = batch.len();
        hub.publish(batch);
    }
    hub.stats.lost_while_down.fetch_add(lost, Ordering::Relaxed);
    previous.remove();
    info!(
        recovered,
        lost, "took over from the previous agent's pinned programs"
    );
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

fn load_names(state_dir: &Path) -> Option<Names> {
    let bytes = std::fs::read(state_dir.join(NAMES_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
