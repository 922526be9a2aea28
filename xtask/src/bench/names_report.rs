//! The DNS names section of BENCHMARKS.md (names.rs's results), between
//! its own markers so that `cargo xtask bench --only names` rewrites it
//! alone and the other runs keep it.

use std::{fmt::Write as _, time::Duration};

use super::{
    loadgen::Probe,
    names::{signed_summary, NamesResults, Over, Svc, Via, NAME, RESOLVER},
    report::{num, signed, Facts},
    stats::{self, Comparison, Summary},
};

const BEGIN: &str = "<!-- bench-names:begin -->";
const END: &str = "<!-- bench-names:end -->";
/// Where a names section goes in a file that has none yet: before the
/// events section (or at the end).
const BEFORE: &str = "<!-- bench-events:begin -->";

/// The goal for a lookup's added latency, at p99.
const LOOKUP_P99_GOAL_NS: i64 = 1_000_000;

/// The probes the connect goal is read on, then the one reported beside.
const CONNECTS: [Probe; 2] = [Probe::TcpConnect, Probe::UdpConnect];

pub struct NamesReport<'a> {
    pub results: &'a NamesResults,
    pub facts: &'a Facts,
    pub elapsed: Duration,
    /// The command that reproduces the run.
    pub command: &'a str,
}

