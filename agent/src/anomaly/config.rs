//! The `[anomaly]` section of the daemon's config (docs/config.md).
//! Integers only, so the config stays `Eq` and exact.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Runs the detectors at all.
    pub enabled: bool,
    /// Length of one counting interval (the detectors' window), seconds.
    pub interval_s: u64,
    /// Intervals a service is observed before baseline detectors (rate,
    /// volume, new destination) may alert.
    pub warmup_intervals: u64,
    /// Weight of the baselines: an EWMA over about this many intervals.
    pub baseline_intervals: u64,
    /// While an anomaly persists, at most one update event per this many
    /// intervals.
    pub update_every: u64,
    /// A grouped anomaly ends after this many intervals without it.
    pub quiet_intervals: u64,
    /// Also write anomaly events to this file (JSON lines); "" for none.
    pub sink: String,
    /// Services tracked at most; more are ignored (and counted).
    pub max_services: usize,
    /// Known destinations remembered per service.
    pub max_known_destinations: usize,
    /// Distinct hosts and ports counted per service and interval.
    pub max_window_destinations: usize,
    pub rate_spike: RateSpike,
    pub new_destination: NewDestination,
    pub fan_out: FanOut,
    pub deny_burst: DenyBurst,
    pub volume_spike: VolumeSpike,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_s: 60,
            warmup_intervals: 60,
            baseline_intervals: 30,
            update_every: 10,
            quiet_intervals: 3,
            sink: String::new(),
            max_services: 1024,
            max_known_destinations: 4096,
            max_window_destinations: 256,
            rate_spike: RateSpike::default(),
            new_destination: NewDestination::default(),
            fan_out: FanOut::default(),
            deny_burst: DenyBurst::default(),
            volume_spike: VolumeSpike::default(),
        }
    }
}

/// Connections per interval against the EWMA baseline.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RateSpike {
    pub enabled: bool,
    /// Alert at `factor` x baseline ...
    pub factor: u64,
    /// ... and at least this many connections in the interval.
    pub min_count: u64,
}

impl Default for RateSpike {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: 10,
            min_count: 100,
        }
    }
}

/// A destination (address group, port, protocol) never seen before.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NewDestination {
    pub enabled: bool,
    /// Addresses are grouped by this prefix length (32: each address).
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

impl Default for NewDestination {
    fn default() -> Self {
        Self {
            enabled: true,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

/// Many distinct destinations in one interval (host sweep, port scan).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FanOut {
    pub enabled: bool,
    /// Alert above this many distinct remote addresses ...
    pub max_hosts: u64,
    /// ... or above this many distinct remote ports.
    pub max_ports: u64,
}

impl Default for FanOut {
    fn default() -> Self {
        Self {
            enabled: true,
            max_hosts: 50,
            max_ports: 25,
        }
    }
}

/// Denied (or, in audit mode, would-be denied) attempts in one interval.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DenyBurst {
    pub enabled: bool,
    /// Alert at this many denied attempts in an interval.
    pub threshold: u64,
}

impl Default for DenyBurst {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 20,
        }
    }
}

/// Bytes sent by TCP connections (open ones' summaries, closes) per
/// interval against the baseline.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeSpike {
    pub enabled: bool,
    pub factor: u64,
    /// At least this many bytes in the interval.
    pub min_bytes: u64,
}

impl Default for VolumeSpike {
    fn default() -> Self {
        Self {
            enabled: true,
            factor: 10,
            min_bytes: 10_000_000,
        }
    }
}

impl AnomalyConfig {
    /// Every problem at once, as "key: why" lines.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut need = |ok: bool, what: &str| {
            if !ok {
                out.push(what.to_string());
            }
        };
        need(
            self.interval_s >= 1,
            "anomaly.interval_s: must be at least 1",
        );
        need(
            self.baseline_intervals >= 1,
            "anomaly.baseline_intervals: must be at least 1",
        );
        need(
            self.update_every >= 1,
            "anomaly.update_every: must be at least 1",
        );
        need(
            self.quiet_intervals >= 1,
            "anomaly.quiet_intervals: must be at least 1",
        );
        need(
            self.max_services >= 1,
            "anomaly.max_services: must be at least 1",
        );
        need(
            self.new_destination.ipv4_prefix <= 32,
            "anomaly.new_destination.ipv4_prefix: at most 32",
        );
        need(
            self.new_destination.ipv6_prefix <= 128,
            "anomaly.new_destination.ipv6_prefix: at most 128",
        );
        let window = self.max_window_destinations as u64;
        need(
            window > self.fan_out.max_hosts && window > self.fan_out.max_ports,
            "anomaly.max_window_destinations: must exceed fan_out.max_hosts and fan_out.max_ports",
        );
        need(
            self.rate_spike.factor >= 1,
            "anomaly.rate_spike.factor: at least 1",
        );
        need(
            self.volume_spike.factor >= 1,
            "anomaly.volume_spike.factor: at least 1",
        );
        need(
            self.deny_burst.threshold >= 1,
            "anomaly.deny_burst.threshold: at least 1",
        );
        out
    }

    /// EWMA weight of one interval.
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    pub fn alpha(&self) -> f64 {
        2.0 / (self.baseline_intervals.max(1) as f64 + 1.0)
    }
}
