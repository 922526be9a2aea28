//! Time spent inside bulkhead's programs, from the kernel's own BPF
//! run-time statistics. Turning them on costs a little on every program
//! run, so they are on only for a separate pass after the measured rounds,
//! through a BPF_ENABLE_STATS fd: the kernel turns them off again when the
//! fd closes, even if xtask dies.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
    process::Command,
};

use anyhow::{Context, Result};

use super::sandbox::run_quiet;

/// `enum bpf_cmd` BPF_ENABLE_STATS and `enum bpf_stats_type`
/// BPF_STATS_RUN_TIME (linux/bpf.h, since 5.8).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics stay on while this lives.
pub struct StatsOn(#[allow(dead_code, reason = "held for its Drop (close)")] OwnedFd);

pub fn enable_stats() -> Result<StatsOn> {
    // `union bpf_attr` for this command: { __u32 type; }, zero-padded.
    let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
    // SAFETY: a valid, fully initialised attr of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("bpf(BPF_ENABLE_STATS)");
    }
    let fd = i32::try_from(fd).context("bpf() returned an odd fd")?;
    // SAFETY: a fresh fd nobody else owns.
    Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// (total run time in ns, number of runs) of program `id` so far.
pub fn program_stats(id: u32) -> Result<(u64, u64)> {
    let out =
        run_quiet(Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "--json"]))?;
    let v: serde_json::Value =
        serde_json::from_str(&out).context("bpftool printed invalid JSON")?;
    // bpftool leaves the fields out while they are zero.
    let field = |name: &str| v.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok((field("run_time_ns"), field("run_cnt")))
}

/// One program's cost over a run of the load generator.
#[derive(Clone, Debug)]
pub struct ProgramCost {
    /// The hook, as bpftool names it (cgroup_inet4_connect, ...).
    pub attach: String,
    pub name: String,
    pub runs: u64,
    pub ns_per_run: f64,
}

/// `(id, attach, name)` of each program in a `bpftool cgroup show` listing
/// ("ID ATTACH_TYPE [FLAGS] NAME").
pub fn parse_programs(lines: &[String]) -> Vec<(u32, String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let id = words.first()?.parse().ok()?;
            let attach = (*words.get(1)?).to_owned();
            let name = (*words.last()?).to_owned();
            Some((id, attach, name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpftool_cgroup_lines() {
        let lines = vec![
            "673 cgroup_inet4_connect multi bulkhead_connect4".to_owned(),
            "675 cgroup_udp4_sendmsg bulkhead_sendmsg4".to_owned(),
            "garbage".to_owned(),
        ];
        let p = parse_programs(&lines);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            (
                673,
                "cgroup_inet4_connect".into(),
                "bulkhead_connect4".into()
            )
        );
        assert_eq!(p[1].2, "bulkhead_sendmsg4");
    }
}
