//! The results as tables, a generated reading of them, and BENCHMARKS.md.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use super::{
    goals,
    loadgen::Probe,
    plan::{Case, Kind, Plan},
    runner::Results,
    stats::{self, Summary},
};
use crate::util::output_of;

/// "Nearly flat": the largest rule count adds at most this much more than
/// the smallest, or this share more, or no more than the no-program case
/// moves between runs (whichever is largest).
const FLAT_NS: i64 = 100;
const FLAT_SHARE: f64 = 0.25;

/// Facts about the machine and the run.
pub struct Facts {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub load_before: String,
    pub load_after: String,
    pub nft: String,
    pub iptables: String,
    pub commit: String,
    pub cgroup2: String,
}

impl Facts {
    pub fn collect(cgroup2: &Path) -> Self {
        let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let field = |text: &str, key: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let first_line = |cmd: &mut Command| {
            output_of(cmd)
                .and_then(|o| o.lines().next().map(str::to_owned))
                .unwrap_or_else(|| "not installed".to_owned())
        };
        let commit = output_of(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
            .map(|c| {
                let dirty = output_of(Command::new("git").args(["status", "--porcelain"]))
                    .is_some_and(|s| !s.trim().is_empty());
                format!(
                    "{}{}",
                    c.trim(),
                    if dirty {
                        " with uncommitted changes"
                    } else {
                        ""
                    }
                )
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            date: first_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu: field(&cpuinfo, "model name"),
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            memory: field(&meminfo, "MemTotal"),
            load_before: loadavg(),
            load_after: String::new(),
            nft: first_line(Command::new("nft").arg("--version")),
            iptables: first_line(Command::new("iptables-legacy").arg("--version")),
            commit,
            cgroup2: cgroup2.display().to_string(),
        }
    }

    pub fn finish(mut self) -> Self {
        self.load_after = loadavg();
        self
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub struct Report<'a> {
    pub plan: &'a Plan,
    pub facts: &'a Facts,
    pub results: &'a Results,
    /// The measuring part of the run (not the build).
    pub elapsed: Duration,
}

impl Report<'_> {
    pub(super) fn summary(&self, case: Case, probe: Probe) -> Option<&Summary> {
        self.results.summaries.get(&(case, probe))
    }

    /// The case's median minus the no-program median.
    pub(super) fn added(&self, case: Case, probe: Probe) -> Option<i64> {
        let base = self.summary(Case::BASELINE, probe)?;
        let s = self.summary(case, probe)?;
        Some(stats::added(s.median, base.median))
    }

    /// One table per probe, in markdown (which reads fine on a terminal).
    pub fn tables(&self) -> String {
        let mut out = String::new();
        for probe in Probe::ALL {
            let Some(base) = self.summary(Case::BASELINE, probe) else {
                continue;
            };
            let _ = writeln!(out, "### {}\n", probe.title());
            let _ = writeln!(
                out,
                "| case | rules | median (ns) | p99 (ns) | added median (ns) | ratio | median of each run (ns) |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
            for &case in &self.results.cases {
                let Some(s) = self.summary(case, probe) else {
                    continue;
                };
                let (added, ratio) = if case.kind == Kind::Baseline {
                    ("—".to_owned(), "1.00×".to_owned())
                } else {
                    (
                        signed(stats::added(s.median, base.median)),
                        format!("{:.2}×", stats::ratio(s.median, base.median)),
                    )
                };
                let rounds: Vec<String> = s.round_medians.iter().map(|&m| num(m)).collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {added} | {ratio} | {} |",
                    case.label(),
                    if case.rule_free() {
                        "—".to_owned()
                    } else {
                        num(case.rules as u64)
                    },
                    num(s.median),
                    num(s.p99),
                    rounds.join(" / ")
                );
            }
            out.push('\n');
        }
        out
    }

    /// What bulkhead adds on `probe` at each rule count, and whether that
    /// stays nearly flat as the rules grow.
    fn flatness(&self, probe: Probe) -> Option<String> {
        let base = self.summary(Case::BASELINE, probe)?;
        let added: Vec<(usize, i64)> = self
            .plan
            .rule_counts
            .iter()
            .filter_map(|&rules| {
                let case = Case::bulkhead(rules);
                Some((rules, self.added(case, probe)?))
            })
            .collect();
        let (&(n_lo, lo), &(n_hi, hi)) = (added.first()?, added.last()?);
        let growth = hi - lo;
        let noise = i64::try_from(base.run_iqr()).unwrap_or(i64::MAX);
        let share = (lo.max(0) as f64 * FLAT_SHARE) as i64;
        let flat = growth.abs() <= FLAT_NS.max(share).max(noise);
        let percent = if lo > 0 {
            format!(" ({:+.0}%)", growth as f64 * 100.0 / lo as f64)
        } else {
            String::new()
        };
        let list: Vec<String> = added
            .iter()
            .map(|&(n, a)| format!("{} ns at {}", signed(a), num(n as u64)))
            .collect();
        // How much bulkhead's own runs move: when it is much more than the
        // baseline's, the medians hide a bimodal or drifting case.
        let own_spread = self
            .plan
            .rule_counts
            .iter()
            .filter_map(|&rules| {
                let case = Case::bulkhead(rules);
                self.summary(case, probe).map(Summary::round_spread)
            })
            .max()
            .unwrap_or(0);
        let text = format!(
            "no programs {} ns; bulkhead adds {} rules. From \
             {} to {} rules the added median changes by {} ns{percent}; nearly flat (at most \
             +{FLAT_NS} ns or +{:.0}%, or within the no-program case's run-to-run noise of {} \
             ns, interquartile range of its run medians): {}. bulkhead's own run medians \
             move by up to {} ns (largest minus smallest).",
            num(base.median),
            list.join(", "),
            num(n_lo as u64),
            num(n_hi as u64),
            signed(growth),
            FLAT_SHARE * 100.0,
            num(base.run_iqr()),
            yes_no(flat),
            num(own_spread),
        );
        Some(text)
    }

    /// What the numbers say, generated from them so it never goes stale.
    pub fn reading(&self) -> String {
        let mut out = String::new();
        if let Some(runs) = &self.results.foreign {
            let _ = writeln!(
                out,
                "- **Caution: not a clean run.** {runs} runs had another agent's programs \
                 attached at the cgroup2 root (see the notes below), so *no programs* means \
                 \"no programs of this case\": every case, the baseline included, paid for \
                 them, and bulkhead's numbers are a second agent on top of the first. Run \
                 again on a clean machine for the figures of record."
            );
        }
        let counts = &self.plan.rule_counts;
        let bh = Case::bulkhead;
        let noise = |probe| {
            self.summary(Case::BASELINE, probe)
                .map_or(0, Summary::run_iqr)
        };

        // Issue #17's goals, each judged on this run's numbers.
        out.push_str(&goals::bullets(self));

        // The probe that isolates the hook, and end to end.
        if let Some(text) = self.flatness(Probe::UdpConnect) {
            let _ = writeln!(
                out,
                "- **UDP connect()** (the connect4 hook, no packet): {text}"
            );
        }
        if let Some(text) = self.flatness(Probe::TcpConnect) {
            let _ = writeln!(out, "- **TCP connect() end to end**: {text}");
        }

        // Tails: what a call pays when the scheduler gets in the way.
        if let Some(&n) = counts.last() {
            let tails: Vec<String> = Probe::ALL
                .into_iter()
                .filter_map(|probe| {
                    let b = self.summary(Case::BASELINE, probe)?;
                    let s = self.summary(bh(n), probe)?;
                    Some(format!(
                        "{} {} ns (no programs: {} ns)",
                        probe.short(),
                        num(s.p99),
                        num(b.p99)
                    ))
                })
                .collect();
            if !tails.is_empty() {
                let _ = writeln!(
                    out,
                    "- **p99 with bulkhead at {} rules**: {}.",
                    num(n as u64),
                    tails.join(", ")
                );
            }
        }

        // Which programs run and how long they take, at the largest count.
        if let Some((n, costs)) = self.results.program_costs.iter().next_back() {
            let per_hook: Vec<String> = costs
                .iter()
                .filter(|c| c.runs > 0)
                .map(|c| format!("{} {:.0} ns × {}", c.attach, c.ns_per_run, num(c.runs)))
                .collect();
            let daemon = self.results.daemon.get(n);
            let switches = daemon.and_then(|d| median_f(&d.switches_per_call));
            let lines: Vec<String> = Probe::ALL
                .into_iter()
                .map(|probe| {
                    let v = daemon
                        .and_then(|d| d.lines_per_call.get(&probe))
                        .and_then(|v| median_f(v));
                    format!(
                        "{} {}",
                        v.map_or("?".to_owned(), |v| format!("{v:.2}")),
                        probe.short()
                    )
                })
                .collect();
            let other = daemon
                .and_then(|d| median_f(&d.other_lines_per_call))
                // Shown once it reaches the precision printed.
                .filter(|&v| v >= 0.005)
                .map_or(String::new(), |v| {
                    format!(" (and {v:.2} lines per hooked call from no probe)")
                });
            let irq_work = daemon.and_then(|d| median_f(&d.irq_work_per_call));
            let _ = writeln!(
                out,
                "- **Where bulkhead's time goes** ({} rules, one extra run): mean time inside \
                 each program × runs: {}. Decision-log lines per call: {}{other}. Per hooked \
                 probe call the host took {} IRQ-work interrupts (ring-buffer wake-ups) and \
                 the daemon was switched to {} times.",
                num(*n as u64),
                if per_hook.is_empty() {
                    "not measured".to_owned()
                } else {
                    per_hook.join(", ")
                },
                lines.join(", "),
                irq_work.map_or("?".to_owned(), |v| format!("{v:.2}")),
                switches.map_or("?".to_owned(), |v| format!("{v:.2}")),
            );
        }

        // Side by side with the peers, on the probe both kinds see.
        if self.plan.peers {
            for &n in counts {
                let parts: Vec<String> = [Kind::Bulkhead, Kind::Nftables, Kind::Iptables]
                    .into_iter()
                    .filter_map(|kind| {
                        let case = Case { kind, rules: n };
                        let a = self.added(case, Probe::UdpSendto)?;
                        let r = self.summary(case, Probe::UdpSendto).and_then(|s| {
                            let b = self.summary(Case::BASELINE, Probe::UdpSendto)?;
                            Some(stats::ratio(s.median, b.median))
                        })?;
                        Some(format!("{} {} ns ({r:.2}×)", case.label(), signed(a)))
                    })
                    .collect();
                if !parts.is_empty() {
                    let _ = writeln!(
                        out,
                        "- **sendto(), {} rules** (passes both the sendmsg4 hook and the \
                         netfilter OUTPUT chain): {}.",
                        num(n as u64),
                        parts.join(", ")
                    );
                }
            }
            let peer_udp: Vec<String> = [Kind::Nftables, Kind::Iptables]
                .into_iter()
                .flat_map(|kind| counts.iter().map(move |&rules| Case { kind, rules }))
                .filter_map(|c| {
                    Some(format!(
                        "{} {}: {} ns",
                        c.label(),
                        num(c.rules as u64),
                        signed(self.added(c, Probe::UdpConnect)?)
                    ))
                })
                .collect();
            if !peer_udp.is_empty() {
                let _ = writeln!(
                    out,
                    "- **UDP connect() under nftables/iptables shows no cost by design**: \
                     connect() on a UDP socket sends no packet, so netfilter never runs \
                     ({}; the no-program case's run medians have an interquartile range of {} ns). Netfilter judges the first packet \
                     instead, which is what the sendto() table measures.",
                    peer_udp.join(", "),
                    num(noise(Probe::UdpConnect))
                );
            }
        }

        out
    }

    fn daemon_table(&self) -> String {
        let mut out = String::new();
        if self.results.daemon.is_empty() {
            return out;
        }
        let _ = writeln!(
            out,
            "| rules | start to READY=1 (ms) | VmRSS after READY=1 (MiB) | kernel memory of its maps (MiB) | decision-log lines per UDP connect | per sendto | per TCP connect | IRQ-work interrupts per call | daemon context switches per call |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (rules, d) in &self.results.daemon {
            let ms: Vec<u64> = d
                .ready_after
                .iter()
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .collect();
            let lines: Vec<String> = Probe::ALL
                .into_iter()
                .map(|probe| {
                    d.lines_per_call
                        .get(&probe)
                        .and_then(|v| median_f(v))
                        .map_or("—".to_owned(), |v| format!("{v:.2}"))
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                num(*rules as u64),
                median_of(&ms).map_or("—".to_owned(), num),
                median_of(&d.rss_kib)
                    .map_or("—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
                median_of(&d.maps_kib)
                    .map_or("—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)),
                lines.join(" | "),
                median_f(&d.irq_work_per_call).map_or("—".to_owned(), |v| format!("{v:.2}")),
                median_f(&d.switches_per_call).map_or("—".to_owned(), |v| format!("{v:.2}")),
            );
        }
        out
    }

    /// Mean ns per run of each bulkhead program, one column per rule count.
    fn program_table(&self) -> String {
        let mut out = String::new();
        let costs = &self.results.program_costs;
        let Some(first) = costs.values().next() else {
            return out;
        };
        let counts: Vec<usize> = costs.keys().copied().collect();
        let head: Vec<String> = counts
            .iter()
            .map(|&n| format!("{} rules", num(n as u64)))
            .collect();
        let _ = writeln!(out, "| hook | program | {} |", head.join(" | "));
        let _ = writeln!(out, "|---|---|{}", "---:|".repeat(counts.len()));
        for (i, p) in first.iter().enumerate() {
            let cells: Vec<String> = counts
                .iter()
                .map(|n| {
                    costs
                        .get(n)
                        .and_then(|c| c.get(i))
                        .filter(|c| c.runs > 0)
                        .map_or("not run".to_owned(), |c| {
                            format!("{:.0} ns × {}", c.ns_per_run, num(c.runs))
                        })
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | `{}` | {} |",
                p.attach,
                p.name,
                cells.join(" | ")
            );
        }
        out
    }

    fn peer_load_table(&self) -> String {
        let mut out = String::new();
        if self.results.peer_load.is_empty() {
            return out;
        }
        let _ = writeln!(out, "| peer | rules | load time (ms) |");
        let _ = writeln!(out, "|---|---:|---:|");
        for (case, took) in &self.results.peer_load {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                case.label(),
                num(case.rules as u64),
                num(u64::try_from(took.as_millis()).unwrap_or(u64::MAX))
            );
        }
        out
    }

    /// For the terminal.
    pub fn text(&self) -> String {
        let mut out = self.tables();
        out.push_str(&self.program_table());
        out.push('\n');
        out.push_str(&self.daemon_table());
        out.push('\n');
        out.push_str(&self.reading());
        if !self.results.notes.is_empty() {
            out.push_str("\nNotes:\n");
            for n in &self.results.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        let _ = writeln!(
            out,
            "\nMeasured in {:.0} s; load average before {}, after {}.",
            self.elapsed.as_secs_f64(),
            self.facts.load_before,
            self.facts.load_after
        );
        out
    }

    /// BENCHMARKS.md.
    pub fn markdown(&self) -> String {
        let f = self.facts;
        let p = self.plan;
        let mut out = String::new();
        let _ = write!(
            out,
            "# Benchmarks\n\n\
             How much bulkhead adds to a managed service's connect(), next to nftables and \
             iptables enforcing the same rules, in the same run. This file is written by\n\n\
             ```sh\n\
             cargo xtask bench            # full run (as root), rewrites this file\n\
             cargo xtask bench --quick    # smoke run: 10 and 1,000 rules, prints only\n\
             ```\n\n\
             (`cargo xtask bench --help` lists the knobs: rounds, rule counts, iterations.)\n\n\
             ## Machine and run\n\n\
             - Date: {}; commit {}\n\
             - Kernel {}, {} × {}, {} RAM (a shared VM)\n\
             - Load average (1/5/15 min) before the run: {}; after: {} (the bench itself \
             keeps one core busy)\n\
             - cgroup2 at `{}`; {}; {}\n\
             - {} rounds; per case and round {} UDP connect() and {} sendto() calls, {} TCP \
             connects (after a discarded warm-up); measuring took {:.0} s\n\n",
            f.date,
            f.commit,
            f.kernel,
            f.cores,
            f.cpu,
            f.memory,
            f.load_before,
            f.load_after,
            f.cgroup2,
            f.nft,
            f.iptables,
            p.rounds,
            num(p.udp_iterations as u64),
            num(p.udp_iterations as u64),
            num(p.tcp_iterations as u64),
            self.elapsed.as_secs_f64(),
        );
        let _ = write!(
            out,
            "## Reading\n\n{}\n## Results\n\n\
             Median and p99 over every sample of every round; *added* is the median minus the \
             no-program median, *ratio* the median over it. The last column has the median of \
             each run of the case, in run order (the no-program case runs next to every rule \
             count's group, so it has more runs): how much a case moves from run to run is \
             the noise to read the differences against.\n\n{}",
            self.reading(),
            self.tables()
        );
        let programs = self.program_table();
        if !programs.is_empty() {
            let _ = write!(
                out,
                "### Time inside bulkhead's programs\n\n\
                 Mean time per run × number of runs, from the kernel's BPF run-time \
                 statistics (`bpf(BPF_ENABLE_STATS)`), in one extra run per rule count after \
                 the measured rounds (the statistics cost a little on every run, so they are \
                 off while measuring). A mean, not a median: a run that is interrupted or \
                 preempted inside the program (by the ring buffer's wake-up of the daemon, \
                 say) counts whole, so compare it with the medians above with care. Runs \
                 include other processes' calls on the host in that time, which leave early; \
                 the load generator's calls dominate.\n\n{programs}\n"
            );
        }
        let daemon = self.daemon_table();
        if !daemon.is_empty() {
            let _ = write!(
                out,
                "### The daemon\n\n\
                 Medians over the rounds, per hooked call of the load generator (warm-ups \
                 included). *Decision-log lines*: records the daemon wrote, split by the \
                 probe they came from (a line's `hook` and `protocol`: any TCP line is the TCP \
                 probe's, a `sendmsg` line the sendto probe's, a UDP `connect` line the UDP \
                 connect probe's, whatever its type, flow summaries included) and divided by \
                 that probe's calls. The UDP connect and sendto probes repeat one flow; each \
                 TCP connect is a new one. *IRQ-work \
                 interrupts* (all CPUs, from /proc/interrupts, so anything else on the host \
                 counts too): a BPF ring buffer raises one to wake its reader when a record \
                 lands in an empty ring, so about one per call means a wake-up per record. \
                 *Context switches*: of all the daemon's threads. *Kernel memory of its \
                 maps*: the sum of each map's `memlock` (`bpftool map show`, what the kernel \
                 charges for it) right after READY=1; not in VmRSS.\n\n{daemon}\n"
            );
        }
        let peers = self.peer_load_table();
        if !peers.is_empty() {
            let _ = write!(out, "### Loading the peers' rules (once)\n\n{peers}\n");
        }
        if !self.results.notes.is_empty() {
            out.push_str("### Notes from this run\n\n");
            for n in &self.results.notes {
                let _ = writeln!(out, "- {n}");
            }
            out.push('\n');
        }
        out.push_str(&self.method());
        out
    }

    fn method(&self) -> String {
        let programs = if self.results.bulkhead_programs.is_empty() {
            "none recorded".to_owned()
        } else {
            self.results
                .bulkhead_programs
                .iter()
                .filter_map(|p| {
                    let mut words = p.split_whitespace().skip(1);
                    let attach = words.next()?;
                    let name = words.last()?;
                    Some(format!("`{name}` ({attach})"))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let all_hooks = super::floor::ALL_HOOKS.len();
        format!(
            "## Method\n\n\
             - **Service.** Each case has its own cgroup under the cgroup2 mount and its own \
             network namespace with only `lo`. The load generator (forked from xtask) enters \
             the namespace, opens the peer side (a UDP receiver and a TCP listener on \
             127.0.0.1, outside the service's cgroup, like a local server), then writes its \
             pid to the case's `cgroup.procs` and becomes the service. It times each call with \
             `clock_gettime(CLOCK_MONOTONIC)` on either side; two clock reads with nothing \
             between take {} ns here, the same in every case. Traffic goes only to 127.0.0.1.\n\
             - **Probes.** (1) connect() of one UDP socket to 127.0.0.1, repeated: the \
             connect4 hook's cost with no packet sent, so netfilter never runs. (2) sendto() of \
             one byte on an unconnected UDP socket: the sendmsg4 hook and the netfilter OUTPUT \
             chain both see every call, so this is the fair side by side; the receiver is \
             drained after each call, outside the timing. (3) connect() of a fresh TCP socket \
             to the listener, the whole loopback handshake; SO_LINGER 0 so close() sends RST \
             and no TIME_WAIT builds up.\n\
             - **Cases.** *no programs*: nothing attached, no rules. *trivial hook*: the \
             floor under any program on these hooks: two programs of two instructions \
             (`r0 = 1; exit`, allow at once), `floor_connect4` (cgroup_inet4_connect) and \
             `floor_sendmsg4` (cgroup_udp4_sendmsg), loaded with bpf(2) and attached to the \
             case's own cgroup for its run, then detached; it does not depend on the rule \
             count, so it runs once per round, next to the first group's no-program run. \
             *trivial hooks, all*: the same two-instruction program on each of the {all_hooks} hooks \
             bulkhead attaches for these policies (the outbound packet hook, sock_create, \
             sock_release, sock_ops, bind, connect, sendmsg, recvmsg and getpeername for IPv4 and IPv6, \
             setsockopt; not the inbound packet hook, which bulkhead attaches only while a \
             policy restricts inbound traffic or binding, quarantines or has name rules, \
             which these do not), run like the trivial hook: the cost \
             of bulkhead's set of hooks before any of its work (its sock_ops program also asks \
             for TCP state callbacks, which this one does not). \
             *bulkhead N*: `bulkhead \
             run` with one policy for the service's cgroup: one rule with N destinations \
             (port 443/tcp) and one allowing the probes' ports on 127.0.0.1 (so the full \
             verdict path runs and allows); the daemon is started for the case and stopped \
             after it (its programs, attached at the cgroup2 root, run for every cgroup while \
             it runs). Attached: {programs}. *bulkhead, rule with exe N* (the smallest N \
             only): the same, with `exe = [the load generator's executable]` on the probes' \
             rule (the generator is a fork of xtask), so every decision on the probes also \
             looks up the caller's executable; the daemon table is of *bulkhead N* only. \
             *nftables N*: an `ip` table whose output chain \
             has `socket cgroupv2 level 1 \"<cgroup>\" counter jump service`, and the service \
             chain `ip daddr @allowed accept; drop`, with an `interval` set of the N \
             destinations and 127.0.0.1. *iptables-legacy N* (classic linear xtables): \
             `-A OUTPUT -m cgroup --path <cgroup> -j BULKHEAD_BENCH`, then one `-d ADDR/32 -j \
             ACCEPT` per destination, 127.0.0.1 last (a linear chain walks all N rules for \
             it; a destination in the middle would walk half), then DROP. One `--path` jump \
             rather than `--path` on every rule: the walk per packet is the same (the address \
             is compared before any match), but each `cgroup` match carries a 4 KiB path \
             buffer in the kernel. Peers' rules are loaded once with `nft -f` and \
             `iptables-legacy-restore` into their case's namespace, where they touch no other \
             traffic.\n\
             - **Destinations.** N distinct /32s scattered over 127.0.0.0/15 (never sent to): \
             next to the probe's 127.0.0.1. Whole addresses (/32, /128) sit in a hash of \
             their own, one lookup whatever N; networks go to an LPM trie, which this bench \
             does not fill. Before the hash (commit 2f570c8's BENCHMARKS.md) these /32s \
             were trie entries and the probe's lookup walked a trie as deep as N made it: \
             +110 ns a UDP connect from 10 to 100,000 rules. Only IPv4 is measured.\n\
             - **Checks.** Each bulkhead case first gets EPERM on a port no rule allows (the \
             service is managed, the numbers include the verdict); each peer case's cgroup \
             rule counter must grow by at least the number of sendto() calls. Before and after \
             every case, `bpftool cgroup show <cgroup> effective` must list only what the case \
             attached (bulkhead's or the trivial hook's own programs, by id): programs from elsewhere (another agent or a test run at the root) \
             would run in every case, so the bench waits up to a minute for them to go and \
             stops otherwise (`--allow-foreign-programs` measures on top of them and says so \
             under \"Notes from this run\"); a case during which they come or go is run again. \
             After each bulkhead case the stopped agent's pinned programs are detached \
             (`bulkhead detach`) and checked gone; so are the trivial hook's after its case.\n\
             - **Daemon config.** The defaults (kernel-side logging off, decision log on, \
             unmanaged processes not observed), except that the decision log and the control \
             socket go to a temporary directory and metrics listen on any free loopback port, \
             so the bench never writes to the host's `/var/log` or clashes with another agent.\n\
             - **Not measured.** IPv6 (the probes are IPv4), many services at once, real \
             network devices (loopback only), ingress.\n\
             - **Noise.** Two shared, noisy cores: the whole case list runs {} times, forwards \
             and backwards in turn (A B … B A), with the no-program case again before each \
             rule count's group; the tables give medians over all rounds with each run's \
             median beside them. p99 catches scheduler preemption and \
             moves a lot between runs; compare medians. A goal's comparison passes only \
             when the noise (the larger interquartile range of the compared cases' run \
             medians) is at most a quarter of the limit it is held to (100 ns for the \
             `exe` goal): otherwise it says \"cannot tell\" and the goal is \"not shown\", \
             never met.\n",
            num(self.results.timer_overhead_ns),
            self.plan.rounds,
        )
    }
}

fn median_of(values: &[u64]) -> Option<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    (!v.is_empty()).then(|| stats::median(&v))
}

pub(super) fn median_f(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// 12345 -> "12,345".
pub(super) fn num(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn signed(n: i64) -> String {
    let sign = if n < 0 { "−" } else { "+" };
    format!("{sign}{}", num(n.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(num(0), "0");
        assert_eq!(num(999), "999");
        assert_eq!(num(100_000), "100,000");
        assert_eq!(num(1_234_567), "1,234,567");
        assert_eq!(signed(-1500), "−1,500");
        assert_eq!(signed(42), "+42");
    }
}
