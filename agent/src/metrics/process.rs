//! The daemon's own resource use, read from `/proc/self` at scrape time:
//! the standard `process_*` metrics every Prometheus client library exports
//! (same names, same meaning), so existing dashboards work unchanged.

use std::{fs, io};

/// What `process_*` reports. Values the host does not give are `None` and
/// left out of the scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Unix time the process started.
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    /// Soft limit on open files; `None` when unlimited.
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads this process's numbers.
    ///
    /// # Errors
    /// `/proc/self/stat` cannot be read or parsed.
    pub fn read() -> io::Result<Self> {
        let text = fs::read_to_string("/proc/self/stat")?;
        let stat = parse_stat(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/self/stat")
        })?;
        let ticks = sysconf(libc::_SC_CLK_TCK).unwrap_or(100);
        let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
        let boot = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_boot_time(&t));
        // u64 -> f64: CPU ticks and epoch seconds stay far below 2^52.
        let (ticks, boot) = (ticks as f64, boot.map(|b| b as f64));
        Ok(Self {
            cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
            resident_bytes: stat.rss_pages.saturating_mul(page),
            virtual_bytes: stat.vsize,
            start_time_seconds: boot.map(|b| b + stat.start_ticks as f64 / ticks),
            open_fds: open_fds(),
            max_fds: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|t| parse_max_fds(&t)),
        })
    }
}

/// The fields of `/proc/PID/stat` we use (proc(5) numbering in comments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
    vsize: u64,
    rss_pages: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // Field 2 (comm) may hold spaces and ')': the rest starts after the
    // last ')', at field 3.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n.checked_sub(3)?)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
        rss_pages: field(24)?,
    })
}

/// `btime` of `/proc/stat`: boot time, in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` in `/proc/PID/limits`.
fn parse_max_fds(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.strip_prefix("Max open files")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn open_fds() -> Option<u64> {
    let entries = fs::read_dir("/proc/self/fd").ok()?;
    // Listing the directory holds one descriptor open: not ours to count.
    u64::try_from(entries.count())
        .ok()
        .map(|n| n.saturating_sub(1))
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf reads a constant; it has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(name) };
    u64::try_from(v).ok().filter(|&v| v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_comm_with_spaces_and_parens() {
        // A real line from /proc/self/stat, comm changed to "a) (b c".
        let line = "4242 (a) (b c) S 1 4242 4242 0 -1 4194560 1215 0 0 0 \
                    17 9 0 0 20 0 3 0 123456 22437888 1500 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17926 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 17,
                stime: 9,
                start_ticks: 123_456,
                vsize: 22_437_888,
                rss_pages: 1500,
            })
        );
    }

    #[test]
    fn truncated_stat_is_refused() {
        assert_eq!(parse_stat("4242 (x) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
    }

    #[test]
    fn boot_time_from_proc_stat() {
        let text = "cpu  1 2 3 4\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(parse_boot_time(text), Some(1_700_000_000));
        assert_eq!(parse_boot_time("cpu 1 2 3\n"), None);
    }

    #[test]
    fn max_open_files_soft_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_fds(unlimited), None);
    }

    #[test]
    fn reads_this_process() {
        let stats = ProcessStats::read().expect("/proc/self is readable");
        assert!(stats.resident_bytes > 0, "{stats:?}");
        assert!(stats.virtual_bytes >= stats.resident_bytes, "{stats:?}");
        assert!(stats.open_fds.is_some_and(|n| n >= 3), "{stats:?}");
        assert!(
            stats.start_time_seconds.is_some_and(|t| t > 1e9),
            "{stats:?}"
        );
    }
}
