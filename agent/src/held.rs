//! Sockets a managed service holds but did not create.
//!
//! The packet programs (inbound rules, quarantine, `[bind]` on listeners,
//! pings and source routes on the way out) find a socket's service from the
//! cgroup the socket was *created* in. A listener made by systemd socket
//! activation, inherited from an unmanaged parent or received over a Unix
//! socket (SCM_RIGHTS) was created elsewhere, so by that alone its SYNs
//! would pass every rule of the service that accepts on it. No cgroup hook
//! runs when a process accepts, inherits or receives a socket, so the agent
//! looks, every [`SCAN_INTERVAL`] and before every policy switch:
//!
//! 1. The kernel lists every TCP and UDP socket ([`diag`], one
//!    `NETLINK_SOCK_DIAG` dump per family and protocol) with its inode, its
//!    cookie and the cgroup it was created in.
//! 2. For every managed service, the agent reads the descriptor tables of
//!    every thread of every process in the service's cgroup and below (not
//!    below a nested managed service: that one is its own), keeping the
//!    `socket:[INODE]` links. Threads sharing a table are read once
//!    (kcmp). Nothing is done to the sockets themselves.
//! 3. A socket the service holds whose creator cgroup is not the service's
//!    own (its cgroup or a descendant, minus nested managed services) is
//!    *held*: a listener or a UDP socket (any TCP socket, for a quarantined
//!    service) goes in the kernel's `HELD_SOCKETS` map, cookie -> the
//!    service's cgroup id, where the packet programs look first.
//!
//! An entry is sticky: it stays when no scan sees the holder any more (a
//! process can hide a descriptor from /proc: a thread with its own table,
//! an io_uring fixed file), for as long as the socket lives. The kernel
//! lists no socket that is closed and unbound (a listener shut down, a UDP
//! socket disconnected), though such a socket can be bound or listen again
//! later, so an entry whose socket a dump no longer shows is kept too, as
//! *unseen*; unseen entries are the ones given up first when a service (at
//! most [`PER_SERVICE`] entries) or the map is full. Cookies are never
//! reused, so an entry of a socket that is gone judges nothing else. When
//! two services hold the same foreign socket, the first to be recorded
//! keeps it.
//!
//! A service cannot create a socket that is foreign to it, so it cannot
//! fill its share with sockets of its own making; a socket that does not
//! fit is counted (`bulkhead_held_socket_scan_errors_total{kind=
//! "overflow"}`) and logged, never dropped silently. Until a scan has seen
//! a socket, it is judged by its creator's policy: the window is one
//! interval at most.
//!
//! Reading another user's descriptor tables needs CAP_SYS_PTRACE (the unit
//! grants it for this); a process that cannot be read is logged and counted
//! (`bulkhead_held_socket_scan_errors_total{kind="unreadable"}`), never
//! skipped silently.

use crate::sock_diag as diag;

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// How often the held sockets are looked for.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(500);
/// The most entries one service may have in HELD_SOCKETS.
pub const PER_SERVICE: usize = 1024;
/// A scan taking longer than this is logged (once).
pub const SLOW_SCAN: Duration = Duration::from_millis(100);

/// A managed service to scan.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Relative to the cgroup2 mount.
    pub cgroup_path: &'a str,
    /// The id under which SERVICES knows the service.
    pub cgroup_id: u64,
    /// Every TCP socket (quarantine cuts established connections), not
    /// only listeners.
    pub all_sockets: bool,
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct HeldStats {
    /// Entries in HELD_SOCKETS after the last scan.
    pub sockets: AtomicU64,
    /// Of those, entries whose socket the last dump did not list.
    pub unseen: AtomicU64,
    /// Processes whose descriptors a scan could not read.
    pub scan_errors: AtomicU64,
    /// Held sockets that did not fit (each counted once).
    pub overflow: AtomicU64,
}

