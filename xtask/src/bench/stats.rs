//! Medians and percentiles of per-call samples.

/// Summary of one case and probe over every round.
#[derive(Clone, Debug)]
pub struct Summary {
    pub median: u64,
    pub p99: u64,
    /// The median of each run of the case, in run order: how much a case
    /// moves between runs is the noise to read the differences against.
    pub round_medians: Vec<u64>,
}

impl Summary {
    /// `rounds` holds each run's samples.
    pub fn of(rounds: &[Vec<u64>]) -> Option<Self> {
        let mut all: Vec<u64> = rounds.iter().flatten().copied().collect();
        if all.is_empty() {
            return None;
        }
        all.sort_unstable();
        let round_medians = rounds
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| {
                let mut r = r.clone();
                r.sort_unstable();
                median(&r)
            })
            .collect();
        Some(Self {
            median: median(&all),
            p99: percentile(&all, 99),
            round_medians,
        })
    }

    /// Interquartile range of the run medians: how much a case moves from
    /// run to run, not thrown by one disturbed run the way max - min is.
    pub fn run_iqr(&self) -> u64 {
        let mut v = self.round_medians.clone();
        if v.is_empty() {
            return 0;
        }
        v.sort_unstable();
        percentile(&v, 75) - percentile(&v, 25)
    }

    /// Largest minus smallest run median.
    pub fn round_spread(&self) -> u64 {
        let max = self.round_medians.iter().max().copied().unwrap_or(0);
        let min = self.round_medians.iter().min().copied().unwrap_or(0);
        max - min
    }
}

/// Median of sorted, non-empty samples (mean of the middle two if even).
pub fn median(sorted: &[u64]) -> u64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]).div_ceil(2)
    }
}

/// Nearest-rank percentile of sorted, non-empty samples.
pub fn percentile(sorted: &[u64], pct: usize) -> u64 {
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// `value - base` as a signed number (a case can come out faster than the
/// baseline by noise).
pub fn added(value: u64, base: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX) - i64::try_from(base).unwrap_or(i64::MAX)
}

pub fn ratio(value: u64, base: u64) -> f64 {
    if base == 0 {
        return f64::NAN;
    }
    value as f64 / base as f64
}

/// What one comparison of a goal says, the run's noise weighed in: a
/// pass counts only when the noise could not hide a difference that
/// matters (on this 2-core shared machine, runs are sometimes bimodal, and
/// a noisy run's medians can fall either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Yes,
    No,
    CannotTell,
}

impl Comparison {
    /// `passes`: the medians meet the goal; `noise`: the larger
    /// interquartile range of the compared cases' run medians;
    /// `tolerance`: the most noise that can still tell (each goal says
    /// why its own).
    pub fn judge(passes: bool, noise: u64, tolerance: u64) -> Self {
        if !passes {
            Self::No
        } else if noise > tolerance {
            Self::CannotTell
        } else {
            Self::Yes
        }
    }

    /// A quarter of `cost`: the tolerance of a goal that compares costs of
    /// that size (a noise above it could hide a difference of a quarter).
    pub fn quarter_of(cost: i64) -> u64 {
        cost.unsigned_abs() / 4
    }

    pub fn word(self) -> &'static str {
        match self {
            Self::Yes => "yes",
            Self::No => "no",
            Self::CannotTell => "cannot tell: too noisy",
        }
    }

    /// Over every comparison of a goal: one "no" fails it; it is met
    /// only when every comparison could tell.
    pub fn goal(all: &[Self]) -> &'static str {
        if all.contains(&Self::No) {
            "not met"
        } else if all.contains(&Self::CannotTell) {
            "not shown (too noisy to tell)"
        } else {
            "met"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_drowned_in_noise_is_not_a_pass() {
        use Comparison::{CannotTell, No, Yes};
        assert_eq!(Comparison::judge(true, 10, 40), Yes);
        assert_eq!(Comparison::judge(true, 41, 40), CannotTell);
        assert_eq!(Comparison::judge(false, 0, 40), No);
        assert_eq!(Comparison::judge(false, 500, 40), No);
        assert_eq!(Comparison::quarter_of(-400), 100);
        assert_eq!(Comparison::goal(&[Yes, Yes]), "met");
        assert_eq!(
            Comparison::goal(&[Yes, CannotTell]),
            "not shown (too noisy to tell)"
        );
        assert_eq!(Comparison::goal(&[CannotTell, No]), "not met");
    }

    #[test]
    fn median_and_p99() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(median(&v), 51); // (50 + 51) / 2 rounded up
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(median(&[1, 2, 3]), 2);
    }

    #[test]
    fn summary_keeps_round_medians() {
        let s = Summary::of(&[vec![1, 2, 3], vec![10, 20, 30]]).expect("samples");
        assert_eq!(s.median, 7); // (3 + 10) / 2 rounded up
        assert_eq!(s.round_medians, [2, 20]);
        assert_eq!(s.round_spread(), 18);
        let runs = Summary::of(&[vec![10], vec![11], vec![12], vec![13], vec![500]]).expect("runs");
        assert_eq!(runs.run_iqr(), 2); // 13 - 11: the 500 does not count
        assert_eq!(runs.round_spread(), 490);
        assert!(Summary::of(&[vec![]]).is_none());
        assert_eq!(added(5, 7), -2);
    }
}
