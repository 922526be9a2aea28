//! The local control socket: the daemon serves it, the CLI talks to it.
//!
//! - `protocol`: the versioned JSON-lines request/reply format
//! - `server`: the daemon's side (root-only socket, one task per client)
//! - `client`: the CLI's side (blocking)
//! - `flows`: `bulkhead flows`; `table`: its table layout

pub mod admin;
pub mod client;
pub mod flows;
pub mod protocol;
pub mod server;
pub mod table;

pub use server::{ensure_free, Server, ServerError};
