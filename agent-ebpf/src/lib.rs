//! Shared pieces of bulkhead's kernel programs. The programs themselves are
//! in `main.rs` (the binary aya loads); this library exists so that the
//! daemon can name this crate as a build-dependency (cargo then rebuilds the
//! daemon when the programs change).
#![cfg_attr(target_arch = "bpf", no_std)]