impl NamesReport<'_> {
    fn connect(&self, rules: usize, svc: Svc, probe: Probe) -> Option<Summary> {
        let rules = if svc == Svc::Baseline { 0 } else { rules };
        Summary::of(self.results.connect.get(&(rules, svc, probe))?)
    }

    fn lookup(&self, rules: usize, over: Over, via: Via) -> Option<Summary> {
        Summary::of(self.results.lookups.get(&(rules, over, via))?)
    }

    fn added_lookup(&self, rules: usize, over: Over) -> Option<(i64, i64, Vec<i64>)> {
        signed_summary(self.results.added.get(&(rules, over))?)
    }

    /// Block by block, `a` minus `b` (blocks that ran next to each other,
    /// interleave.rs).
    fn paired(&self, rules: usize, a: Svc, b: Svc, probe: Probe) -> Option<Paired> {
        let a = self.results.blocks.get(&(rules, a, probe))?;
        let b = self.results.blocks.get(&(rules, b, probe))?;
        let rounds: Vec<Vec<i64>> = a
            .iter()
            .zip(b)
            .map(|(a, b)| a.iter().zip(b).map(|(&x, &y)| stats::added(x, y)).collect())
            .collect();
        let (median, _, per_round) = signed_summary(&rounds)?;
        Some(Paired {
            median,
            noise: signed_iqr(&per_round),
            per_round,
        })
    }

    /// (name's added median, CIDR's added median, name − CIDR paired by
    /// block).
    fn name_vs_cidr(&self, rules: usize, probe: Probe) -> Option<(i64, i64, Paired)> {
        let base = self.connect(0, Svc::Baseline, probe)?;
        let name = self.connect(rules, Svc::Name, probe)?;
        let cidr = self.connect(rules, Svc::Cidr, probe)?;
        Some((
            stats::added(name.median, base.median),
            stats::added(cidr.median, base.median),
            self.paired(rules, Svc::Name, Svc::Cidr, probe)?,
        ))
    }

    /// What the numbers say, generated from them.
    pub fn reading(&self) -> String {
        let r = self.results;
        let mut out = String::new();
        // The lookup goal.
        let mut met = true;
        let mut parts = Vec::new();
        for (over, &n) in Over::ALL
            .into_iter()
            .flat_map(|o| r.rule_counts.iter().map(move |n| (o, n)))
        {
            let (Some((median, p99, _)), Some(d), Some(p)) = (
                self.added_lookup(n, over),
                self.lookup(n, over, Via::Direct),
                self.lookup(n, over, Via::Proxy),
            ) else {
                continue;
            };
            met &= p99 <= LOOKUP_P99_GOAL_NS;
            parts.push(format!(
                "{} at {} rules: added median {} ns, p99 {} ns (through the proxy median {} ns, p99 \
                 {} ns; direct median {} ns, p99 {} ns)",
                over.label(),
                num(n as u64),
                signed(median),
                signed(p99),
                num(p.median),
                num(p.p99),
                num(d.median),
                num(d.p99)
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(
                out,
                "- **Goal: a lookup's added latency through the agent at p99 ≤ 1 ms: {}.** \
                 Pairwise (a lookup through the proxy minus the direct one next to it): {}.",
                if met { "met" } else { "not met" },
                parts.join("; ")
            );
        }
        // The connect goal, on TCP and UDP connect().
        let mut verdicts = Vec::new();
        let mut parts = Vec::new();
        for probe in CONNECTS {
            for &n in &r.rule_counts {
                let Some((name, cidr, diff)) = self.name_vs_cidr(n, probe) else {
                    continue;
                };
                let verdict = name_vs_cidr_verdict(cidr, diff.median, diff.noise);
                verdicts.push(verdict);
                parts.push(format!(
                    "{} at {} rules: name {} ns, CIDR {} ns over no programs ({}); name − CIDR \
                     block by block {} ns (each round {}), against a noise of {} ns ({})",
                    probe.short(),
                    num(n as u64),
                    signed(name),
                    signed(cidr),
                    ratio_text(name, cidr),
                    signed(diff.median),
                    diff.rounds(),
                    num(diff.noise),
                    verdict.word()
                ));
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(
                out,
                "- **Goal: connect() allowed by a learnt name costs no more than allowed by \
                 address rules of the same size (name/CIDR ≤ 1.0 within noise): {}.** {}.",
                Comparison::goal(&verdicts),
                parts.join("; ")
            );
        }
        let split: Vec<String> = CONNECTS
            .into_iter()
            .flat_map(|probe| r.rule_counts.iter().map(move |&n| (probe, n)))
            .filter_map(|(probe, n)| {
                let rules = self.paired(n, Svc::NameRulesByAddress, Svc::Cidr, probe)?;
                let learnt = self.paired(n, Svc::Name, Svc::NameRulesByAddress, probe)?;
                Some(format!(
                    "{} at {} rules: having name rules {} ns (allowed by address, name rules \
                     against none; noise {} ns), the learnt path {} ns (allowed by a learnt \
                     name against by address, both with name rules; noise {} ns)",
                    probe.short(),
                    num(n as u64),
                    signed(rules.median),
                    num(rules.noise),
                    signed(learnt.median),
                    num(learnt.noise),
                ))
            })
            .collect();
        if !split.is_empty() {
            let _ = writeln!(
                out,
                "- **Split of name − CIDR** (block by block, as above): {}.",
                split.join("; ")
            );
        }
        let sendto: Vec<String> = r
            .rule_counts
            .iter()
            .filter_map(|&n| {
                let (name, cidr, diff) = self.name_vs_cidr(n, Probe::UdpSendto)?;
                Some(format!(
                    "at {} rules name {} ns, CIDR {} ns ({}; name − CIDR block by block {} ns, \
                     noise {} ns)",
                    num(n as u64),
                    signed(name),
                    signed(cidr),
                    ratio_text(name, cidr),
                    signed(diff.median),
                    num(diff.noise)
                ))
            })
            .collect();
        if !sendto.is_empty() {
            let _ = writeln!(
                out,
                "- **sendto()** (unconnected UDP: the sendmsg4 hook judges every datagram the \
                 same way): {}.",
                sendto.join("; ")
            );
        }
        if let Some(text) = self.where_time_goes() {
            let _ = writeln!(out, "- **Where the time goes** {text}");
        }
        out
    }

    /// The connect and sendmsg programs' mean run time, per service.
    fn where_time_goes(&self) -> Option<String> {
        let (n, costs) = self.results.program_costs.as_ref()?;
        let name = costs.get(&Svc::Name)?;
        let both = costs.get(&Svc::NameRulesByAddress)?;
        let cidr = costs.get(&Svc::Cidr)?;
        let parts: Vec<String> = name
            .iter()
            .zip(both.iter().zip(cidr))
            .filter(|(a, _)| {
                a.attach == "cgroup_inet4_connect" || a.attach == "cgroup_udp4_sendmsg"
            })
            .map(|(a, (b, c))| {
                format!(
                    "`{}` {:.0} ns a run with the name service's probes, {:.0} ns with the \
                     name-rules-by-address service's, {:.0} ns with the CIDR service's (name − \
                     CIDR {:+.0} ns, of which having name rules {:+.0} ns and the learnt path \
                     {:+.0} ns)",
                    a.name,
                    a.ns_per_run,
                    b.ns_per_run,
                    c.ns_per_run,
                    a.ns_per_run - c.ns_per_run,
                    b.ns_per_run - c.ns_per_run,
                    a.ns_per_run - b.ns_per_run,
                )
            })
            .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "({} rules, {} extra runs of each service's probes in turn with the kernel's BPF \
                 run-time statistics on; means, \
                 so a preempted run counts whole): {}. The learnt path is a LEARNT_V4 hash \
                 lookup (an 8-byte key: the service's name key folded to 32 bits and the \
                 address; the entry's whole name key is compared; no clock is read: the \
                 agent removes an entry at its expiry) that hits, and the port scan of \
                 the union ruleset the entry's rule bits pick; the CIDR path is one hash \
                 lookup that hits (an 8-byte key) and the port scan. Having name rules, \
                 allowed by address, adds a LEARNT_V4 lookup that misses before the \
                 address rules. (The check that a call goes to the proxy itself, an \
                 array read, is made only of a call the rules deny.)",
                num(*n as u64),
                super::names::PROFILE_PASSES,
                parts.join("; ")
            )
        })
    }

    fn lookup_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| rules | over | lookup | median (ns) | p99 (ns) | median of each run (ns) |"
        );
        let _ = writeln!(out, "|---:|---|---|---:|---:|---|");
        for (over, &n) in Over::ALL
            .into_iter()
            .flat_map(|o| self.results.rule_counts.iter().map(move |n| (o, n)))
        {
            for (via, label) in [
                (Via::Direct, "direct: a service without name rules"),
                (Via::Proxy, "through the agent: a service with a name rule"),
            ] {
                if let Some(s) = self.lookup(n, over, via) {
                    let runs: Vec<String> = s.round_medians.iter().map(|&m| num(m)).collect();
                    let _ = writeln!(
                        out,
                        "| {} | {} | {label} | {} | {} | {} |",
                        num(n as u64),
                        over.label(),
                        num(s.median),
                        num(s.p99),
                        runs.join(" / ")
                    );
                }
            }
            if let Some((median, p99, runs)) = self.added_lookup(n, over) {
                let runs: Vec<String> = runs.iter().map(|&m| signed(m)).collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | **added** (pairwise) | {} | {} | {} |",
                    num(n as u64),
                    over.label(),
                    signed(median),
                    signed(p99),
                    runs.join(" / ")
                );
            }
        }
        out
    }

    fn connect_tables(&self) -> String {
        let mut out = String::new();
        for probe in Probe::ALL {
            let Some(base) = self.connect(0, Svc::Baseline, probe) else {
                continue;
            };
            let _ = writeln!(out, "#### {}\n", probe.title());
            let _ = writeln!(
                out,
                "| case | rules | median (ns) | p99 (ns) | added median (ns) | name/CIDR (added) | median of each run (ns) |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
            let runs = |s: &Summary| -> String {
                s.round_medians
                    .iter()
                    .map(|&m| num(m))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let _ = writeln!(
                out,
                "| {} | — | {} | {} | — | — | {} |",
                Svc::Baseline.label(),
                num(base.median),
                num(base.p99),
                runs(&base)
            );
            for &n in &self.results.rule_counts {
                for svc in [Svc::Cidr, Svc::NameRulesByAddress, Svc::Name] {
                    let Some(s) = self.connect(n, svc, probe) else {
                        continue;
                    };
                    let ratio = match (svc, self.name_vs_cidr(n, probe)) {
                        (Svc::Name, Some((name, cidr, _))) => ratio_text(name, cidr),
                        _ => "—".to_owned(),
                    };
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {ratio} | {} |",
                        svc.label(),
                        num(n as u64),
                        num(s.median),
                        num(s.p99),
                        signed(stats::added(s.median, base.median)),
                        runs(&s)
                    );
                }
            }
            out.push('\n');
        }
        out
    }

    fn program_table(&self) -> String {
        let mut out = String::new();
        let Some((n, costs)) = &self.results.program_costs else {
            return out;
        };
        let (Some(name), Some(both), Some(cidr)) = (
            costs.get(&Svc::Name),
            costs.get(&Svc::NameRulesByAddress),
            costs.get(&Svc::Cidr),
        ) else {
            return out;
        };
        let _ = writeln!(
            out,
            "Mean time per run × runs of each of the agent's programs at {} rules, from the \
             kernel's BPF run-time statistics, over {} runs of each service's probes, the \
             services in turn (other \
             processes' calls on the host in that time count too):\n",
            num(*n as u64),
            super::names::PROFILE_PASSES
        );
        let _ = writeln!(
            out,
            "| hook | program | learnt name | name rules, by address | CIDR |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|");
        let cell = |c: &super::profile::ProgramCost| {
            if c.runs == 0 {
                "not run".to_owned()
            } else {
                format!("{:.0} ns × {}", c.ns_per_run, num(c.runs))
            }
        };
        for (a, (b, c)) in name.iter().zip(both.iter().zip(cidr)) {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} | {} |",
                a.attach,
                a.name,
                cell(a),
                cell(b),
                cell(c)
            );
        }
        out
    }

    fn body(&self) -> String {
        let r = self.results;
        let f = self.facts;
        let mut out = String::new();
        let _ = write!(
            out,
            "## Egress by DNS name: lookup latency and connect cost\n\n\
             Reproduce: `{}` (as root; writes this section only; a full `cargo xtask bench` \
             runs it too, after the hook cases). Issue 19's performance goals, measured with \
             the real agent, a real dnsmasq and the kernel's redirect (docs/dns-names.md).\n\n\
             - Date: {}; commit {}\n\
             - Kernel {}, {} × {}, {} RAM (a shared VM)\n\
             - Load average (1/5/15 min) before the run: {}; after: {}\n\
             - {} rounds; per rule count and round {} lookups of each client (after {} \
             discarded pairs), and per service {} UDP connect() and {} sendto() calls and {} \
             TCP connects (after a discarded warm-up); measuring took {:.0} s\n\n\
             ### Reading\n\n{}\n",
            self.command,
            f.date,
            f.commit,
            f.kernel,
            f.cores,
            f.cpu,
            f.memory,
            f.load_before,
            f.load_after,
            r.rounds,
            num(r.lookups_per_round as u64),
            num(r.warmup_lookups as u64),
            num(r.udp_iterations as u64),
            num(r.udp_iterations as u64),
            num(r.tcp_iterations as u64),
            self.elapsed.as_secs_f64(),
            self.reading()
        );
        let _ = write!(
            out,
            "### Lookup latency through the agent\n\n\
             One A query for `{NAME}` over UDP, and one over TCP, to dnsmasq on \
             {RESOLVER}:53, from each service's cgroup, the two services interleaved one by \
             one; median and p99 over every lookup of every round. *added*: each lookup through the proxy minus the direct \
             lookup made next to it.\n\n{}\n\
             ### Connect cost: allowed by a learnt name against allowed by address rules\n\n\
             Median and p99 over every sample of every round; *added* is the median minus the \
             no-program median; *name/CIDR* the name service's added median over the CIDR \
             service's at the same rule count. The services' cases under the agent ran \
             interleaved in blocks (see Method), so their run medians move together.\n\n{}",
            self.lookup_table(),
            self.connect_tables()
        );
        let programs = self.program_table();
        if !programs.is_empty() {
            let _ = write!(out, "### Time inside the agent's programs\n\n{programs}\n");
        }
        if !r.notes.is_empty() {
            out.push_str("### Notes from this run\n\n");
            for n in &r.notes {
                let _ = writeln!(out, "- {n}");
            }
            out.push('\n');
        }
        let _ = write!(
            out,
            "### Method\n\n\
             - **Agent.** `bulkhead run` (release build, the bench's config: defaults, the \
             DNS proxy on `127.0.0.1:0`) with two services' policies, started for each round \
             and rule count and stopped (and detached) after it, so that the no-program runs \
             have nothing attached. Each service has the same rule of N generated /32s \
             (127.0.0.0/15, port 443/tcp, as in the hook cases) and a rule allowing the \
             resolver {RESOLVER} on port 53 (UDP and TCP); the probes' ports on 127.0.0.1 are allowed \
             to the *name service* only by the name `{NAME}` (a name rule, protocol any), \
             to the *CIDR service* by the address `127.0.0.1`, and to a third service \
             *with name rules, allowed by address* by both (that name rule and the address \
             rule; its address rules decide, so it shows what having name rules costs apart \
             from the learnt path). dnsmasq (Debian's, \
             started by the integration harness, tests/src/dns_server.rs) answers `{NAME}` \
             with 127.0.0.1 from a hosts file of its own, TTL 1 (the agent holds a learnt \
             address for its `min_ttl`, 60 s).\n\
             - **Lookups.** Two clients forked from xtask, one in each service's cgroup, in \
             the host's network namespace (where the proxy listens), each making a lookup \
             when told to, as glibc's resolver does: a new UDP socket, connect() to \
             {RESOLVER}:53, send() the query (RD set, its own id), recvfrom() until the \
             answer with that id, which must come from {RESOLVER}:53 (for the name \
             service the recvmsg4 hook shows it in place of the proxy's address) and be a \
             NOERROR answer with records; then the same over TCP, as glibc does with \
             `use-vc` or after a truncated answer: a new TCP socket, connect(), the query \
             written with its length, the answer read, whose peer (getpeername(), which \
             the getpeername4 hook rewrites for the name service) must be {RESOLVER}:53; \
             each timed with `CLOCK_MONOTONIC` from socket() to the answer in hand, \
             close() untimed. The name service's connect() is redirected to \
             the proxy, which forwards the query to dnsmasq, learns 127.0.0.1 into LEARNT_V4 \
             and answers; the CIDR service's goes to dnsmasq. Order in each pair alternates \
             (name first, then CIDR first). Checked each round: before its first lookup the \
             name service gets EPERM from a UDP connect() to 127.0.0.1:{} (the address \
             rules deny it, nothing is learnt), after the warm-up it is allowed (so its \
             lookups went through the proxy); the CIDR service is allowed all along.\n\
             - **Connect probes.** Then, in the same round and under the same agent, \
             loadgen.rs's probes (UDP connect(), sendto(), TCP connect() to 127.0.0.1, \
             described in the hook cases' Method) run from one load generator \
             (interleave.rs) in one network namespace with one pair of peers, which moves \
             between the three services' cgroups: per probe, {} blocks of a twentieth of \
             the calls in each cgroup, in the order name service, third service, CIDR \
             service, then the reverse, and so on (even rounds start from the CIDR service), \
             each block after {} untimed calls ({} for TCP) following the move, and all of \
             it after one unmeasured pass. Each cgroup first checks that a port no rule \
             allows gets EPERM. The name service's probes are allowed by what it learnt: \
             its address rules miss 127.0.0.1. *no programs*: loadgen.rs's probes in a \
             cgroup and network namespace of their own with no agent running, before each \
             rule count's group in odd rounds and after it in even ones.\n\
             - **Noise.** The rounds alternate the rule counts' order too. Run one after \
             another, a case's run medians move by hundreds of ns here, more than the \
             difference sought; so name − CIDR is read block by block: the median, over \
             every pair of blocks that ran next to each other, of the difference of the two \
             blocks' interquartile means (the mean of the middle half of a block's calls: \
             the clock here steps by 10 ns, so a block's median moves in 10 ns steps and \
             cannot see less). Its noise is the interquartile range of each round's median \
             difference (each round starts the agent, its maps and the probes anew). \
             \"Within noise\" means that difference is at most 0 or at most that noise. A \
             comparison whose noise is above a quarter of the CIDR service's added median \
             cannot tell (a difference that large would hide in it): the goal is then \
             \"not shown\", never met.\n\
             - **Not measured.** Lookups over IPv6, an upstream resolver that is not on \
             loopback, many services or names at once.\n",
            super::loadgen::UDP_PORT,
            super::interleave::BLOCKS,
            super::interleave::settle(Probe::UdpConnect),
            super::interleave::settle(Probe::TcpConnect),
        );
        out
    }

    /// The section with its markers.
    pub fn section(&self) -> String {
        format!("{BEGIN}\n{}{END}\n", self.body())
    }

    /// For the terminal.
    pub fn text(&self) -> String {
        self.body()
    }
}

