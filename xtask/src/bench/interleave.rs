//! Probes of several managed cgroups from one load generator, interleaved
//! in blocks, for differences of a few nanoseconds between services under
//! one agent (names.rs: a learnt name against an address rule).
//!
//! Run one after the other, each case's run median moves by more than
//! such a difference (another netns, another moment of a shared host: a
//! few hundred ns here on 2026-12-07). Here one process, in one network
//! namespace with one pair of peers, moves between the cgroups: a block
//! of calls in each, in the order A B C, then C B A, and so on, so that the
//! blocks of a pair ran next to each other and a drift in time weighs on
//! both alike. The comparison is then made block by block.

use std::path::Path;

use anyhow::Result;

use super::{
    fork::join_cgroup,
    loadgen::{check_verdicts, enter_netns, in_child, Peers, Probe, Samples},
};

/// Measured blocks of each probe in each cgroup.
pub const BLOCKS: usize = 20;

/// Untimed calls after each move into a cgroup (the first calls there
/// find colder caches), and a whole unmeasured pass before the blocks.
pub fn settle(probe: Probe) -> usize {
    match probe {
        Probe::TcpConnect => 2,
        Probe::UdpConnect | Probe::UdpSendto => 20,
    }
}

/// One interleaved run.
pub struct Spec<'a> {
    /// Managed cgroups: every one must refuse a port no rule allows.
    pub cgroups: &'a [&'a Path],
    /// The network namespace the probes and their peers run in.
    pub netns: &'a Path,
    pub udp_iterations: usize,
    pub tcp_iterations: usize,
}

impl Spec<'_> {
    /// Calls in each measured block of `probe`.
    pub fn block_len(&self, probe: Probe) -> usize {
        let iterations = match probe {
            Probe::TcpConnect => self.tcp_iterations,
            Probe::UdpConnect | Probe::UdpSendto => self.udp_iterations,
        };
        (iterations / BLOCKS).max(1)
    }
}

/// The samples of each cgroup, in `spec.cgroups`' order; each probe's
/// samples are its `BLOCKS` blocks of `block_len` calls, in block order.
pub fn run(spec: &Spec<'_>) -> Result<Vec<Samples>> {
    in_child(|| probe_interleaved(spec))
}

fn probe_interleaved(spec: &Spec<'_>) -> Result<Vec<Samples>> {
    enter_netns(spec.netns)?;
    // Opened in the caller's cgroup: an unmanaged local server.
    let peers = Peers::open()?;
    for cgroup in spec.cgroups {
        join_cgroup(cgroup)?;
        check_verdicts(true)?;
    }
    let n = spec.cgroups.len();
    let mut out: Vec<Samples> = (0..n)
        .map(|_| Samples([Vec::new(), Vec::new(), Vec::new()]))
        .collect();
    for probe in Probe::ALL {
        let len = spec.block_len(probe);
        // Pass 0 is the warm-up, discarded.
        for pass in 0..=BLOCKS {
            let order: Vec<usize> = if pass % 2 == 0 {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            };
            for i in order {
                join_cgroup(spec.cgroups[i])?;
                peers.probe(probe, settle(probe))?;
                let block = peers.probe(probe, len)?;
                if pass > 0 {
                    out[i].0[probe.index()].extend(block);
                }
            }
        }
    }
    Ok(out)
}

/// The interquartile mean (the mean of the middle half) of each block of
/// `len` samples, in block order. Not the median: the clock here steps by
/// 10 ns, so a block's median moves in steps of 10 ns and cannot see a
/// smaller difference, while the mean of the middle half, over calls
/// that fall either side of a step, can; and it leaves the tails out as
/// the median does.
pub fn block_centres(samples: &[u64], len: usize) -> Vec<u64> {
    samples
        .chunks(len.max(1))
        .map(|block| {
            let mut block = block.to_vec();
            block.sort_unstable();
            let middle = &block[block.len() / 4..block.len() - block.len() / 4];
            let sum: u64 = middle.iter().sum();
            sum.div_ceil(middle.len() as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_split_in_order() {
        // Blocks of 4: the middle two of each, averaged (rounded up).
        assert_eq!(block_centres(&[5, 1, 3, 100, 10, 30, 20, 0], 4), [4, 15]);
        assert_eq!(block_centres(&[7, 9, 8], 3), [8]);
        assert!(block_centres(&[], 3).is_empty());
        let spec = Spec {
            cgroups: &[],
            netns: Path::new("/"),
            udp_iterations: 20_000,
            tcp_iterations: 10,
        };
        assert_eq!(spec.block_len(Probe::UdpConnect), 1_000);
        assert_eq!(spec.block_len(Probe::TcpConnect), 1);
    }
}
