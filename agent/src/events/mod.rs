//! The event pipeline: kernel ring buffer -> decoded [`FlowEvent`] -> the
//! JSON-lines decision log, live subscribers (`bulkhead flows`) and a short
//! history of recent events.

mod decode;
mod hub;
mod model;
mod reader;
mod sink;

pub use decode::{Decoder, Names};
pub use hub::{EventStats, Hub};
pub use model::{
    AnomalyRecord, ChangeRecord, Direction, EventType, Evidence, FileChange, FlowEvent,
    ServiceChange, Verdict, SCHEMA,
};
pub use reader::spawn_reader;
pub use sink::Sink;
