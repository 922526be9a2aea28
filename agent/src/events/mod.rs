//! The event pipeline: kernel ring buffer -> decoded [`FlowEvent`] -> the
//! JSON-lines decision log, the taps (graph, detectors), live subscribers
//! (`bulkhead flows`, export) and a short history of recent events.

mod decode;
mod group;
pub mod host;
mod hub;
mod json;
mod model;
mod reader;
mod sink;
mod stats;
mod writer;

pub use decode::{Decoder, Names};
pub use group::group_id;
pub use hub::{Hub, Stage, Tap};
#[cfg(test)]
pub(crate) use model::sample_verdict;
pub use model::{
    monotonic_ns, AnomalyRecord, ChangeRecord, Direction, EventType, Evidence, FileChange,
    FlowEvent, ServiceChange, Verdict, SCHEMA,
};
pub use reader::spawn_reader;
pub use sink::Sink;
pub use stats::EventStats;
