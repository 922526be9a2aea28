//! The load of a fleet bench's service: a forked child in the service's
//! cgroup calling UDP connect() at a paced rate, each call to a loopback
//! destination chosen by its index. A UDP connect() runs the connect hook
//! and gives one verdict (no datagram goes out, so nothing answers with
//! ICMP); a destination's first call is a record, its later calls are
//! counted by the kernel and summarised every `[flows] interval_secs`.
//! Either way the exporter sums them into one `flows` row per destination
//! and batch interval.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::bench::fork;

/// The destination ports: `FIRST_PORT..FIRST_PORT + PORTS`. The policies
/// allow UDP to 127.0.0.0/8 on these.
pub const FIRST_PORT: u16 = 6000;
pub const PORTS: u32 = 1024;

/// What the policy of a bench service says: UDP to the destinations.
pub fn policy(cgroup_rel: &str) -> String {
    format!(
        "cgroup = \"/{cgroup_rel}\"\nmode = \"enforce\"\n[[egress]]\nto = [\"127.0.0.0/8\"]\n\
         ports = [\"{FIRST_PORT}-{}\"]\nprotocol = \"udp\"\n",
        u32::from(FIRST_PORT) + PORTS - 1
    )
}

/// Destination `m`, spread pseudo-randomly over 127.0.0.1-127.64.0.0 and
/// the allowed ports (as a fleet's peers are, rather than in the sorting
/// key's order, which would compress unrealistically well): `m` times an
/// odd number modulo 2^32 is a permutation, so destinations `0..2^32` are
/// all distinct; its top 22 bits pick the address, the low 10 the port.
pub fn destination(m: u64) -> SocketAddrV4 {
    // Every load here makes far fewer than 2^32 destinations.
    let x = u32::try_from(m & u64::from(u32::MAX))
        .unwrap_or(0)
        .wrapping_mul(0x9e37_79b1);
    let host = (x >> 10) + 1;
    let port = u16::try_from(x & (PORTS - 1)).unwrap_or(0) + FIRST_PORT;
    SocketAddrV4::new(Ipv4Addr::from(0x7f00_0000 | host), port)
}

/// A load: `calls` calls at `rate` per second, for at most `run`; call
/// `n` goes to `destination(n % cycle)` (`cycle` `u64::MAX`: every call to
/// a new destination).
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub rate: u64,
    pub calls: u64,
    pub run: Duration,
    pub cycle: u64,
}

/// A running load generator; killed and reaped on drop if not finished.
pub struct Generator {
    pid: libc::pid_t,
    count: Option<OwnedFd>,
}

/// Calls between two looks at the clock: the child sleeps until the batch
/// is due instead of spinning, so it takes little of the machine's two
/// cores from the agents it feeds.
const BURST: u64 = 50;

impl Generator {
    /// Forks the child into `cgroup`. xtask must be single-threaded here
    /// (checked), so the child may allocate; it ends with `_exit`.
    pub fn start(cgroup: &Path, load: Load) -> Result<Self> {
        fork::ensure_single_threaded()?;
        let (rd, wr) = fork::pipe()?;
        // SAFETY: the process has one thread (checked above); the child
        // only runs `child` and exits.
        let pid = unsafe { libc::fork() };
        ensure!(pid >= 0, "fork the load generator");
        if pid == 0 {
            drop(rd);
            let n = child(cgroup, load).unwrap_or(u64::MAX);
            let bytes = n.to_le_bytes();
            // SAFETY: writing 8 bytes from a live buffer to our pipe end.
            unsafe {
                libc::write(wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0)
            }
        }
        drop(wr);
        Ok(Self {
            pid,
            count: Some(rd),
        })
    }

    /// Waits for the child to end; how many calls it made.
    pub fn finish(mut self) -> Result<u64> {
        let rd = self
            .count
            .take()
            .context("the generator was finished already")?;
        let mut buf = [0u8; 8];
        let read = std::fs::File::from(rd).read_exact(&mut buf);
        fork::wait(self.pid)?;
        self.pid = 0;
        read.context("read the load generator's count")?;
        let n = u64::from_le_bytes(buf);
        ensure!(
            n != u64::MAX,
            "the load generator failed (connect() refused?)"
        );
        Ok(n)
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own child, not reaped yet.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = fork::wait(self.pid);
        }
    }
}

fn child(cgroup: &Path, load: Load) -> Result<u64> {
    fork::join_cgroup(cgroup)?;
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let start = Instant::now();
    let mut n = 0u64;
    while n < load.calls {
        if n.is_multiple_of(BURST) {
            let elapsed = start.elapsed();
            if elapsed >= load.run {
                break;
            }
            // Call n is due at n / rate seconds.
            let due = Duration::from_secs_f64(n as f64 / load.rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(elapsed) {
                thread::sleep(wait);
            }
        }
        let m = if load.cycle == u64::MAX {
            n
        } else {
            n % load.cycle
        };
        sock.connect(destination(m))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_first_million_destinations_are_distinct_loopback_and_allowed() {
        let mut seen = HashSet::new();
        for m in 0..1_000_000 {
            let d = destination(m);
            assert!(seen.insert(d), "destination {m} = {d} repeats");
            let o = d.ip().octets();
            assert_eq!(o[0], 127, "{d}");
            assert!(
                *d.ip() != Ipv4Addr::new(127, 255, 255, 255) && o[1..] != [0, 0, 0],
                "{d}"
            );
            assert!((FIRST_PORT..FIRST_PORT + 1024).contains(&d.port()), "{d}");
        }
    }
}
