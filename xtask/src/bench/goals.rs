//! Issue #17's goals, judged on one run's numbers side by side:
//! (a) sendto() added median at or below nftables' at 10, 1,000 and
//! 100,000 rules; (b) TCP connect() added median at most nftables' + 0.5 µs;
//! (c) UDP connect() added median at most twice the trivial hook's;
//! (d) at most 0.01 decision-log lines per call for repeated flows (the UDP
//! connect and sendto probes). Issue #22's: an `exe` qualifier adds at
//! most 100 ns to the connect() medians.

use std::fmt::Write as _;

use super::{
    loadgen::Probe,
    plan::{Case, Kind},
    report::{median_f, num, signed, Report},
    stats::Comparison,
};

/// The rule counts the goals name.
const GOAL_COUNTS: [usize; 3] = [10, 1_000, 100_000];
/// (b): how much more than nftables bulkhead may add to a TCP connect().
const TCP_SLACK_NS: i64 = 500;
/// (c): bulkhead's UDP connect() may add this many times the trivial hook.
const FLOOR_FACTOR: i64 = 2;
/// (d): decision-log lines per call of a repeated flow.
const MAX_LINES_PER_CALL: f64 = 0.01;
/// Issue #22: what an `exe` qualifier may add to a connect() median.
const EXE_SLACK_NS: i64 = 100;

/// One bullet per goal, for the "Reading" list.
pub fn bullets(r: &Report) -> String {
    let mut out = String::new();
    for line in [
        sendto(r),
        tcp(r),
        udp_connect(r),
        log_lines(r),
        exe_qualifier(r),
        hooks_floor(r),
    ] {
        let _ = writeln!(out, "{line}");
    }
    out
}

/// "met", "not met", "not shown" (too noisy), or "met at the counts
/// measured" with what is missing, from one verdict per rule count of the
/// run.
fn verdict(results: &[(usize, Comparison)]) -> String {
    if results.is_empty() {
        return "not judged (no data in this run)".to_owned();
    }
    let all: Vec<Comparison> = results.iter().map(|&(_, c)| c).collect();
    let goal = Comparison::goal(&all);
    if goal != "met" {
        return goal.to_owned();
    }
    let missing: Vec<String> = GOAL_COUNTS
        .iter()
        .filter(|n| !results.iter().any(|(m, _)| m == *n))
        .map(|&n| num(n as u64))
        .collect();
    if missing.is_empty() {
        "met".to_owned()
    } else {
        format!(
            "met at the counts measured ({} not in this run)",
            missing.join(", ")
        )
    }
}

fn yes(ok: bool) -> Comparison {
    if ok {
        Comparison::Yes
    } else {
        Comparison::No
    }
}

/// The larger interquartile range of `cases`' run medians on `probe`: the
/// noise of comparing their medians (the no-program median both subtract
/// cancels out).
fn noise(r: &Report, cases: &[Case], probe: Probe) -> u64 {
    cases
        .iter()
        .filter_map(|&c| r.summary(c, probe))
        .map(super::stats::Summary::run_iqr)
        .max()
        .unwrap_or(0)
}

/// bulkhead's and nftables' added medians on `probe` at each rule count
/// where both were measured, and the noise between the two.
fn with_nftables(r: &Report, probe: Probe) -> Vec<(usize, i64, i64, u64)> {
    r.plan
        .rule_counts
        .iter()
        .filter_map(|&rules| {
            let nft_case = Case {
                kind: Kind::Nftables,
                rules,
            };
            let bh = r.added(Case::bulkhead(rules), probe)?;
            let nft = r.added(nft_case, probe)?;
            Some((
                rules,
                bh,
                nft,
                noise(r, &[Case::bulkhead(rules), nft_case], probe),
            ))
        })
        .collect()
}

/// A comparison with nftables passes when bulkhead adds at most `limit`;
/// the noise can tell when it is at most a quarter of the limit.
fn against(bh: i64, limit: i64, noise: u64) -> Comparison {
    Comparison::judge(bh <= limit, noise, Comparison::quarter_of(limit))
}

