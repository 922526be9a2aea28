//! What one detector reports for one service and interval.

/// The detectors, in a fixed order (array index of per-kind state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    RateSpike,
    NewDestination,
    FanOut,
    DenyBurst,
    VolumeSpike,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::RateSpike,
        Kind::NewDestination,
        Kind::FanOut,
        Kind::DenyBurst,
        Kind::VolumeSpike,
    ];

    /// The `anomaly.kind` field and the metric's `kind` label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RateSpike => "rate_spike",
            Kind::NewDestination => "new_destination",
            Kind::FanOut => "fan_out",
            Kind::DenyBurst => "deny_burst",
            Kind::VolumeSpike => "volume_spike",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
        }
    }

    /// By how far `observed` passed `threshold`: 4x or more is high, 2x
    /// medium, less low.
    #[must_use]
    pub fn of_ratio(observed: f64, threshold: f64) -> Self {
        let r = if threshold > 0.0 {
            observed / threshold
        } else {
            f64::INFINITY
        };
        if r >= 4.0 {
            Severity::High
        } else if r >= 2.0 {
            Severity::Medium
        } else {
            Severity::Low
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub kind: Kind,
    pub severity: Severity,
    /// Expected value per window (EWMA or threshold).
    pub baseline: f64,
    pub observed: f64,
    pub samples: Vec<String>,
}
