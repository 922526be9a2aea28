//! Host settings a test widens for its own duration and restores.

use std::fs;

/// Who may create ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`/`ICMPV6`).
const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

/// `net.ipv4.ping_group_range` set to `0 2147483647` (every group may
/// create ping sockets, as systemd sets it on most distributions) while the
/// guard lives; `Drop` writes the old value back and never panics. Here the
/// kernel default `1 0` refuses ping sockets to everyone, root included
/// (`EACCES`), so a ping test without this guard would test nothing.
#[derive(Debug)]
pub struct PingGroupRange {
    old: String,
}

impl PingGroupRange {
    /// Widens the range; panics if it cannot.
    #[must_use]
    pub fn widen() -> Self {
        let old = fs::read_to_string(PING_GROUP_RANGE)
            .unwrap_or_else(|e| panic!("cannot read {PING_GROUP_RANGE}: {e}"));
        fs::write(PING_GROUP_RANGE, "0 2147483647\n")
            .unwrap_or_else(|e| panic!("cannot write {PING_GROUP_RANGE}: {e}"));
        Self { old }
    }
}

impl Drop for PingGroupRange {
    fn drop(&mut self) {
        // The file reads back tab-separated; it takes any whitespace.
        if let Err(e) = fs::write(PING_GROUP_RANGE, self.old.replace('\t', " ")) {
            eprintln!(
                "CLEANUP FAILED: {PING_GROUP_RANGE} is left at 0 2147483647 (was {:?}): {e}",
                self.old.trim()
            );
        }
    }
}
