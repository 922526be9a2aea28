//! Everything that talks to the kernel: compiling the policy into map
//! values, loading and attaching the programs, writing the maps.

pub mod compile;
pub mod drift;
mod error;
mod fault;
pub mod flow_table;
pub mod layout;
mod loader;
mod maps;
pub mod pins;
pub mod preflight;
mod quiesce;
mod raw_link;
pub mod udp_peers;
#[cfg(test)]
mod verdict_model;

pub use compile::{compile, CompiledPolicy, CompiledService};
pub use error::KernelError;
pub use loader::{Coverage, Enforcer, LoadOptions};
pub use maps::{Change, ResolvedService};
pub use quiesce::quiesce;
