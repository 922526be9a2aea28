//! The escape suite: every technique a compromised managed service might try
//! to get around its policy, one test each, each asserting the exact outcome
//! (an errno at a named step, a connection that never completes, a datagram
//! that never arrives). `docs/threat-model.md` lists each technique with the
//! test here that proves its status; a new technique found later becomes
//! one more test in this folder.
//!
//! - `sockets`: which socket kinds a service may create (raw, ping,
//!   protocols without socket-address hooks).
//! - `egress`: ways to reach a destination the policy does not allow
//!   (address forms, send paths, source routing, processes and threads,
//!   `io_uring`, sockets received from elsewhere).
//! - `ingress`: ways to be reached from a source the policy does not allow
//!   (IPv6 extension headers, listeners the service did not create,
//!   listeners `[bind]` never allowed).
//! - `noise`: floods of denials.
//! - `pinholes`: UDP reply pinholes that should close (unused for the idle
//!   timeout, no longer allowed after a reload) or never open (past a
//!   service's bound).

mod egress;
mod ingress;
mod noise;
mod pinholes;
mod sockets;
