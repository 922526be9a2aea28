//! The name of this host, carried by every event (`host`), so that logs
//! and exports from many hosts can be told apart without a collector
//! adding it. Fixed at start (`[fleet] host`, else the kernel's host name):
//! one name per agent run, the same the fleet rows carry.

use std::sync::OnceLock;

static HOST: OnceLock<Box<str>> = OnceLock::new();

/// Where the kernel keeps the host name.
pub const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

/// Sets the name events carry; only the first call counts (the daemon's,
/// before any event is made). Returns false if it was set already.
pub fn set(name: &str) -> bool {
    HOST.set(name.into()).is_ok()
}

/// The name events carry: the one `set` gave, else the kernel's host name
/// as it was when first asked (empty if it cannot be read).
#[must_use]
pub fn name() -> &'static str {
    HOST.get_or_init(kernel_hostname)
}

/// The kernel's host name, trimmed; empty if it cannot be read.
#[must_use]
pub fn kernel_hostname() -> Box<str> {
    std::fs::read_to_string(HOSTNAME_FILE)
        .map(|s| s.trim().into())
        .unwrap_or_default()
}
