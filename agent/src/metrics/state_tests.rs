//! The metrics state against a fake kernel (`fake.rs`): counters read
//! across a policy switch, inventories, restarts.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use agent_common::{counter_slot, DIRECTION_EGRESS, PROTO_TCP, VERDICT_ALLOW, VERDICT_DENY};

use super::state::*;
use crate::metrics::fake::{meta, Fake};
use crate::policy::Mode;

fn slot(verdict: u8) -> usize {
    counter_slot(DIRECTION_EGRESS, PROTO_TCP, verdict) as usize
}

fn inventory(billing: u32, search: u32) -> Inventory {
    Inventory {
        services: vec![
            meta(billing, "billing", Mode::Enforce, 1, true),
            meta(search, "search", Mode::Enforce, 1, true),
        ],
        maps: Vec::new(),
        ..Inventory::default()
    }
}

/// Decisions the agent's own programs made before its metrics were set
/// up (during a take-over's drain: seconds under a flood) count too:
/// found by the take-over flood test, where the metric fell short of the
/// events received by exactly those.
#[test]
fn decisions_made_before_the_metrics_were_set_up_count() {
    let kernel: Arc<Mutex<BTreeMap<u32, VerdictCounts>>> = Arc::default();
    for (id, n) in [(0, 61_723), (1, 0)] {
        let mut counts = [0; SLOTS];
        counts[slot(VERDICT_DENY)] = n;
        kernel.lock().expect("not poisoned").insert(id, counts);
    }
    let fake = Fake {
        verdicts: Arc::clone(&kernel),
        lost: [0; 3],
    };
    let state = MetricsState::new(Sources::new(fake, Arc::default()), inventory(0, 1));
    let denied = |name: &str| {
        state
            .service_counts(name)
            .expect("known service")
            .expect("readable")[slot(VERDICT_DENY)]
    };
    assert_eq!((denied("billing"), denied("search")), (61_723, 0));
}

#[test]
fn counts_follow_each_service_across_reloads_and_reused_ids() {
    let kernel: Arc<Mutex<BTreeMap<u32, VerdictCounts>>> = Arc::default();
    let bump = |id: u32, verdict: u8, n: u64| {
        let mut k = kernel.lock().expect("not poisoned");
        k.entry(id).or_insert([0; SLOTS])[slot(verdict)] += n;
    };
    for id in [0, 1, 1024, 1025] {
        bump(id, VERDICT_ALLOW, 0);
    }
    let fake = Fake {
        verdicts: Arc::clone(&kernel),
        lost: [0; 3],
    };
    let state = MetricsState::new(Sources::new(fake, Arc::default()), inventory(0, 1));
    let allowed = |name: &str| {
        state
            .service_counts(name)
            .expect("known service")
            .expect("readable")[slot(VERDICT_ALLOW)]
    };
    bump(0, VERDICT_ALLOW, 5);
    bump(1, VERDICT_ALLOW, 2);
    assert_eq!((allowed("billing"), allowed("search")), (5, 2));

    // Reload into the other half.
    state.before_switch([1024, 1025]);
    // A decision that read the old entry just before the switch.
    bump(0, VERDICT_ALLOW, 1);
    state.replace_inventory(inventory(1024, 1025));
    bump(1024, VERDICT_ALLOW, 3);
    assert_eq!((allowed("billing"), allowed("search")), (9, 2));

    // Back into the first half, with the ids swapped: billing now
    // counts on search's old id, and the other way round.
    state.before_switch([1, 0]);
    bump(1, VERDICT_ALLOW, 7); // billing's, after the switch
    bump(0, VERDICT_DENY, 1); // search's
    state.replace_inventory(inventory(1, 0));
    assert_eq!((allowed("billing"), allowed("search")), (16, 2));
    let denied = state
        .service_counts("search")
        .expect("known")
        .expect("read");
    assert_eq!(denied[slot(VERDICT_DENY)], 1);

    // A rescan (same ids) changes nothing; a removed service is gone.
    state.replace_inventory(inventory(1, 0));
    assert_eq!((allowed("billing"), allowed("search")), (16, 2));
    state.replace_inventory(Inventory {
        services: vec![meta(1, "billing", Mode::Enforce, 1, true)],
        maps: Vec::new(),
        ..Inventory::default()
    });
    assert_eq!(allowed("billing"), 16);
}
