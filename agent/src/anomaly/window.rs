//! One service's counters for the current interval: fixed-size numbers
//! and capped sets, cleared (keeping their memory) at every tick.

use std::net::IpAddr;

use super::{
    dest::{Bounded, DestKey, Samples},
    finding::{Kind, Severity},
};

/// Initial room of the per-interval sets; they grow to their cap once and
/// keep that memory across intervals.
const PREALLOC: usize = 32;

#[derive(Debug, Clone)]
pub struct Window {
    /// Outbound attempts (connect/sendmsg verdicts), any verdict.
    pub conns: u64,
    /// Denied (or would-be denied, in audit mode) attempts.
    pub denies: u64,
    /// Bytes sent by outbound TCP connections: open ones' per-interval
    /// summaries and what a close adds to them.
    pub bytes: u64,
    pub hosts: Bounded<IpAddr>,
    pub ports: Bounded<u16>,
    /// Destinations not in the service's known set.
    pub new_dests: Bounded<DestKey>,
    pub conn_samples: Samples,
    pub deny_samples: Samples,
    pub byte_samples: Samples,
    /// Kinds already reported in this interval by an early check, with
    /// the severity reported (by `Kind as usize`): the interval's end does
    /// not report them again unless the severity rose.
    reported: [Option<Severity>; Kind::ALL.len()],
}

impl Window {
    #[must_use]
    pub fn new(cap: usize) -> Self {
        Self {
            conns: 0,
            denies: 0,
            bytes: 0,
            hosts: Bounded::with_room(cap, PREALLOC),
            ports: Bounded::with_room(cap, PREALLOC),
            new_dests: Bounded::with_room(cap, PREALLOC),
            conn_samples: Samples::new(),
            deny_samples: Samples::new(),
            byte_samples: Samples::new(),
            reported: [None; Kind::ALL.len()],
        }
    }

    pub fn clear(&mut self) {
        self.conns = 0;
        self.denies = 0;
        self.bytes = 0;
        self.hosts.clear();
        self.ports.clear();
        self.new_dests.clear();
        self.conn_samples.clear();
        self.deny_samples.clear();
        self.byte_samples.clear();
        self.reported = [None; Kind::ALL.len()];
    }

    /// The severity an early check reported `kind` with in this interval.
    #[must_use]
    pub fn reported(&self, kind: Kind) -> Option<Severity> {
        self.reported[kind as usize]
    }

    pub fn mark_reported(&mut self, kind: Kind, severity: Severity) {
        self.reported[kind as usize] = Some(severity);
    }
}
