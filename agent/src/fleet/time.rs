//! Times as the fleet's tables keep them: `DateTime` columns hold UTC
//! seconds since the epoch (sent as numbers, so the server's time zone
//! never shifts them), and each row's `date` (its partition) is the UTC
//! day of its time, `YYYY-MM-DD`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `t` in whole seconds since the epoch, as a `DateTime` column holds it
/// (0 before the epoch, `u32::MAX` past 2106).
#[must_use]
pub fn unix_seconds(t: SystemTime) -> u32 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
}

/// Now, in `DateTime` seconds.
#[must_use]
pub fn now() -> u32 {
    unix_seconds(SystemTime::now())
}

/// `secs` since the epoch as RFC 3339 in UTC, to the second (how the
/// fleet's commands and its graph print a row's time).
#[must_use]
pub fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The UTC day of `secs`, `YYYY-MM-DD` (a `Date` column's text).
#[must_use]
pub fn day(secs: u32) -> String {
    let mut text = rfc3339(u64::from(secs));
    text.truncate("YYYY-MM-DD".len());
    text
}

/// The day of a daily partition from its id (`YYYYMMDD`, what ClickHouse
/// names the partitions of `PARTITION BY date`), as `YYYY-MM-DD`; None for
/// any other id.
#[must_use]
pub fn partition_day(id: &str) -> Option<String> {
    if id.len() != 8 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}-{}-{}", &id[..4], &id[4..6], &id[6..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc() {
        assert_eq!(day(0), "1970-01-01");
        // 2026-12-03T23:59:59Z and one second later.
        assert_eq!(day(1_796_342_399), "2026-12-03");
        assert_eq!(day(1_796_342_400), "2026-12-04");
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(42)), 42);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }

    #[test]
    fn partition_ids_are_days() {
        assert_eq!(partition_day("20261203").as_deref(), Some("2026-12-03"));
        assert_eq!(partition_day("all"), None);
        assert_eq!(partition_day("2026120"), None);
    }
}
