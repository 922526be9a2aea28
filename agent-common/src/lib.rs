//! Everything that crosses the kernel/userspace boundary: map names, sizes
//! and the `#[repr(C)]` values stored in the maps.
//!
//! Both sides compile this crate: the eBPF programs (no_std, bpf target) and
//! the daemon (with the `user` feature, which implements `aya::Pod`). Every
//! struct has explicit padding fields so that every byte is initialised.
#![no_std]

pub mod event;
pub mod maps;
pub mod policy;
pub mod unit;

pub use event::*;
pub use maps::*;
pub use policy::*;
pub use unit::*;
