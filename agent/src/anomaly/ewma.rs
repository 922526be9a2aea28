//! An exponentially weighted moving average: one number per baseline.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    /// Expected value per interval.
    pub mean: f64,
    /// Samples folded in so far (the first one sets the mean).
    pub samples: u64,
}

impl Ewma {
    /// Folds in one interval's value with weight `alpha`.
    pub fn update(&mut self, value: f64, alpha: f64) {
        if self.samples == 0 {
            self.mean = value;
        } else {
            self.mean += alpha * (value - self.mean);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// True when `observed` is at least `factor` times the mean and at
    /// least `floor` (so a quiet service does not alert on 1 -> 10).
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn spike(&self, observed: u64, factor: u64, floor: u64) -> bool {
        observed >= floor && observed as f64 >= factor as f64 * self.mean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_the_mean_then_it_moves_by_alpha() {
        let mut e = Ewma::default();
        e.update(10.0, 0.5);
        assert!((e.mean - 10.0).abs() < 1e-9);
        e.update(20.0, 0.5);
        assert!((e.mean - 15.0).abs() < 1e-9);
        assert_eq!(e.samples, 2);
    }

    #[test]
    fn spike_needs_factor_and_floor() {
        let e = Ewma {
            mean: 10.0,
            samples: 5,
        };
        assert!(!e.spike(99, 10, 50), "9.9x is below 10x");
        assert!(e.spike(100, 10, 50), "exactly 10x alerts");
        let quiet = Ewma {
            mean: 1.0,
            samples: 5,
        };
        assert!(!quiet.spike(10, 10, 50), "1 -> 10 is below the floor");
    }
}
