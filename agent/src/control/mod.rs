//! The local control socket: the daemon serves it, the CLI talks to it.
//!
//! - `protocol`: the versioned JSON-lines request/reply format
//! - `server`: the daemon's side (root-only socket, one task per client)
//! - `client`: the CLI's side (blocking); the commands themselves are in
//!   `cli/`

pub mod client;
pub mod protocol;
pub mod server;

pub use server::{ensure_free, Server, ServerError};