impl HeldStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What one scan found wrong, for the caller to log and count.
#[derive(Debug, Default)]
pub struct Report {
    /// Processes whose descriptors could not be read, with why.
    pub unreadable: Vec<(u32, String)>,
    /// Held sockets newly found not to fit, by service cgroup id.
    pub overflow: HashMap<u64, u64>,
    /// The kernel's socket list could not be read: nothing was changed.
    pub dump_error: Option<String>,
    /// How long the scan took.
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    holder: u64,
    /// Which dump lists it.
    dump: Dump,
    /// Whether the last dump listed the socket.
    seen: bool,
    /// The scan that last listed it.
    last_seen: u64,
}

/// The held sockets known so far (what HELD_SOCKETS holds).
#[derive(Debug, Default)]
pub struct Held {
    records: HashMap<u64, Record>,
    /// Sockets already counted as not fitting.
    overflowed: HashSet<u64>,
    scans: u64,
}

/// One of the four dumps: (family, protocol).
type Dump = (libc::c_int, libc::c_int);
const DUMPS: [Dump; 4] = [
    (libc::AF_INET, libc::IPPROTO_TCP),
    (libc::AF_INET, libc::IPPROTO_UDP),
    (libc::AF_INET6, libc::IPPROTO_TCP),
    (libc::AF_INET6, libc::IPPROTO_UDP),
];

/// One socket of the dumps, by inode.
#[derive(Debug, Clone, Copy)]
struct Listed {
    cookie: u64,
    dump: Dump,
    tcp: bool,
    state: u8,
    creator: Option<u64>,
}

impl Held {
    /// Cookie -> holder's cgroup id: what HELD_SOCKETS must hold.
    pub fn entries(&self) -> HashMap<u64, u64> {
        self.records
            .iter()
            .map(|(cookie, r)| (*cookie, r.holder))
            .collect()
    }

    /// Entries whose socket the last dump did not list.
    pub fn unseen(&self) -> usize {
        self.records.values().filter(|r| !r.seen).count()
    }

