//! What the soak records every minute and the report it ends with.

use std::fmt::Write as _;

use super::worker::Tally;

/// One sample of the agent and the kernel maps.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub minute: f64,
    /// Which start of the agent this is (1 = the first).
    pub run: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// `bulkhead_bpf_map_entries` of these maps.
    pub services_entries: u64,
    pub egress_v4_entries: u64,
    pub rulesets_entries: u64,
    /// `bulkhead_events_lost_total` of this agent, by source, where not 0.
    pub lost: String,
    pub log_bytes: u64,
    pub judged: u64,
    pub wrong: u64,
    pub errors: u64,
}

/// Reads one gauge or counter series from a metrics page (the sum when
/// several series match `name` and `label`).
pub fn metric(page: &str, name: &str, label: Option<&str>) -> u64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let bare = series.split('{').next()?;
            (bare == name && label.is_none_or(|lab| series.contains(lab)))
                .then(|| value.parse::<f64>().ok())?
        })
        .map(|v| v as u64)
        .sum()
}

/// `source=N` for every source of `bulkhead_events_lost_total` above 0.
pub fn lost_by_source(page: &str) -> String {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("bulkhead_events_lost_total{source=\"")?;
            let (source, value) = rest.split_once("\"} ")?;
            let n = value.trim().parse::<f64>().ok()? as u64;
            (n > 0).then(|| format!("{source}={n}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Counts of what the soak did.
#[derive(Clone, Debug, Default)]
pub struct Activity {
    pub restarts_term: u32,
    pub restarts_kill: u32,
    pub reloads_good: u32,
    pub reloads_bad: u32,
    pub churn_cycles: u64,
    /// Ready times of every start, in ms.
    pub ready_ms: Vec<u128>,
}

pub struct Report<'a> {
    pub minutes: u64,
    pub command: String,
    pub samples: &'a [Sample],
    pub activity: &'a Activity,
    pub total: Tally,
    pub wrong_lines: &'a [String],
    pub failures: &'a [String],
}

fn range(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> (u64, u64) {
    let min = samples.iter().map(&f).min().unwrap_or(0);
    let max = samples.iter().map(&f).max().unwrap_or(0);
    (min, max)
}

impl Report<'_> {
    pub fn passed(&self) -> bool {
        self.total.wrong == 0 && self.wrong_lines.is_empty() && self.failures.is_empty()
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let a = self.activity;
        let _ = writeln!(s, "`{}`: {} minutes.\n", self.command, self.minutes);
        let _ = writeln!(
            s,
            "- Judged calls checked against the policy in force: {} ({} wrong verdicts, {} calls that failed without a verdict).",
            self.total.right + self.total.wrong,
            self.total.wrong,
            self.total.errors
        );
        let _ = writeln!(
            s,
            "- Agent restarts: {} (SIGTERM {}, SIGKILL {}); ready after {} ms at the median start.",
            a.restarts_term + a.restarts_kill,
            a.restarts_term,
            a.restarts_kill,
            median(&a.ready_ms)
        );
        let _ = writeln!(
            s,
            "- Reloads: {} good (each flips a port's verdict, checked right after), {} bad (refused, the policy in force kept, checked).",
            a.reloads_good, a.reloads_bad
        );
        let _ = writeln!(
            s,
            "- Cgroup churn: {} cycles (a cgroup made, probed, removed).",
            a.churn_cycles
        );
        for (label, f) in [
            ("RSS (KiB)", (|x: &Sample| x.rss_kib) as fn(&Sample) -> u64),
            ("open fds", |x| x.fds),
            ("threads", |x| x.threads),
            ("SERVICES entries", |x| x.services_entries),
            ("egress IPv4 entries", |x| x.egress_v4_entries),
        ] {
            let (lo, hi) = range(self.samples, f);
            let _ = writeln!(s, "- {label}: {lo} to {hi} over the samples.");
        }
        for line in self.failures {
            let _ = writeln!(s, "- FAILURE: {line}");
        }
        for line in self.wrong_lines.iter().take(20) {
            let _ = writeln!(s, "- WRONG VERDICT: {line}");
        }
        s.push_str(
            "\n| minute | agent start | RSS KiB | fds | threads | SERVICES | egress IPv4 | RULESETS | events lost (by source) | decision log bytes | judged calls | wrong | no verdict |\n\
             | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |\n",
        );
        for x in self.samples {
            let _ = writeln!(
                s,
                "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                x.minute,
                x.run,
                x.rss_kib,
                x.fds,
                x.threads,
                x.services_entries,
                x.egress_v4_entries,
                x.rulesets_entries,
                if x.lost.is_empty() { "0" } else { &x.lost },
                x.log_bytes,
                x.judged,
                x.wrong,
                x.errors
            );
        }
        s
    }
}

fn median(v: &[u128]) -> u128 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_is_read_by_name_and_label() {
        let page = "# TYPE bulkhead_bpf_map_entries gauge\n\
                    bulkhead_bpf_map_entries{map=\"SERVICES\"} 3\n\
                    bulkhead_bpf_map_entries{map=\"EGRESS_V4\"} 4\n\
                    bulkhead_events_lost_total{source=\"ring\"} 2\n\
                    bulkhead_events_lost_total{source=\"log\"} 5\n";
        assert_eq!(
            metric(page, "bulkhead_bpf_map_entries", Some("map=\"SERVICES\"")),
            3
        );
        assert_eq!(metric(page, "bulkhead_events_lost_total", None), 7);
        assert_eq!(metric(page, "bulkhead_missing", None), 0);
        assert_eq!(lost_by_source(page), "ring=2, log=5");
    }
}
