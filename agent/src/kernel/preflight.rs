//! Can this process load and attach the programs at all? Answered up front
//! so that a missing privilege is one clear line, not a verifier dump.

use aya::programs::ProgramType;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// `Err(one line)` when the agent cannot enforce on this host.
pub fn check() -> Result<(), String> {
    if !super::loader::carries_programs() {
        return Err(format!("bulkhead run: {}", super::KernelError::NoPrograms));
    }
    let caps = effective_caps().ok_or_else(|| {
        "bulkhead run: cannot read this process's capabilities from /proc/self/status".to_string()
    })?;
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    // CAP_PERFMON: without it the verifier refuses the programs' pointer
    // arithmetic ("prohibited for !root"); CAP_SYS_ADMIN implies all three.
    let bpf = has(CAP_BPF) || has(CAP_SYS_ADMIN);
    let perfmon = has(CAP_PERFMON) || has(CAP_SYS_ADMIN);
    if !bpf || !perfmon || !has(CAP_NET_ADMIN) {
        return Err(
            "bulkhead run needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load and attach its eBPF programs; run it as root or through its systemd unit"
                .to_string(),
        );
    }
    match aya::sys::is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => Ok(()),
        Ok(false) => Err(
            "bulkhead run: this kernel does not support cgroup/sock_addr BPF programs (needs CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF)"
                .to_string(),
        ),
        Err(e) => Err(format!(
            "bulkhead run: cannot probe BPF support on this kernel: {e}"
        )),
    }
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}
