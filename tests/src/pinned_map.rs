//! Reading a map the agent pinned, straight through `bpf(2)`: what a test
//! needs of the kernel's own counts when no agent reports them (the
//! previous agent's, after a take-over).

use std::{fs, path::Path, process::Command, time::Duration};

use crate::process::try_output_with_timeout;

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
    #[must_use]
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
    #[must_use]
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

/// How many entries the map pinned at `pinned` holds now
/// (`bpftool map dump`); panics if bpftool fails.
#[must_use]
pub fn pinned_map_len(pinned: &Path) -> usize {
    let out = try_output_with_timeout(
        Command::new("bpftool")
            .args(["--json", "map", "dump", "pinned"])
            .arg(pinned),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e} (bpftool is installed by `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "`bpftool map dump pinned {}` failed ({}): {}",
        pinned.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool printed no JSON array ({e})"));
    entries.len()
}