    /// Scans `targets` (every managed service; `managed` holds every
    /// managed service's cgroup path, so that a service nested in
    /// another's cgroup is its own, not part of the outer one) and updates
    /// the entries.
    pub fn scan(
        &mut self,
        mount: &Path,
        targets: &[Target<'_>],
        managed: &HashSet<&str>,
        capacity: usize,
    ) -> Report {
        let started = Instant::now();
        let mut report = Report::default();
        let (listed, failed) = list_sockets();
        if !failed.is_empty() {
            report.dump_error = Some(
                failed
                    .iter()
                    .map(|(_, e)| e.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            );
        }
        if failed.len() == DUMPS.len() {
            // Keep every entry: failing to look is no reason to let go.
            report.elapsed = started.elapsed();
            return report;
        }
        self.scans += 1;
        let live: HashSet<u64> = listed.values().map(|l| l.cookie).collect();
        for (cookie, record) in &mut self.records {
            // A dump that failed says nothing about its sockets.
            if failed.iter().any(|(d, _)| *d == record.dump) {
                continue;
            }
            record.seen = live.contains(cookie);
            if record.seen {
                record.last_seen = self.scans;
            }
        }
        // A holder that is no longer a managed service (a unit restarted
        // gets a new cgroup): its entries would point at nothing.
        let holders: HashSet<u64> = targets.iter().map(|t| t.cgroup_id).collect();
        self.records.retain(|_, r| holders.contains(&r.holder));
        self.overflowed.retain(|c| live.contains(c));

        for target in targets {
            let mut found = Vec::new();
            let own = {
                let subtree = walk(mount, target, managed);
                for pid in &subtree.pids {
                    // What could be read counts, even if some could not.
                    if let Err(e) = held_inodes(*pid, &mut found) {
                        // Gone in the meantime: nothing to judge.
                        if e.raw_os_error() != Some(libc::ESRCH)
                            && e.kind() != io::ErrorKind::NotFound
                        {
                            report.unreadable.push((*pid, e.to_string()));
                        }
                    }
                }
                subtree.cgroups
            };
            let mut held: Vec<(u8, u64, Dump)> = found
                .into_iter()
                .filter_map(|inode| listed.get(&inode))
                .filter(|l| l.creator.is_none_or(|c| !own.contains(&c)))
                .filter_map(|l| {
                    let rank = match (l.tcp, l.state) {
                        (true, diag::TCP_LISTEN) => 0,
                        (false, _) => 1,
                        (true, _) if target.all_sockets => 2,
                        (true, _) => return None,
                    };
                    Some((rank, l.cookie, l.dump))
                })
                .filter(|(_, cookie, _)| !self.records.contains_key(cookie))
                .collect();
            held.sort_unstable();
            held.dedup();
            for (_, cookie, dump) in held {
                if !self.make_room(target.cgroup_id, capacity) {
                    if self.overflowed.insert(cookie) {
                        *report.overflow.entry(target.cgroup_id).or_default() += 1;
                    }
                    continue;
                }
                self.overflowed.remove(&cookie);
                self.records.insert(
                    cookie,
                    Record {
                        holder: target.cgroup_id,
                        dump,
                        seen: true,
                        last_seen: self.scans,
                    },
                );
            }
        }
        report.elapsed = started.elapsed();
        report
    }

    /// Whether service `holder` may get one more entry, giving up the
    /// longest unseen entry (its own first, then any) if it or the map is
    /// full.
    fn make_room(&mut self, holder: u64, capacity: usize) -> bool {
        let mine = self.records.values().filter(|r| r.holder == holder).count();
        if mine >= PER_SERVICE {
            return self.evict_unseen(Some(holder));
        }
        if self.records.len() >= capacity {
            return self.evict_unseen(None);
        }
        true
    }

    fn evict_unseen(&mut self, holder: Option<u64>) -> bool {
        let oldest = self
            .records
            .iter()
            .filter(|(_, r)| !r.seen && holder.is_none_or(|h| r.holder == h))
            .min_by_key(|(_, r)| r.last_seen)
            .map(|(cookie, _)| *cookie);
        oldest.is_some_and(|cookie| self.records.remove(&cookie).is_some())
    }
}

/// Every TCP and UDP socket of the agent's network namespace, by inode
/// (sockets without one, not full sockets, are left out), and the dumps
/// that failed, with why (a kernel without IPv6, or without udp_diag, fails
/// one or two of them: the others still count).
fn list_sockets() -> (HashMap<u32, Listed>, Vec<(Dump, String)>) {
    let mut out = HashMap::new();
    let mut failed = Vec::new();
    let mut sockets = Vec::new();
    for dump in DUMPS {
        let (family, protocol) = dump;
        let tcp = protocol == libc::IPPROTO_TCP;
        let states = if tcp {
            diag::FULL_SOCKET_STATES
        } else {
            u32::MAX
        };
        sockets.clear();
        if let Err(e) = diag::dump(family as u8, protocol as u8, states, &mut sockets) {
            let family = if family == libc::AF_INET {
                "IPv4"
            } else {
                "IPv6"
            };
            let protocol = if tcp { "TCP" } else { "UDP" };
            failed.push((dump, format!("sock_diag dump of {family} {protocol}: {e}")));
            continue;
        }
        for s in sockets.iter().filter(|s| s.inode != 0) {
            out.insert(
                s.inode,
                Listed {
                    cookie: s.cookie,
                    dump,
                    tcp,
                    state: s.state,
                    creator: s.cgroup_id,
                },
            );
        }
    }
    (out, failed)
}

/// A service's part of the cgroup tree.
struct Subtree {
    /// The cgroup ids of the service's own cgroups.
    cgroups: HashSet<u64>,
    pids: Vec<u32>,
}

/// The cgroups of `target` (its cgroup and descendants, minus nested
/// managed services) and the processes in them.
fn walk(mount: &Path, target: &Target<'_>, managed: &HashSet<&str>) -> Subtree {
    let mut subtree = Subtree {
        cgroups: HashSet::from([target.cgroup_id]),
        pids: Vec::new(),
    };
    let mut dirs = vec![target.cgroup_path.to_string()];
    while let Some(dir) = dirs.pop() {
        let path = mount.join(&dir);
        // A cgroup's id is its directory's inode number.
        if let Ok(meta) = fs::metadata(&path) {
            subtree.cgroups.insert(meta.ino());
        }
        if let Ok(text) = fs::read_to_string(path.join("cgroup.procs")) {
            subtree
                .pids
                .extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        let Ok(entries) = fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let child = format!("{dir}/{}", entry.file_name().to_string_lossy());
                if !managed.contains(child.as_str()) {
                    dirs.push(child);
                }
            }
        }
    }
    subtree.pids.sort_unstable();
    subtree.pids.dedup();
    subtree
}

/// Adds to `inodes` the socket inodes in the descriptor tables of every
/// thread of `pid`. A thread that is gone or a descriptor closed meanwhile
/// is skipped; a process whose threads cannot be listed, or some of whose
/// tables cannot be read (no permission), is an error (after the tables
/// that could be read).
fn held_inodes(pid: u32, inodes: &mut Vec<u32>) -> io::Result<()> {
    let mut read_tables: Vec<u32> = Vec::new();
    let mut denied = None;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(entry) = entry else { continue };
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // Threads usually share one table: read each table once.
        if read_tables.iter().any(|&t| same_files(t, tid)) {
            continue;
        }
        let dir = match fs::read_dir(format!("/proc/{pid}/task/{tid}/fd")) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                denied = Some(e);
                continue;
            }
            Err(_) => continue, // the thread is gone
        };
        read_tables.push(tid);
        for fd in dir.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue; // closed meanwhile
            };
            if let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u32>().ok())
            {
                inodes.push(inode);
            }
        }
    }
    denied.map_or(Ok(()), Err)
}