/// Each rule count's row against nftables, judged against nftables' added
/// median plus `slack` (ns): the verdict and the row's text, which names
/// the limit when there is slack.
fn rows_against_nftables(
    r: &Report,
    probe: Probe,
    slack: i64,
) -> (Vec<(usize, Comparison)>, Vec<String>) {
    with_nftables(r, probe)
        .into_iter()
        .map(|(n, bh, nft, noise)| {
            let limit = nft + slack;
            let verdict = against(bh, limit, noise);
            let limit_text = if slack == 0 {
                String::new()
            } else {
                format!(", limit {} ns", signed(limit))
            };
            let text = format!(
                "{}: bulkhead {} ns, nftables {} ns{limit_text}, noise {} ns ({})",
                num(n as u64),
                signed(bh),
                signed(nft),
                num(noise),
                verdict.word()
            );
            ((n, verdict), text)
        })
        .unzip()
}

fn sendto(r: &Report) -> String {
    let (results, parts) = rows_against_nftables(r, Probe::UdpSendto, 0);
    format!(
        "- **Goal (a), sendto() added median at or below nftables' at 10, 1,000 and 100,000 \
         rules: {}.** {}.",
        verdict(&results),
        or_none(&parts, "no nftables case in this run")
    )
}

fn tcp(r: &Report) -> String {
    let (results, parts) = rows_against_nftables(r, Probe::TcpConnect, TCP_SLACK_NS);
    format!(
        "- **Goal (b), TCP connect() added median at most nftables' + 0.5 µs: {}.** {}.",
        verdict(&results),
        or_none(&parts, "no nftables case in this run")
    )
}

fn udp_connect(r: &Report) -> String {
    let Some(floor) = r.added(Case::FLOOR, Probe::UdpConnect) else {
        return "- **Goal (c), UDP connect() added median at most 2× the trivial hook's: not \
                judged (no trivial-hook case in this run).**"
            .to_owned();
    };
    let limit = FLOOR_FACTOR * floor;
    let rows: Vec<(usize, i64, u64)> = r
        .plan
        .rule_counts
        .iter()
        .filter_map(|&n| {
            let bh = r.added(Case::bulkhead(n), Probe::UdpConnect)?;
            Some((
                n,
                bh,
                noise(r, &[Case::bulkhead(n), Case::FLOOR], Probe::UdpConnect),
            ))
        })
        .collect();
    let (results, parts): (Vec<(usize, Comparison)>, Vec<String>) = rows
        .into_iter()
        .map(|(n, bh, noise)| {
            let verdict = against(bh, limit, noise);
            let times = if floor > 0 {
                format!(", {:.2}× the floor", bh as f64 / floor as f64)
            } else {
                String::new()
            };
            let text = format!(
                "{}: bulkhead {} ns{times}, noise {} ns ({})",
                num(n as u64),
                signed(bh),
                num(noise),
                verdict.word()
            );
            ((n, verdict), text)
        })
        .unzip();
    let base = r
        .summary(Case::BASELINE, Probe::UdpConnect)
        .map_or(0, |s| s.median);
    format!(
        "- **Goal (c), UDP connect() added median at most 2× the trivial hook's: {}.** The \
         trivial hook (return at once) adds {} ns to the no-program {} ns, so the limit is \
         {} ns; {}.",
        verdict(&results),
        signed(floor),
        num(base),
        signed(limit),
        or_none(&parts, "no bulkhead case in this run")
    )
}

fn log_lines(r: &Report) -> String {
    let median = |rules: usize, probe: Probe| -> Option<f64> {
        median_f(r.results.daemon.get(&rules)?.lines_per_call.get(&probe)?)
    };
    let mut results = Vec::new();
    let mut parts = Vec::new();
    for &n in &r.plan.rule_counts {
        let (Some(udp), Some(sendto)) = (median(n, Probe::UdpConnect), median(n, Probe::UdpSendto))
        else {
            continue;
        };
        let ok = yes(udp <= MAX_LINES_PER_CALL && sendto <= MAX_LINES_PER_CALL);
        results.push((n, ok));
        let tcp = median(n, Probe::TcpConnect).map_or(String::new(), |v| {
            format!("; TCP connect, a new flow each call, {v:.2}")
        });
        parts.push(format!(
            "{}: UDP connect {udp:.3}, sendto {sendto:.3} ({}{tcp})",
            num(n as u64),
            ok.word()
        ));
    }
    format!(
        "- **Goal (d), at most 0.01 decision-log lines per call for a repeated flow (the UDP \
         connect and sendto probes): {}.** Median over the rounds, warm-ups included: {}.",
        verdict(&results),
        or_none(&parts, "no bulkhead case in this run")
    )
}

