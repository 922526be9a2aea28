//! Grouping: one event when an anomaly starts, then at most one update per
//! `update_every` intervals while it persists; it ends after
//! `quiet_intervals` intervals without it.

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Group {
    active: bool,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Intervals in which the detector fired since `first_seen`.
    pub count: u64,
    since_emit: u64,
    quiet: u64,
}

/// Whether a firing is reported, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    Started,
    Ongoing,
}

impl Emit {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Emit::Started => "started",
            Emit::Ongoing => "ongoing",
        }
    }
}

impl Group {
    /// The detector fired in the interval ending at `now`.
    pub fn fire(&mut self, now: u64, update_every: u64) -> Option<Emit> {
        if !self.active {
            *self = Group {
                active: true,
                first_seen: now,
                last_seen: now,
                count: 1,
                since_emit: 0,
                quiet: 0,
            };
            return Some(Emit::Started);
        }
        self.last_seen = now;
        self.count += 1;
        self.quiet = 0;
        self.since_emit += 1;
        if self.since_emit >= update_every {
            self.since_emit = 0;
            Some(Emit::Ongoing)
        } else {
            None
        }
    }

    /// The detector did not fire in this interval.
    pub fn calm(&mut self, quiet_intervals: u64) {
        if self.active {
            self.quiet += 1;
            if self.quiet >= quiet_intervals {
                self.active = false;
            }
        }
    }

    #[cfg(test)]
    #[must_use]
    pub fn active(&self) -> bool {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_once_updates_every_n_and_ends_when_quiet() {
        let mut g = Group::default();
        assert_eq!(g.fire(60, 3), Some(Emit::Started));
        assert_eq!(g.fire(120, 3), None);
        assert_eq!(g.fire(180, 3), None);
        assert_eq!(g.fire(240, 3), Some(Emit::Ongoing));
        assert_eq!((g.first_seen, g.last_seen, g.count), (60, 240, 4));
        g.calm(2);
        assert!(g.active(), "one quiet interval is not enough");
        assert_eq!(g.fire(360, 3), None, "still the same anomaly");
        g.calm(2);
        g.calm(2);
        assert!(!g.active());
        assert_eq!(g.fire(600, 3), Some(Emit::Started));
    }
}