/// Whether threads `a` and `b` share one descriptor table. When the
/// kernel cannot tell (no kcmp), they do not: both are read.
fn same_files(a: u32, b: u32) -> bool {
    const KCMP_FILES: libc::c_int = 2;
    if a == b {
        return true;
    }
    // SAFETY: plain syscall on two task ids; no memory arguments.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, a, b, KCMP_FILES, 0, 0) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsRawFd};

    use super::*;

    #[test]
    fn this_processs_listener_is_found_in_its_threads_tables() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
        let link = fs::read_link(format!("/proc/self/fd/{}", listener.as_raw_fd())).expect("link");
        let inode: u32 = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|l| l.parse().ok())
            .expect("a socket link");
        let mut inodes = Vec::new();
        held_inodes(std::process::id(), &mut inodes).expect("our own tables");
        assert!(inodes.contains(&inode));
        // The test harness runs threads; they share our table, read once.
        assert_eq!(inodes.iter().filter(|&&i| i == inode).count(), 1);
        let (listed, failed) = list_sockets();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(listed
            .get(&inode)
            .is_some_and(|l| l.tcp && l.state == diag::TCP_LISTEN));
    }

    fn record(held: &mut Held, cookie: u64, holder: u64, seen: bool, last_seen: u64) {
        held.records.insert(
            cookie,
            Record {
                holder,
                dump: DUMPS[0],
                seen,
                last_seen,
            },
        );
    }

    #[test]
    fn a_full_service_gives_up_its_longest_unseen_entry_first() {
        let mut held = Held::default();
        for cookie in 0..PER_SERVICE as u64 {
            record(&mut held, cookie, 7, true, 5);
        }
        // Every entry seen: nothing to give up.
        assert!(!held.make_room(7, 8192));
        assert!(held.make_room(8, 8192), "another service has room");
        record(&mut held, 3, 7, false, 2);
        record(&mut held, 4, 7, false, 1);
        assert!(held.make_room(7, 8192));
        assert!(!held.records.contains_key(&4), "the longest unseen goes");
        assert!(held.records.contains_key(&3));
    }

    #[test]
    fn a_full_map_gives_up_unseen_entries_of_any_service() {
        let mut held = Held::default();
        record(&mut held, 1, 7, true, 1);
        record(&mut held, 2, 8, false, 1);
        assert!(held.make_room(9, 2));
        assert_eq!(held.records.len(), 1);
        assert!(!held.make_room(9, 1), "only seen entries left: no room");
    }
}
