//! Egress rules by DNS name (issue 19; a design in progress, not wired
//! into the daemon: docs/dns-names.md). The parts that need no kernel:
//!
//! - `name`: name patterns (`api.example.com`, `*.example.com`,
//!   `**.example.com`), parsed and matched
//! - `answer`: a client's query and its resolver's answer (wire format by
//!   the `domain` crate): question, match, truncation, addresses on the
//!   question's CNAME chain
//! - `learnt`: addresses learnt per (service, name), bounded, expiring;
//!   the agent's copy of the kernel's learnt-address map
//! - `listen`: the proxy's sockets, bound by the agent or passed by the
//!   service manager (they then outlive the agent)
//! - `mark`: each UDP query's mark, which says which service sent it
//! - `observed`: names answered to services that only have their
//!   lookups observed (no name rules), for their events
//! - `proxy`: the loopback DNS proxy that forwards a service's queries to
//!   its own resolver and learns from the answers before passing them on
//! - `saved`: the learnt cache's entries saved for the next agent
//! - `serve`: the proxy in the daemon, wired to the kernel's maps
//! - `host`: host set-ups whose lookups bypass the proxy (nss-resolve,
//!   nscd), warned about when it starts

pub mod answer;
pub mod host;
pub mod learnt;
pub mod listen;
pub mod mark;
pub mod name;
pub mod observed;
pub mod proxy;
pub mod saved;
pub mod serve;