/// The medians of the case whose probes' rule names the load generator's
/// executable, against bulkhead's at the same rule count in the same run.
fn exe_qualifier(r: &Report) -> String {
    let Some(&n) = r.plan.rule_counts.first() else {
        return "- **`exe` qualifier: not judged (no bulkhead case in this run).**".to_owned();
    };
    let (plain, qualified) = (Case::bulkhead(n), Case::bulkhead_exe(n));
    let mut results = Vec::new();
    let mut parts = Vec::new();
    for probe in Probe::ALL {
        let (Some(a), Some(b)) = (r.summary(plain, probe), r.summary(qualified, probe)) else {
            continue;
        };
        let diff = b.median as i64 - a.median as i64;
        let judged = probe != Probe::UdpSendto;
        // Noise above the 100 ns allowed could hide an excess of that size.
        let verdict = Comparison::judge(
            diff <= EXE_SLACK_NS,
            a.run_iqr().max(b.run_iqr()),
            EXE_SLACK_NS.unsigned_abs(),
        );
        if judged {
            results.push(verdict);
        }
        parts.push(format!(
            "{} {} ns ({} against {} median{})",
            probe.short(),
            signed(diff),
            num(b.median),
            num(a.median),
            if judged {
                format!(", {}", verdict.word())
            } else {
                String::new()
            }
        ));
    }
    let verdict = if results.is_empty() {
        "not judged (no data in this run)"
    } else {
        Comparison::goal(&results)
    };
    format!(
        "- **Issue 22's goal, an `exe` qualifier adds at most 100 ns to the connect() \
         medians: {verdict}.** At {} rules, the probes' rule naming the load generator's \
         executable against the same rule without it: {}.",
        num(n as u64),
        or_none(&parts, "no case with exe in this run")
    )
}

fn or_none(parts: &[String], none: &str) -> String {
    if parts.is_empty() {
        none.to_owned()
    } else {
        parts.join("; ")
    }
}

/// What bulkhead's set of hooks costs before any of its work (trivial
/// programs on all of them), next to what bulkhead and nftables add: the
/// part of each goal's budget that attaching where bulkhead must already
/// spends.
fn hooks_floor(r: &Report) -> String {
    let mut parts = Vec::new();
    for probe in Probe::ALL {
        let Some(all) = r.added(Case::FLOOR_ALL, probe) else {
            continue;
        };
        let mut part = format!("{}: {} ns", probe.short(), signed(all));
        for &n in &GOAL_COUNTS {
            let bh = r.added(Case::bulkhead(n), probe);
            let nft = r.added(
                Case {
                    kind: Kind::Nftables,
                    rules: n,
                },
                probe,
            );
            if let (Some(bh), Some(nft)) = (bh, nft) {
                let _ = write!(
                    part,
                    "; at {}: bulkhead {} ns (its own work {} ns), nftables {} ns",
                    num(n as u64),
                    signed(bh),
                    signed(bh - all),
                    signed(nft)
                );
            }
        }
        parts.push(part);
    }
    format!(
        "- **The floor of bulkhead's hooks** (a program that returns at once on each of the \
         {} hooks bulkhead attaches for these policies, so a sendto() also passes the \
         outbound packet hook and a TCP connect() sock_create, sock_ops and every outbound \
         packet of the handshake): {}.",
        super::floor::ALL_HOOKS.len(),
        or_none(&parts, "no all-hooks case in this run")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_says_what_was_not_measured() {
        use Comparison::{CannotTell, No, Yes};
        assert_eq!(verdict(&[]), "not judged (no data in this run)");
        assert_eq!(verdict(&[(10, Yes), (1_000, Yes), (100_000, Yes)]), "met");
        assert_eq!(
            verdict(&[(10, Yes), (1_000, Yes)]),
            "met at the counts measured (100,000 not in this run)"
        );
        assert_eq!(verdict(&[(10, Yes), (1_000, No)]), "not met");
        assert_eq!(
            verdict(&[(10, Yes), (1_000, CannotTell), (100_000, Yes)]),
            "not shown (too noisy to tell)"
        );
    }

    #[test]
    fn a_pass_within_nftables_needs_a_run_quiet_enough_to_tell() {
        // The run of record's sendto() at 1,000 rules: +232 against +289,
        // noise 5 ns: a pass.
        assert_eq!(against(232, 289, 5), Comparison::Yes);
        // The same medians with 100 ns of noise on a 289 ns limit.
        assert_eq!(against(232, 289, 100), Comparison::CannotTell);
        // Over the limit fails, noisy or not.
        assert_eq!(against(235, 176, 100), Comparison::No);
    }
}
