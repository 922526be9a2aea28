//! Everything that talks to the kernel: compiling the policy into map
//! values, loading and attaching the programs, writing the maps.

pub mod compile;
pub mod layout;
mod error;
mod loader;
mod maps;
pub mod preflight;

pub use compile::{compile, CompiledPolicy, CompiledService};
pub use error::KernelError;
pub use loader::{Coverage, Enforcer, LoadOptions, PROGRAM_NAMES};
pub use maps::ResolvedService;