/// One service against another, block by block (ns).
struct Paired {
    /// The median of every block pair's difference, over all rounds.
    median: i64,
    /// Each round's median difference.
    per_round: Vec<i64>,
    /// The interquartile range of `per_round`: how much the difference
    /// itself moves from round (and agent start) to round.
    noise: u64,
}

impl Paired {
    fn rounds(&self) -> String {
        let each: Vec<String> = self.per_round.iter().map(|&d| signed(d)).collect();
        each.join(" / ")
    }
}

/// Interquartile range (nearest rank) of signed values; 0 for none.
fn signed_iqr(v: &[i64]) -> u64 {
    let mut v = v.to_vec();
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let at = |pct: usize| v[(v.len() * pct).div_ceil(100).max(1) - 1];
    at(75).abs_diff(at(25))
}

/// `name / cidr` of two added medians, or why there is none.
fn ratio_text(name: i64, cidr: i64) -> String {
    if cidr <= 0 {
        return "no ratio: CIDR adds nothing measurable".to_owned();
    }
    format!("{:.2}×", name as f64 / cidr as f64)
}

/// The marked names section of a BENCHMARKS.md text, markers included.
pub fn section(text: &str) -> Option<String> {
    let b = text.find(BEGIN)?;
    let e = text[b..].find(END)? + b + END.len();
    Some(format!("\n{}\n", &text[b..e]))
}

