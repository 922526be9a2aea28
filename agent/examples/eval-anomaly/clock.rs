//! When events happen inside a simulated interval: background traffic at
//! random seconds, an attack evenly from the second it starts (a steady
//! attacker); and the time-to-detect figures.

use bulkhead::events::FlowEvent;

use super::rng::Rng;

/// Events stamped with their second in the interval.
pub type Timed = Vec<(u64, FlowEvent)>;

/// Moves `events` into `out`, each at a random second of an interval of
/// `len` seconds.
#[expect(clippy::cast_possible_truncation, reason = "seconds of an interval")]
pub fn scatter(rng: &mut Rng, len: u64, events: &mut Vec<FlowEvent>, out: &mut Timed) {
    for ev in events.drain(..) {
        out.push((rng.below(len as usize) as u64, ev));
    }
}

/// Moves `events` into `out`, evenly over seconds `from..len`, in order.
pub fn spread(from: u64, len: u64, events: &mut Vec<FlowEvent>, out: &mut Timed) {
    let n = events.len() as u64;
    let span = len.saturating_sub(from).max(1);
    for (k, ev) in (0..).zip(events.drain(..)) {
        out.push((from + k * span / n.max(1), ev));
    }
}

/// The median (the mean of the middle two for an even count) and the
/// worst of `seconds`; `None` when empty.
#[must_use]
#[expect(clippy::cast_precision_loss, reason = "seconds")]
pub fn median_and_worst(seconds: &[u64]) -> Option<(f64, u64)> {
    let mut v = seconds.to_vec();
    v.sort_unstable();
    let n = v.len();
    let worst = *v.last()?;
    let median = if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
    };
    Some((median, worst))
}

#[cfg(test)]
mod tests {
    use super::median_and_worst;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median_and_worst(&[]), None);
        assert_eq!(median_and_worst(&[9, 1, 5]), Some((5.0, 9)));
        assert_eq!(median_and_worst(&[4, 2]), Some((3.0, 4)));
    }
}
