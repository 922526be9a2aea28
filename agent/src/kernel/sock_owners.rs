//! The kernel's table of connecting TCP sockets' owners (`SOCK_OWNERS`,
//! see agent-ebpf/src/owners.rs), from user space: how full it is, and the
//! entries no program will ever remove.
//!
//! The programs remove an entry at the socket's close (it was armed at
//! `tcp_connect()`) or at its release (a connect that failed before any
//! packet). The kernel never releases its own sockets through the release
//! hook, though: the TCP socket under an `AF_SMC` socket, an MPTCP subflow.
//! Such a socket whose connect failed before any packet leaves an entry
//! that stays unarmed for good, and a service could fill the table with
//! them (as with user sockets it holds open after such a failure; and on
//! 6.1 a removal at the close can fail, which unarms the entry). An entry
//! is unarmed otherwise only for the microseconds between connect4 and
//! `tcp_connect()`, or while a `TCP_FASTOPEN_CONNECT` socket waits for its
//! first write; so an entry seen unarmed by [`STALE_SWEEPS`] sweeps in a
//! row is removed (and counted). The stop's last sweep leaves the table
//! alone.

use std::collections::{HashMap as StdHashMap, HashSet};

use agent_common::{maps as names, SockInfo};
use aya::{
    maps::{HashMap, IterableMap, MapData},
    Ebpf,
};

use super::KernelError;

/// Sweeps in a row an entry must be seen unarmed to be removed: at least
/// two intervals between the first sight and the removal.
pub const STALE_SWEEPS: u32 = 3;

/// What one sweep found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries in the table.
    pub entries: u64,
    /// Entries removed as stale.
    pub removed: u64,
}

pub struct SockOwners {
    map: HashMap<MapData, u64, SockInfo>,
    capacity: u32,
    /// Unarmed entries by cookie: the sweeps in a row that saw them so.
    unarmed: StdHashMap<u64, u32>,
}

impl SockOwners {
    /// Takes the table out of the loaded object (it stays pinned).
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, KernelError> {
        let name = names::SOCK_OWNERS;
        let map = ebpf.take_map(name).ok_or(KernelError::MissingMap(name))?;
        let map: HashMap<MapData, u64, SockInfo> =
            HashMap::try_from(map).map_err(|source| KernelError::Map { name, source })?;
        let capacity = IterableMap::map(&map)
            .info()
            .map_or(agent_common::DEFAULT_SOCK_OWNERS, |info| info.max_entries());
        Ok(Self {
            map,
            capacity,
            unarmed: StdHashMap::new(),
        })
    }

    /// Counts the entries and removes those unarmed for [`STALE_SWEEPS`]
    /// sweeps in a row. An entry that goes or gets armed meanwhile is
    /// forgotten.
    pub fn sweep(&mut self) -> Swept {
        let mut swept = Swept::default();
        let mut unarmed = StdHashMap::with_capacity(self.unarmed.len());
        let mut stale = Vec::new();
        let mut walked = HashSet::new();
        // An entry that vanishes between the listing and its read ends
        // the iteration's item with an error: skipped. The walk goes from
        // key to key, and a key the kernel removed meanwhile starts it
        // over: each key counts once, and the walk is bounded. Nothing is
        // removed during the walk, for the same reason.
        let bound = self.capacity.saturating_mul(2) as usize;
        for (cookie, info) in self.map.iter().flatten().take(bound) {
            if !walked.insert(cookie) {
                continue;
            }
            swept.entries += 1;
            if info.armed != 0 {
                continue;
            }
            let seen = self.unarmed.get(&cookie).map_or(1, |n| n + 1);
            if seen >= STALE_SWEEPS {
                stale.push(cookie);
            } else {
                unarmed.insert(cookie, seen);
            }
        }
        for cookie in stale {
            // Read again: a socket that failed before its SYN may have
            // connected again since the walk (same cookie, a new entry).
            if self.map.get(&cookie, 0).is_ok_and(|info| info.armed != 0) {
                continue;
            }
            // Gone already is fine: that is what was asked.
            if self.map.remove(&cookie).is_ok() {
                swept.removed += 1;
                swept.entries -= 1;
            }
        }
        self.unarmed = unarmed;
        swept
    }
}
