//! Everything that crosses the kernel/userspace boundary: map names, sizes
//! and the `#[repr(C)]` values stored in the maps.
//!
//! Both sides compile this crate: the eBPF programs (no_std, bpf target) and
//! the daemon (with the `user` feature, which implements `aya::Pod`). Every
//! struct has explicit padding fields so that every byte is initialised;
//! `layout.rs` checks sizes and padding when the crate compiles.
#![no_std]

pub mod dns;
pub mod event;
pub mod flow;
pub mod globals;
mod layout;
pub mod maps;
pub mod policy;
pub mod process;
pub mod unit;

pub use dns::*;
pub use event::*;
pub use flow::*;
pub use maps::*;
pub use policy::*;
pub use process::*;
pub use unit::*;