/// `old` with its names section replaced by `new` (markers included), or
/// `new` put before the events section, or at the end.
pub fn replace_section(old: &str, new: &str) -> String {
    if let (Some(b), Some(e)) = (old.find(BEGIN), old.find(END)) {
        if b < e {
            return format!(
                "{}{new}{}",
                &old[..b],
                old[e + END.len()..].trim_start_matches('\n')
            );
        }
    }
    match old.find(BEFORE) {
        Some(at) => format!("{}{new}\n{}", &old[..at], &old[at..]),
        None if old.is_empty() => new.to_owned(),
        None => format!("{}\n\n{new}", old.trim_end_matches('\n')),
    }
}

/// One name-against-CIDR comparison of the connect goal: the name
/// service passes when it costs no more than the CIDR service within the
/// noise, and the noise can tell when it is at most a quarter of the CIDR
/// service's added median (`cidr`; `diff`: name − CIDR; all ns).
fn name_vs_cidr_verdict(cidr: i64, diff: i64, noise: u64) -> Comparison {
    Comparison::judge(
        diff <= 0 || diff.unsigned_abs() <= noise,
        noise,
        Comparison::quarter_of(cidr),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_replaced_in_place_or_put_before_the_events() {
        let a = format!("head\n{BEGIN}\nold\n{END}\n\n{BEFORE}\nev\n");
        let new = format!("{BEGIN}\nnew\n{END}\n");
        let replaced = replace_section(&a, &new);
        assert_eq!(
            replaced,
            format!("head\n{BEGIN}\nnew\n{END}\n{BEFORE}\nev\n")
        );
        let b = format!("head\n\n{BEFORE}\nev\n");
        assert_eq!(
            replace_section(&b, &new),
            format!("head\n\n{BEGIN}\nnew\n{END}\n\n{BEFORE}\nev\n")
        );
        assert_eq!(replace_section("", &new), new);
        assert!(section(&replaced).is_some_and(|s| s.contains("new")));
    }

    #[test]
    fn a_comparison_drowned_in_noise_never_meets_the_goal() {
        use super::{
            name_vs_cidr_verdict as of,
            Comparison::{CannotTell, No, Yes},
        };
        // The run of record's UDP connect: +30 ns against 10 ns of noise.
        assert_eq!(of(360, 30, 10), No);
        assert_eq!(of(360, 5, 10), Yes);
        assert_eq!(of(360, -20, 10), Yes);
        // A noisy run: 300 ns of noise on a 353 ns hook tells nothing,
        // whichever way the medians fell.
        assert_eq!(of(353, -300, 300), CannotTell);
        assert_eq!(of(353, 200, 300), CannotTell);
        // More than the noise is more, however noisy.
        assert_eq!(of(353, 400, 300), No);
        // The bound: a quarter of the CIDR case's added median.
        assert_eq!(of(400, 0, 100), Yes);
        assert_eq!(of(400, 0, 101), CannotTell);
    }

    #[test]
    fn the_noise_of_a_paired_difference_is_its_rounds_spread() {
        // Sorted -10 0 2 5 20: the 2nd and 4th by nearest rank.
        assert_eq!(signed_iqr(&[-10, 5, 0, 20, 2]), 5);
        assert_eq!(signed_iqr(&[7]), 0);
        assert_eq!(signed_iqr(&[]), 0);
    }

    #[test]
    fn ratios_say_when_there_is_none() {
        assert_eq!(ratio_text(150, 100), "1.50×");
        assert!(ratio_text(150, 0).starts_with("no ratio"));
    }
}
