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

use std::{collections::BTreeSet, fs, path::Path, process::Command, time::Duration};

use serde_json::Value;

use crate::{eventually::eventually, process::try_output_with_timeout};

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

/// Ids of the programs attached directly at `cgroup` for `attach_type`
/// (bpftool's name: `cgroup_inet_ingress`, ...), from `bpftool cgroup
/// show`.
#[must_use]
pub fn attached_at(cgroup: &Path, attach_type: &str) -> BTreeSet<u64> {
    let out = try_output_with_timeout(
        Command::new("bpftool")
            .args(["--json", "cgroup", "show"])
            .arg(cgroup),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e} (bpftool is installed by `cargo xtask setup`)"));
    assert!(
        out.status.success(),
        "`bpftool --json cgroup show {}` failed ({}): {}",
        cgroup.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let value: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attach_type"] == attach_type)
        .filter_map(|p| p["id"].as_u64())
        .collect()
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
    eventually(timeout, Duration::from_millis(50), || {
        let left: Vec<_> = bulkhead_progs()
            .into_iter()
            .filter(|p| ids.contains(&p.id))
            .collect();
        if left.is_empty() {
            Ok(left)
        } else {
            Err(left)
        }
    })
    .unwrap_or_else(|left| left)
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
        eventually(timeout, Duration::from_millis(50), || {
            let held = prog_ids_held_by_anyone();
            let orphans: Vec<_> = self
                .new_since()
                .into_iter()
                .filter(|p| !held.contains(&p.id))
                .collect();
            if orphans.is_empty() {
                Ok(orphans)
            } else {
                Err(orphans)
            }
        })
        .unwrap_or_else(|orphans| orphans)
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
