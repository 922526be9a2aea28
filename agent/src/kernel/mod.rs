//! Everything that talks to the kernel: compiling the policy into map
//! values, loading and attaching the programs, writing the maps.

pub mod addr_maps;
pub mod compile;
pub mod dns_maps;
pub mod drift;
mod error;
pub mod executables;
mod fault;
pub mod flow_table;
pub mod layout;
mod loader;
mod map_access;
mod maps;
pub mod pins;
pub mod preflight;
mod process_table;
mod quiesce;
mod raw_link;
pub mod sock_owners;
pub mod udp_peers;
#[cfg(test)]
mod verdict_model;

pub use compile::{compile, CompiledPolicy, CompiledService};
pub use error::KernelError;
pub use loader::{Coverage, Enforcer, LoadOptions};
pub use maps::{Change, ResolvedService};
pub use quiesce::quiesce;

/// One policy file's text, compiled (for the kernel modules' tests).
#[cfg(test)]
pub(crate) fn compiled_from(text: &str) -> CompiledPolicy {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("svc.toml"), text).expect("write");
    let set = crate::policy::load_dir(dir.path()).expect("valid");
    compile(&set).expect("compiles")
}
