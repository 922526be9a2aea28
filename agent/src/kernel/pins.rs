//! Keeping enforcement in the kernel while the agent is down: every link
//! and map is pinned under bpffs, and a new agent takes over from the pins
//! the previous one left.
//!
//! Layout under the pin root (default /sys/fs/bpf/bulkhead):
//!   current/links/<program>   the attached links in force
//!   current/maps/<map>        their maps (the ring buffer and loss counters
//!                             among them, so events made while no agent ran
//!                             can be read and their losses counted)
//!   staging-<pid>/            a starting agent's pins before it takes over
//!   retired-<pid>/            the pins it replaced, removed once detached
//!
//! Take-over attaches the new programs before detaching the old ones: for a
//! moment both run and a connection must pass both, so there is never a
//! gap, only a brief overlap of the two policies.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::links::PinnedLink,
};
use tracing::{info, warn};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/bulkhead";

/// Where the pins live.
#[derive(Debug, Clone)]
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    pub fn current(&self) -> PathBuf {
        self.0.join("current")
    }

    pub fn staging(&self) -> PathBuf {
        self.0.join(format!("staging-{}", std::process::id()))
    }

    fn retired(&self) -> PathBuf {
        self.0.join(format!("retired-{}", std::process::id()))
    }

    /// Makes sure bpffs is mounted at or above the root (mounting it at
    /// /sys/fs/bpf if nothing is, as systemd would) and the root exists.
    pub fn prepare(&self) -> Result<(), String> {
        if !on_bpffs(&self.0) {
            let mount_point = Path::new("/sys/fs/bpf");
            if !self.0.starts_with(mount_point) {
                return Err(format!(
                    "{} is not on a bpf file system; mount one there or choose a path under /sys/fs/bpf",
                    self.0.display()
                ));
            }
            mount_bpffs(mount_point).map_err(|e| {
                format!("bpffs is not mounted and mounting it at /sys/fs/bpf failed: {e}")
            })?;
            info!("mounted bpffs at /sys/fs/bpf (it was not mounted)");
        }
        fs::create_dir_all(&self.0)
            .map_err(|e| format!("cannot create the pin directory {}: {e}", self.0.display()))
    }

    /// Pins a starting agent wrote: moves the previous `current` aside,
    /// makes the staging pins `current`, and returns what was replaced.
    pub fn promote(&self) -> io::Result<Option<Previous>> {
        let current = self.current();
        let previous = if current.exists() {
            let retired = self.retired();
            fs::rename(&current, &retired)?;
            Some(retired)
        } else {
            None
        };
        fs::rename(self.staging(), &current)?;
        Ok(previous.map(|dir| Previous { dir }))
    }
}

/// The pins of an agent that ran before.
pub struct Previous {
    dir: PathBuf,
}

impl Previous {
    /// The previous ring buffer, to drain events made while no agent read it.
    pub fn ring(&self) -> Option<RingBuf<MapData>> {
        let map = MapData::from_pin(self.dir.join("maps").join(agent_common::maps::EVENTS)).ok()?;
        RingBuf::try_from(aya::maps::Map::RingBuf(map)).ok()
    }

    /// The previous flow table (absent if that agent had none), to report
    /// the calls it counted once its programs are detached.
    pub fn flows(&self) -> Option<super::flow_table::FlowTable> {
        super::flow_table::FlowTable::from_pins(&self.dir).ok()
    }

    /// Records the previous programs dropped because nobody drained the ring.
    pub fn lost(&self) -> u64 {
        let Ok(map) = MapData::from_pin(self.dir.join("maps").join(agent_common::maps::LOST))
        else {
            return 0;
        };
        let Ok(lost) = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(map))
        else {
            return 0;
        };
        (0..agent_common::LOST_SLOTS)
            .filter_map(|i| lost.get(&i, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum::<u64>())
            .sum()
    }

    /// Its pin directory (maps under `maps/`).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Detaches the previous programs; their maps stay pinned (and
    /// readable) until [`Self::remove`].
    pub fn detach(&self) {
        detach_links(&self.dir);
    }

    /// Detaches the previous programs that redirect a connected socket's
    /// lookups to the DNS proxy (connect), before the others (see
    /// `takeover`).
    pub fn detach_redirects(&self) {
        let links = self.dir.join("links");
        for name in REDIRECTS {
            detach_link(&links.join(name));
        }
    }

    /// Detaches the previous programs and removes their pins.
    pub fn remove(self) {
        remove_pins(&self.dir);
    }
}

/// Detaches every pinned link under `dir` and removes every pin and
/// directory there (`bulkhead detach`, and retiring a previous agent).
pub fn remove_pins(dir: &Path) {
    detach_links(dir);
    for entry in fs::read_dir(dir.join("maps"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = fs::remove_file(entry.path());
    }
    let _ = fs::remove_dir(dir.join("links"));
    let _ = fs::remove_dir(dir.join("maps"));
    if let Err(e) = fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), "cannot remove pin directory: {e}");
        }
    }
}

/// The programs that redirect a socket to the DNS proxy at connect(), by
/// their links' pin names (agent-ebpf's sock_addr.rs): the socket sends
/// its queries later. sendmsg redirects each datagram as it is sent, so a
/// datagram the previous one redirected went out through its packet
/// programs too; and it stays until the rest goes, since it also opens an
/// ingress-restricted service's pinholes for replies, which the previous
/// inbound program reads.
const REDIRECTS: [&str; 2] = ["bulkhead_connect4", "bulkhead_connect6"];

/// Detaches every program pinned as a link under `dir/links` (their maps
/// stay pinned).
fn detach_links(dir: &Path) {
    let links = dir.join("links");
    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
        detach_link(&entry.path());
    }
}

/// Detaches the program pinned as a link at `pin`, if there is one.
fn detach_link(pin: &Path) {
    match PinnedLink::from_pin(pin) {
        // Unpinned, the link's last reference is this fd: dropping it
        // detaches the program.
        Ok(link) => {
            if let Err(e) = link.unpin() {
                warn!(pin = %pin.display(), "cannot unpin link: {e}");
            }
        }
        Err(_) if !pin.exists() => {}
        Err(e) => {
            warn!(pin = %pin.display(), "cannot open pinned link: {e}");
            let _ = fs::remove_file(pin);
        }
    }
}

/// Leftover staging/retired directories of agents that died mid-take-over.
pub fn clean_leftovers(root: &PinRoot) {
    let mine = [root.staging(), root.retired()];
    for entry in fs::read_dir(&root.0).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = (name.starts_with("staging-") || name.starts_with("retired-"))
            && !mine.contains(&entry.path());
        if stale {
            info!(dir = %entry.path().display(), "removing pins left by an agent that stopped mid-start");
            remove_pins(&entry.path());
        }
    }
}

fn on_bpffs(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    text.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        let fstype = right.split_whitespace().next();
        let mount_point = left.split_whitespace().nth(4);
        fstype == Some("bpf") && mount_point.is_some_and(|m| path.starts_with(m))
    })
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    mount_pseudo_fs(c"bpf", at)
}

/// Mounts a kernel pseudo file system (`bpf`, `tracefs`) of type `fstype`
/// at `at`, as systemd would at boot.
pub(super) fn mount_pseudo_fs(fstype: &std::ffi::CStr, at: &Path) -> io::Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let target = CString::new(at.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_redirects_are_socket_address_programs_of_the_agent() {
        for name in super::REDIRECTS {
            assert!(
                super::super::loader::is_sock_addr_program(name),
                "{name} is not a socket-address program the loader attaches"
            );
        }
    }
}
