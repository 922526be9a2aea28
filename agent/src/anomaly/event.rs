//! An [`Anomaly`] as a decision-log event (docs/events.md, docs/anomaly.md).

use std::time::{Duration, UNIX_EPOCH};

use super::detector::Anomaly;
use crate::events::{AnomalyRecord, EventType, Evidence, FlowEvent};

fn rfc3339(unix_s: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_s)).to_string()
}

/// Two decimals are plenty for a baseline and keep the log readable.
fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[must_use]
pub fn to_event(a: &Anomaly) -> FlowEvent {
    let f = &a.finding;
    FlowEvent {
        service: Some(a.service.as_str().into()),
        anomaly: Some(AnomalyRecord {
            kind: f.kind.as_str().to_string(),
            severity: f.severity.as_str().to_string(),
            state: a.emit.as_str().to_string(),
            evidence: Evidence {
                baseline: round(f.baseline),
                observed: round(f.observed),
                window_s: a.window_s,
                sample_destinations: f.samples.clone(),
            },
            first_seen: rfc3339(a.first_seen),
            last_seen: rfc3339(a.last_seen),
            count: a.count,
        }),
        ..FlowEvent::from_agent(EventType::Anomaly, "anomaly")
    }
}
