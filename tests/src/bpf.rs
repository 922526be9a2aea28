//! Which bulkhead programs the kernel has loaded, as `bpftool prog show` sees
//! them. bulkhead's programs are named `bulkhead_*` (`bulkhead_connect4`,
//! ...; the kernel keeps 15 bytes of a name, so match on the prefix).
//!
//! Another bulkhead (another engineer's, another test run) may run on the
//! same machine, so tests never expect "no bulkhead program at all". They
//! look at the programs *their* daemon holds ([`prog_ids_held_by`], from
//! `/proc/PID/fdinfo`), and at bulkhead programs loaded since a
//! [`ProgSnapshot`] that no live process holds ([`ProgSnapshot::orphans_since`]):
//! left attached or pinned by a daemon that is gone.

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::process::try_output_with_timeout;

/// The prefix of every bulkhead program name.
pub const PROG_PREFIX: &str = "bulkhead_";

/// One loaded program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedProg {
    /// Kernel program id.
    pub id: u64,
    /// Name as bpftool prints it.
    pub name: String,
    /// Program type (`cgroup_sock_addr`, ...).
    pub prog_type: String,
}

/// Every loaded program whose name starts with [`PROG_PREFIX`].
#[must_use]
pub fn bulkhead_progs() -> Vec<LoadedProg> {
    let out = try_output_with_timeout(
        Command::new("bpftool").args(["--json", "prog", "show"]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e} (bpftool is installed by `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "`bpftool --json prog show` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_progs(&out.stdout)
        .into_iter()
        .filter(|p| p.name.starts_with(PROG_PREFIX))
        .collect()
}

/// The programs in `bpftool --json prog show` output.
fn parse_progs(json: &[u8]) -> Vec<LoadedProg> {
    let value: Value = serde_json::from_slice(json).unwrap_or_else(|e| {
        panic!(
            "bpftool printed no JSON ({e}): {}",
            String::from_utf8_lossy(json)
        )
    });
    let Some(progs) = value.as_array() else {
        panic!("bpftool printed no JSON array: {value}");
    };
    progs
        .iter()
        .filter_map(|p| {
            Some(LoadedProg {
                id: p.get("id")?.as_u64()?,
                name: p.get("name").and_then(Value::as_str)?.to_owned(),
                prog_type: p
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            })
        })
        .collect()
}

/// Ids of the programs process `pid` holds open, directly or through a
/// link (every such fd's `/proc/PID/fdinfo` entry has a `prog_id:` line).
#[must_use]
pub fn prog_ids_held_by(pid: u32) -> BTreeSet<u64> {
    held_in(&Path::new("/proc").join(pid.to_string()))
}

/// Ids of the programs any live process holds open.
fn prog_ids_held_by_anyone() -> BTreeSet<u64> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .flat_map(|e| held_in(&e.path()))
        .collect()
}

fn held_in(proc_dir: &Path) -> BTreeSet<u64> {
    let Ok(fds) = fs::read_dir(proc_dir.join("fdinfo")) else {
        return BTreeSet::new();
    };
    fds.flatten()
        .filter_map(|fd| fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// Waits up to `timeout` until no program in `ids` is loaded (the kernel
/// frees a program shortly after its last reference goes); returns the
/// bulkhead programs among `ids` still loaded then.
#[must_use]
pub fn wait_unloaded(ids: &BTreeSet<u64>, timeout: Duration) -> Vec<LoadedProg> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<_> = bulkhead_progs()
            .into_iter()
            .filter(|p| ids.contains(&p.id))
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The bulkhead programs loaded at one moment.
#[derive(Debug, Clone)]
pub struct ProgSnapshot {
    ids: BTreeSet<u64>,
}

impl ProgSnapshot {
    /// Takes a snapshot now.
    #[must_use]
    pub fn take() -> Self {
        Self {
            ids: bulkhead_progs().iter().map(|p| p.id).collect(),
        }
    }

    /// Bulkhead programs loaded now that were not loaded at the snapshot.
    #[must_use]
    pub fn new_since(&self) -> Vec<LoadedProg> {
        bulkhead_progs()
            .into_iter()
            .filter(|p| !self.ids.contains(&p.id))
            .collect()
    }

    /// Bulkhead programs loaded since the snapshot that no live process
    /// holds: left behind (attached or pinned) by a process that is gone.
    /// Waits up to `timeout` for them to go, as the kernel frees programs
    /// shortly after their last reference.
    #[must_use]
    pub fn orphans_since(&self, timeout: Duration) -> Vec<LoadedProg> {
        let deadline = Instant::now() + timeout;
        loop {
            let held = prog_ids_held_by_anyone();
            let orphans: Vec<_> = self
                .new_since()
                .into_iter()
                .filter(|p| !held.contains(&p.id))
                .collect();
            if orphans.is_empty() || Instant::now() >= deadline {
                return orphans;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_json() {
        let json = br#"[{"id":7,"type":"cgroup_sock_addr","name":"bulkhead_connec","tag":"ab"},
                        {"id":9,"type":"tracing","tag":"cd"}]"#;
        assert_eq!(
            parse_progs(json),
            vec![LoadedProg {
                id: 7,
                name: "bulkhead_connec".to_owned(),
                prog_type: "cgroup_sock_addr".to_owned(),
            }]
        );
    }
}

/// A per-CPU array map held open from its pin, so that it can be read after
/// its pin is gone (a new agent removes the previous one's pins at
/// take-over; the map lives as long as this fd).
pub struct PinnedPerCpuArray {
    fd: std::os::fd::OwnedFd,
    value_size: usize,
}

/// `bpf(2)` commands used here (linux/bpf.h).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_OBJ_GET: libc::c_long = 7;

impl PinnedPerCpuArray {
    /// Opens the map pinned at `path`, whose values are `value_size` bytes.
    pub fn open(path: &Path, value_size: usize) -> Self {
        use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .unwrap_or_else(|e| panic!("pin path {}: {e}", path.display()));
        // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
        let mut attr = [0u64; 2];
        attr[0] = c_path.as_ptr() as u64;
        // SAFETY: a BPF_OBJ_GET attr of the size given, naming a NUL-ended path.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert!(
            fd >= 0,
            "cannot open the pinned map {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let fd = i32::try_from(fd).unwrap_or_else(|e| panic!("fd {fd}: {e}"));
        Self {
            // SAFETY: a new fd the kernel just gave us.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            value_size,
        }
    }

    /// The sum over every CPU of the u64 at `index`.
    pub fn sum_u64(&self, index: u32) -> u64 {
        use std::os::fd::AsRawFd as _;
        assert_eq!(
            self.value_size, 8,
            "sum_u64 on values of {} bytes",
            self.value_size
        );
        let mut values = vec![0u64; possible_cpus()];
        // union bpf_attr for BPF_MAP_LOOKUP_ELEM: map_fd (+pad), key, value, flags.
        let fd = u64::try_from(self.fd.as_raw_fd()).unwrap_or_default();
        let mut attr = [fd, &raw const index as u64, values.as_mut_ptr() as u64, 0];
        // SAFETY: the attr points at a u32 key and room for one u64 per possible CPU.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        assert!(
            rc == 0,
            "cannot read index {index} of a pinned map: {}",
            std::io::Error::last_os_error()
        );
        values.iter().sum()
    }
}

/// How many CPUs the kernel may ever bring up (per-CPU map values come one
/// per possible CPU), from `/sys/devices/system/cpu/possible` (`0-3,6`).
fn possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible")
        .unwrap_or_else(|e| panic!("cannot read the possible CPUs: {e}"));
    text.trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.parse().unwrap_or_else(|e| panic!("{text:?}: {e}")),
                    b.parse().unwrap_or_else(|e| panic!("{text:?}: {e}")),
                );
                b - a + 1
            }
            None => 1,
        })
        .sum()
}
