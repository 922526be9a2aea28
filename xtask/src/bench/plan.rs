//! What a run measures: the cases, the rule counts, the iteration counts.

use anyhow::{ensure, Result};

use super::{rules::MAX_RULES, BenchArgs, Only};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// No program and no rule: the plain syscall.
    Baseline,
    /// Two programs that allow at once (floor.rs) on the case's cgroup:
    /// what any connect4/sendmsg4 program costs.
    Floor,
    /// A program that allows at once on every hook bulkhead attaches: what
    /// its set of hooks costs before any of its work.
    FloorAll,
    Bulkhead,
    /// bulkhead with the probes' rule qualified by `exe` (the load
    /// generator's executable): what the qualifier adds to a decision.
    BulkheadExe,
    Nftables,
    Iptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Case {
    pub kind: Kind,
    /// Generated destinations (0 for the baseline).
    pub rules: usize,
}

impl Case {
    /// The no-program case.
    pub const BASELINE: Case = Case {
        kind: Kind::Baseline,
        rules: 0,
    };

    /// The trivial-hook case.
    pub const FLOOR: Case = Case {
        kind: Kind::Floor,
        rules: 0,
    };

    /// The trivial hooks on every attach point of bulkhead's.
    pub const FLOOR_ALL: Case = Case {
        kind: Kind::FloorAll,
        rules: 0,
    };

    /// A case without rules (measured once per round).
    pub fn rule_free(self) -> bool {
        matches!(self.kind, Kind::Baseline | Kind::Floor | Kind::FloorAll)
    }

    pub fn bulkhead(rules: usize) -> Case {
        Case {
            kind: Kind::Bulkhead,
            rules,
        }
    }

    pub fn bulkhead_exe(rules: usize) -> Case {
        Case {
            kind: Kind::BulkheadExe,
            rules,
        }
    }

    /// A case that runs bulkhead's daemon.
    pub fn is_bulkhead(self) -> bool {
        matches!(self.kind, Kind::Bulkhead | Kind::BulkheadExe)
    }

    pub fn label(self) -> &'static str {
        match self.kind {
            Kind::Baseline => "no programs",
            Kind::Floor => "trivial hook",
            Kind::FloorAll => "trivial hooks, all",
            Kind::Bulkhead => "bulkhead",
            Kind::BulkheadExe => "bulkhead, rule with exe",
            Kind::Nftables => "nftables",
            Kind::Iptables => "iptables-legacy",
        }
    }

    /// Short unique name, used for its cgroup and network namespace.
    pub fn slug(self) -> String {
        match self.kind {
            Kind::Baseline => "base".to_owned(),
            Kind::Floor => "floor".to_owned(),
            Kind::FloorAll => "floor-all".to_owned(),
            Kind::Bulkhead => format!("bh-{}", self.rules),
            Kind::BulkheadExe => format!("bh-exe-{}", self.rules),
            Kind::Nftables => format!("nft-{}", self.rules),
            Kind::Iptables => format!("ipt-{}", self.rules),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub rule_counts: Vec<usize>,
    pub udp_iterations: usize,
    pub tcp_iterations: usize,
    pub peers: bool,
    /// Measure even with programs from elsewhere attached at the root.
    pub allow_foreign: bool,
    /// Run the hook cases (the file's main part).
    pub hooks: bool,
    /// Run the DNS names section (names.rs).
    pub names: bool,
    /// Lookups of each client per rule count and round (names section).
    pub lookups: usize,
}

impl Plan {
    pub fn from_args(args: &BenchArgs) -> Result<Self> {
        let quick = args.quick;
        let mut rule_counts = args.rules.clone().unwrap_or_else(|| {
            if quick {
                vec![10, 1_000]
            } else {
                vec![10, 1_000, 100_000]
            }
        });
        rule_counts.sort_unstable();
        rule_counts.dedup();
        let plan = Self {
            quick,
            rounds: args.rounds.unwrap_or(if quick { 2 } else { 5 }),
            rule_counts,
            udp_iterations: args
                .iterations
                .unwrap_or(if quick { 2_000 } else { 20_000 }),
            tcp_iterations: args
                .tcp_iterations
                .unwrap_or(if quick { 200 } else { 2_000 }),
            peers: !args.no_peers,
            allow_foreign: args.allow_foreign_programs,
            hooks: args.only != Some(Only::Names),
            names: args.only != Some(Only::Hooks),
            lookups: args.lookups.unwrap_or(if quick { 200 } else { 1_000 }),
        };
        ensure!(plan.rounds >= 1, "--rounds must be at least 1");
        ensure!(
            plan.udp_iterations >= 100 && plan.tcp_iterations >= 10,
            "too few iterations for a p99: at least 100 (UDP) and 10 (TCP)"
        );
        ensure!(
            plan.lookups >= 100,
            "too few lookups for a p99: at least 100"
        );
        ensure!(
            plan.rule_counts
                .iter()
                .all(|&n| (1..=MAX_RULES).contains(&n)),
            "rule counts must be between 1 and {MAX_RULES}"
        );
        Ok(plan)
    }

    /// Every case in report order: the baseline, the trivial hooks, then per rule count
    /// bulkhead (at the smallest count also with its probes' rule
    /// qualified by `exe`) and its peers. Rounds run this order forwards and
    /// backwards in turn, so slow drift on the machine (a build starting)
    /// does not always land on the same cases.
    pub fn cases(&self) -> Vec<Case> {
        let mut out = vec![Case::BASELINE, Case::FLOOR, Case::FLOOR_ALL];
        for (i, &rules) in self.rule_counts.iter().enumerate() {
            out.push(Case::bulkhead(rules));
            if i == 0 {
                out.push(Case::bulkhead_exe(rules));
            }
            if self.peers {
                out.push(Case {
                    kind: Kind::Nftables,
                    rules,
                });
                out.push(Case {
                    kind: Kind::Iptables,
                    rules,
                });
            }
        }
        out
    }
}
