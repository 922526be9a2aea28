//! Property test of the policy compiler (issue #14): the verdict the
//! kernel programs would reach by looking things up in the compiled map
//! contents (`kernel`) must equal the verdict a naive reading of the policy
//! model gives (`naive`, the semantics docs/policy.md states), over random
//! policies and destinations (`strategy`, `props`).
//!
//! Test-only: nothing here is in the shipped binary.

mod kernel;
mod naive;
mod props;
mod strategy;

use std::net::IpAddr;

/// The protocol of a judged call, as the hooks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    /// A ping socket's echo (ICMP or ICMPv6).
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `addr`/`port` are the destination of a connect()/sendmsg().
    Egress,
    /// `addr` is the peer's source address, `port` the local port.
    Ingress,
}

/// One call to judge for the service with index `service` in the set.
#[derive(Debug, Clone, Copy)]
pub struct Query {
    pub service: usize,
    pub direction: Direction,
    pub proto: Proto,
    pub addr: IpAddr,
    pub port: u16,
    /// The caller's executable (for ingress: the receiving socket's
    /// binder): an index in `strategy::EXECUTABLES`, or None for one no
    /// rule names.
    pub exe: Option<usize>,
    /// The caller's user id.
    pub uid: u32,
}

/// What happens to a call. `Allow` names the rule (its index in the
/// file's `[[egress]]` or `[[ingress]]` list) that decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow(usize),
    Deny,
    /// Audit mode: no rule allowed it, it goes through and is recorded.
    Audit,
    /// Inbound traffic of a service with no `ingress` list: not judged.
    NotJudged,
}
