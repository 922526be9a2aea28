//! The service graph (docs/graph.md): flows aggregated into who talks to
//! whom, kept bounded, saved in the state directory; blast radius reports
//! and exports built from it.
//!
//! - `model`, `node`: the graph fed event by event (caps, eviction,
//!   folding) and its keys and values
//! - `store`: sharing, the aggregator task, load and save
//! - `listeners`: listeners of services that predate the agent, from `/proc`
//! - `view`: nodes and edges as exported (listeners resolved to services)
//! - `blast`, `report`: blast radius of one service, and as text
//! - `named`: destinations reached by DNS name, listed by that name
//! - `export`: DOT and Mermaid
//! - `page`: the HTML page of the metrics listener
//! - `learn`: a policy allowing what a service was observed doing
//! - `requests`: the control-socket requests (their commands are in `cli/`)

pub mod blast;
pub mod export;
pub mod learn;
mod listeners;
pub mod model;
pub mod named;
mod node;
pub mod page;
pub mod report;
pub mod requests;
pub mod store;
#[cfg(test)]
pub(crate) mod tests;
mod time;
pub mod view;

pub use model::{Dest, EdgeStats, Graph, Source};
pub use store::Shared;
pub use time::{ago, at_or_after, now};
