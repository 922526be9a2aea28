//! RFC 3339 times as the events write them, and windows of observation.

use std::time::{Duration, SystemTime};

/// Whether `t` is at or after `since` (both RFC 3339). An unparsable `t`
/// counts as recent: never hide data because of a bad timestamp.
pub fn at_or_after(t: &str, since: &str) -> bool {
    match (
        humantime::parse_rfc3339_weak(t),
        humantime::parse_rfc3339_weak(since),
    ) {
        (Ok(t), Ok(s)) => t >= s,
        _ => true,
    }
}

/// Now minus `window`, as RFC 3339 (UTC).
pub fn ago(window: Duration) -> String {
    let at = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_nanos(at).to_string()
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_compare_event_times() {
        assert!(at_or_after(
            "2026-11-29T02:00:47.850881878Z",
            "2026-11-29T02:00:00Z"
        ));
        assert!(!at_or_after(
            "2026-11-29T01:59:59.999Z",
            "2026-11-29T02:00:00Z"
        ));
        assert!(at_or_after(&now(), &ago(Duration::from_secs(60))));
    }
}
