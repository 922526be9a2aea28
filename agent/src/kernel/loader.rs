//! Loads the embedded eBPF object, sizes its maps from the policy, fills
//! them, and attaches the programs once at the cgroup2 root.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
};

use agent_common::{globals, maps as names, COUNTER_SLOTS, DEFAULT_EVENTS_BYTES};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        CgroupSockopt, Lsm, SockOps, TracePoint,
    },
    Ebpf, EbpfLoader,
};

use super::{
    compile::CompiledPolicy,
    drift, fault,
    layout::{relocate, Capacity},
    maps, raw_link, KernelError, ResolvedService,
};

#[cfg(test)]
mod contract;
mod on_demand;
mod resident;
mod verify;

/// The kernel programs, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-ebpf"));

/// Whether `name` is one of the socket-address programs (connect,
/// sendmsg, bind, recvmsg, getpeername), for tests of code that names them.
#[cfg(test)]
pub(super) fn is_sock_addr_program(name: &str) -> bool {
    PROGRAMS
        .iter()
        .any(|&(n, hook)| n == name && hook == Hook::SockAddr)
}

/// False for a binary built with AYA_BUILD_SKIP (agent/build.rs): it
/// embeds an empty object.
pub(super) fn carries_programs() -> bool {
    !EBPF_OBJECT.is_empty()
}

/// Every program, with how it is loaded and attached. The names are the
/// kernel functions' (agent-ebpf); `contract.rs` checks the embedded object
/// against this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    SockAddr,
    SockOps,
    /// cgroup_sock: socket creation and release (the section names which).
    CgroupSock,
    Sockopt,
    /// Attached on demand (on_demand.rs), not by the attach loop.
    SkbIngress,
    SkbEgress,
    /// A tracepoint (category, name), attached through tracefs.
    TracePoint(&'static str, &'static str),
    /// BPF LSM, attached where the host has it (not every distribution
    /// enables it); without it packet sockets are not covered.
    Lsm(&'static str),
}

const PROGRAMS: [(&str, Hook); 22] = [
    // First: the processes' executables are tracked before any decision
    // asks for one (the agent scans /proc right after, see `attach`).
    (
        "bulkhead_process_exec",
        Hook::TracePoint("sched", "sched_process_exec"),
    ),
    (
        "bulkhead_process_fork",
        Hook::TracePoint("task", "task_newtask"),
    ),
    (
        "bulkhead_process_exit",
        Hook::TracePoint("sched", "sched_process_exit"),
    ),
    // Before connect4/6: a connecting socket's owner entry (owners.rs) is
    // removed by these two, so none may be made before they run.
    ("bulkhead_sockops", Hook::SockOps),
    ("bulkhead_sock_release", Hook::CgroupSock),
    ("bulkhead_bind4", Hook::SockAddr),
    ("bulkhead_bind6", Hook::SockAddr),
    ("bulkhead_connect4", Hook::SockAddr),
    ("bulkhead_connect6", Hook::SockAddr),
    ("bulkhead_sendmsg4", Hook::SockAddr),
    ("bulkhead_sendmsg6", Hook::SockAddr),
    ("bulkhead_recvmsg4", Hook::SockAddr),
    ("bulkhead_recvmsg6", Hook::SockAddr),
    ("bulkhead_getpeername4", Hook::SockAddr),
    ("bulkhead_getpeername6", Hook::SockAddr),
    ("bulkhead_sock_create", Hook::CgroupSock),
    ("bulkhead_setsockopt", Hook::Sockopt),
    ("bulkhead_ingress", Hook::SkbIngress),
    ("bulkhead_egress_skb", Hook::SkbEgress),
    (
        "bulkhead_cgroup_mkdir",
        Hook::TracePoint("cgroup", "cgroup_mkdir"),
    ),
    (
        "bulkhead_cgroup_rmdir",
        Hook::TracePoint("cgroup", "cgroup_rmdir"),
    ),
    ("bulkhead_socket_create", Hook::Lsm("socket_create")),
];

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Turn on aya-log diagnostics in the kernel programs.
    pub bpf_log: bool,
    /// Emit events (never enforce) for tasks outside every managed service.
    pub observe_unmanaged: bool,
    /// Size of the event ring buffer in bytes (a power of two, >= 4096).
    pub events_bytes: u32,
    /// UDP pinholes: idle timeout and bound per service.
    pub udp_reply_idle: std::time::Duration,
    pub udp_peers_per_service: u32,
    /// Entries of SERVICES: managed cgroups at one time.
    pub max_cgroups: u32,
    /// Entries of FLOWS: flows counted at one time (`[flows] table_size`).
    pub flow_table: u32,
    /// Entries of SOCK_OWNERS: connecting TCP sockets' owners (`[flows]
    /// tcp_table_size`).
    pub sock_owners: u32,
    /// Entries of LEARNT and of LEARNT_V4: learnt addresses in all (`[dns]
    /// max_learnt`, which the cache holds to; each map can take them all).
    pub max_learnt: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            bpf_log: false,
            observe_unmanaged: false,
            events_bytes: DEFAULT_EVENTS_BYTES,
            udp_reply_idle: std::time::Duration::from_secs(120),
            udp_peers_per_service: agent_common::UDP_PEERS_PER_SERVICE,
            max_cgroups: agent_common::DEFAULT_MAX_CGROUPS,
            flow_table: agent_common::DEFAULT_FLOW_TABLE,
            sock_owners: agent_common::DEFAULT_SOCK_OWNERS,
            max_learnt: agent_common::DEFAULT_MAX_LEARNT,
        }
    }
}

/// What this host lets bulkhead see; reported at start and in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Packet sockets (AF_PACKET) are judged: BPF LSM is active.
    pub packet_sockets: bool,
    /// Why not, when not.
    pub packet_sockets_reason: Option<String>,
    /// New cgroups of managed services are added in the kernel at mkdir.
    pub cgroup_creation: bool,
    pub cgroup_creation_reason: Option<String>,
    /// Every decision knows the caller's executable (exec/fork/exit
    /// tracepoints, offsets from the kernel's BTF).
    pub process_identity: bool,
    pub process_identity_reason: Option<String>,
}

impl Coverage {
    /// Each optional part as `status` and `bulkhead_kernel_feature` name
    /// it: (name, active, what that means here).
    #[must_use]
    pub fn features(&self) -> [(&'static str, bool, String); 3] {
        let say = |reason: &Option<String>, active: &str| match reason {
            None => active.to_string(),
            Some(r) => format!("not active: {r}"),
        };
        [
            (
                "packet_sockets",
                self.packet_sockets,
                say(&self.packet_sockets_reason, "judged (BPF LSM)"),
            ),
            (
                "cgroup_creation",
                self.cgroup_creation,
                say(
                    &self.cgroup_creation_reason,
                    "new cgroups enforced from their creation (cgroup_mkdir tracepoint)",
                ),
            ),
            (
                "process_identity",
                self.process_identity,
                say(
                    &self.process_identity_reason,
                    "every decision names the caller's executable (sched tracepoints)",
                ),
            ),
        ]
    }
}

/// A link this agent attached.
enum Attached {
    /// Pinned under bpffs: stays attached after the agent exits.
    Pinned(PinnedLink),
    /// Detached when dropped (no pinning configured).
    Owned(#[expect(dead_code, reason = "held for its Drop, which detaches")] FdLink),
}

/// The loaded programs and their maps. Dropping it detaches whatever is
/// not pinned.
pub struct Enforcer {
    ebpf: Ebpf,
    links: Vec<Attached>,
    lsm_loaded: bool,
    lsm_error: Option<String>,
    /// Why process identity is off on this host (no BTF, no tracefs).
    process_error: Option<String>,
    /// How many service ids (both halves) the COUNTERS map has room for.
    pub max_services: u32,
    capacity: Capacity,
    /// The half the policy in force lives in.
    half: u32,
    /// The policy in force, ids relocated into `half`.
    live: Option<CompiledPolicy>,
    /// What HELD_SOCKETS holds (see `crate::held`).
    held: std::collections::HashMap<u64, u64>,
    /// `exe` paths followed to a new file since the last switch.
    followed: std::collections::HashSet<(u32, crate::process::ExeFile)>,
    /// The files `EXE_RULES` has entries for, held open (see
    /// `kernel::executables`).
    exe_files: super::executables::HeldFiles,
    /// What the start's process scan found, until the naming stage takes
    /// it (see [`Enforcer::take_scanned`]).
    scanned: Vec<crate::process::scan::Found>,
    /// The previous agent's pins (a take-over): its table of executables
    /// is carried over instead of scanning `/proc` (see `process_table`).
    previous_pins: Option<PathBuf>,
    /// The inbound packet program, attached while a policy needs it
    /// (`on_demand`); None until `attach`.
    inbound: Option<on_demand::Inbound>,
}

impl Enforcer {
    /// Loads the programs into the kernel (not attached yet), with maps
    /// large enough for `policy`.
    pub fn load(policy: &CompiledPolicy, options: &LoadOptions) -> Result<Self, KernelError> {
        if !carries_programs() {
            return Err(KernelError::NoPrograms);
        }
        let capacity = Capacity::for_policy(policy);
        // Service ids and rulesets of both halves (see layout.rs).
        let max_services = capacity.services.saturating_mul(2);
        // Before the load: the offsets are globals of the programs.
        let process_offsets = ensure_tracefs().and_then(|()| {
            crate::process::offsets::find(
                Path::new("/sys/kernel/btf/vmlinux"),
                Path::new("/sys/kernel/tracing"),
            )
        });
        let process_error = process_offsets.as_ref().err().cloned();
        let globals = global_values(options, process_offsets.unwrap_or_default());
        // The loader holds the kernel's parsed BTF (about 15 MB here): it
        // must go right after the load, before the allocations that follow
        // sit above it on the heap and keep that memory from being given
        // back (measured: 43 MB resident after start instead of 28 MB).
        let mut ebpf = {
            let mut loader = EbpfLoader::new();
            for (name, entries) in map_sizes(capacity, options) {
                loader.map_max_entries(name, entries);
            }
            for (name, bytes) in &globals {
                loader.override_global(name, bytes.as_slice(), true);
            }
            loader.load(EBPF_OBJECT)?
        };
        resident::drop_pages(EBPF_OBJECT);
        let lsm_error = verify::load_all(&mut ebpf)?;
        let lsm_loaded = lsm_error.is_none();
        Ok(Self {
            ebpf,
            links: Vec::new(),
            lsm_loaded,
            lsm_error,
            process_error,
            max_services,
            capacity,
            half: 0,
            live: None,
            held: std::collections::HashMap::new(),
            followed: std::collections::HashSet::new(),
            exe_files: super::executables::HeldFiles::default(),
            scanned: Vec::new(),
            previous_pins: None,
            inbound: None,
        })
    }

    /// Writes the first policy (into half 0). Call before `attach` so that
    /// the first connection judged already sees the whole policy. Returns
    /// the service cgroups that could not be written.
    pub fn write_policy(
        &mut self,
        policy: CompiledPolicy,
        resolved: &[ResolvedService],
    ) -> Result<Vec<(super::Change, String)>, KernelError> {
        let placed = relocate(policy, 0, self.capacity);
        let failed = maps::write(&mut self.ebpf, &placed, resolved)?;
        self.half = 0;
        self.exe_files.hold_policy(&placed);
        self.live = Some(placed);
        Ok(failed)
    }

    /// The policy in force, as placed in the maps.
    pub fn live(&self) -> Option<&CompiledPolicy> {
        self.live.as_ref()
    }

    /// Step 1 of a reload: empties the half not in force (whatever a failed
    /// retire or an earlier staging left there), then writes `policy` into
    /// it. No service points at that half, so nothing changes for any
    /// connection. On error whatever was written is removed again.
    pub fn stage(&mut self, policy: CompiledPolicy) -> Result<CompiledPolicy, KernelError> {
        self.capacity
            .check(&policy)
            .map_err(KernelError::Capacity)?;
        let half = 1 - self.half;
        let ids = self.half_services(half);
        maps::clear_half(&mut self.ebpf, ids.clone())?;
        let staged = relocate(policy, half, self.capacity);
        let written =
            fault::inject("stage").and_then(|()| maps::write_rules(&mut self.ebpf, &staged));
        if let Err(e) = written {
            // Best effort: the next staging empties the half anyway.
            let _ = maps::clear_half(&mut self.ebpf, ids);
            return Err(e);
        }
        Ok(staged)
    }

    /// Step 2: points each service's cgroup at its entry in the staged
    /// policy (one map update per cgroup), and makes it the policy in force.
    /// Returns the previous policy, to `retire` once no program can still
    /// be using it.
    ///
    /// All or nothing: when a write fails part-way, `rollback` (the changes
    /// that point every cgroup touched back at its entry in the policy in
    /// force) is applied, the paths and flags are put back, and the staged
    /// half is emptied; the policy in force stays.
    pub fn switch(
        &mut self,
        staged: CompiledPolicy,
        changes: &[super::Change],
        rollback: &[super::Change],
    ) -> Result<Option<CompiledPolicy>, KernelError> {
        let old_flags = self.live.as_ref().map_or(0, maps::active_flags);
        if let Err(e) = self.try_switch(&staged, changes, old_flags) {
            let undone = self.undo_switch(&staged, rollback, old_flags);
            return Err(match undone {
                Ok(()) => e,
                Err(undo) => KernelError::Rollback {
                    cause: Box::new(e),
                    undo: Box::new(undo),
                },
            });
        }
        self.half = staged.service_base / self.capacity.services.max(1);
        self.followed.clear();
        self.exe_files.hold_policy(&staged);
        // After the flags that needed it are gone: ACTIVE_FLAGS is the new
        // policy's by now, written last by the switch that succeeded.
        self.detach_inbound_unless(maps::active_flags(&staged));
        Ok(self.live.replace(staged))
    }

    /// Attaches the inbound packet program if flags `active` need it (see
    /// `on_demand`). Before `attach`: nothing.
    fn attach_inbound_for(&mut self, active: u32) -> Result<(), KernelError> {
        match self.inbound.as_mut() {
            Some(inbound) if on_demand::needed(active) => inbound.attach(&mut self.ebpf),
            _ => Ok(()),
        }
    }

    /// Detaches the inbound packet program unless flags `active`, just
    /// written to ACTIVE_FLAGS, need it.
    fn detach_inbound_unless(&mut self, active: u32) {
        if let Some(inbound) = self.inbound.as_mut() {
            if !on_demand::needed(active) {
                inbound.detach();
            }
        }
    }

    /// The pins moved: the start's staging directory is `current` now.
    pub fn pins_moved_to(&mut self, current: &Path) {
        if let Some(inbound) = self.inbound.as_mut() {
            inbound.pins_moved_to(current);
        }
    }

    fn try_switch(
        &mut self,
        staged: &CompiledPolicy,
        changes: &[super::Change],
        old_flags: u32,
    ) -> Result<(), KernelError> {
        // Paths first: a unit restarting during the switch gets its new
        // entry from the kernel, and the rescan catches the rest.
        maps::write_service_paths(&mut self.ebpf, staged, self.live.as_ref())?;
        let new = maps::active_flags(staged);
        // Before the flags that need it: from here the switch may make a
        // service's inbound rules count. Attached only, never detached
        // here: after a switch whose undo failed too, the kernel's flags
        // may still be more than `old_flags` says.
        self.attach_inbound_for(old_flags | new)?;
        maps::write_active_flags(&mut self.ebpf, old_flags | new)?;
        fault::inject("switch")?;
        if let Some((_, e)) = maps::apply_service_changes(&mut self.ebpf, changes)?.first() {
            return Err(KernelError::Services(e.clone()));
        }
        maps::write_active_flags(&mut self.ebpf, new)
    }

    /// Puts back what a failed switch changed. Only when that worked is the
    /// staged half emptied: a cgroup still pointing there must keep a
    /// complete policy (the self-check repairs the rest).
    fn undo_switch(
        &mut self,
        staged: &CompiledPolicy,
        rollback: &[super::Change],
        old_flags: u32,
    ) -> Result<(), KernelError> {
        // Paths first, as in the switch: a cgroup made meanwhile gets the
        // entry in force.
        let none = CompiledPolicy::default();
        let live = self.live.as_ref().unwrap_or(&none);
        maps::write_service_paths(&mut self.ebpf, live, Some(staged))?;
        if let Some((_, e)) = maps::apply_service_changes(&mut self.ebpf, rollback)?.first() {
            return Err(KernelError::Services(e.clone()));
        }
        maps::write_active_flags(&mut self.ebpf, old_flags)?;
        self.detach_inbound_unless(old_flags);
        let half = staged.service_base / self.capacity.services.max(1);
        let ids = self.half_services(half);
        maps::clear_half(&mut self.ebpf, ids).map(|_| ())
    }

    /// Step 3: empties the previous policy's half, so that it holds
    /// nothing, whoever wrote there. Call after a grace period: a verdict
    /// that started before the switch may still read it. Should it fail,
    /// the next `stage` empties that half before writing.
    pub fn retire(&mut self, old: &CompiledPolicy) -> Result<(), KernelError> {
        fault::inject("retire")?;
        let ids = self.half_services(old.service_base / self.capacity.services.max(1));
        maps::clear_half(&mut self.ebpf, ids).map(|_| ())
    }

    /// The service ids of `half`.
    fn half_services(&self, half: u32) -> std::ops::Range<u32> {
        let n = self.capacity.services;
        half * n..(half + 1) * n
    }

    /// Reads the policy maps back and compares them with the policy in
    /// force and the managed cgroups (see `drift`). `retiring`: the other
    /// half still holds the previous policy, within its grace period.
    pub fn check_drift(
        &self,
        retiring: bool,
        cgroups: &drift::Cgroups<'_>,
    ) -> Result<drift::Report, KernelError> {
        let Some(live) = self.live.as_ref() else {
            return Ok(drift::Report::default());
        };
        let other = if retiring {
            None
        } else {
            Some(self.half_services(1 - self.half))
        };
        drift::check(
            &self.ebpf,
            live,
            self.half_services(self.half),
            other,
            cgroups,
        )
    }

    /// Attaches every program at the cgroup2 root (one attach serves every
    /// service). Each attach is a BPF link (kernel >= 5.7), which is always
    /// "multi": other tools' programs (systemd's IPAddressAllow, for
    /// instance) stay in place, the kernel runs them all and a connection
    /// needs every one to allow it. Links take no attach flags, hence
    /// `Single` (flags 0) here. The LSM program attaches globally; when the
    /// host has no active BPF LSM that is reported, not fatal.
    pub fn attach(
        &mut self,
        cgroup_root: &Path,
        pin_dir: Option<&Path>,
    ) -> Result<Coverage, KernelError> {
        let root = File::open(cgroup_root).map_err(|source| KernelError::Cgroup {
            path: cgroup_root.to_path_buf(),
            source,
        })?;
        if let Some(dir) = pin_dir {
            fs::create_dir_all(dir.join("links")).map_err(|e| KernelError::Pin {
                path: dir.join("links"),
                reason: e.to_string(),
            })?;
        }
        let links_dir = pin_dir.map(|d| d.join("links"));
        let mut coverage = Coverage::default();
        for (name, hook) in PROGRAMS {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(KernelError::MissingProgram(name))?;
            let err = |source| KernelError::Program { name, source };
            let single = CgroupAttachMode::Single;
            // Each link is taken out of aya's bookkeeping and pinned, so
            // that it outlives this process.
            let link: Option<FdLink> = match hook {
                Hook::SockAddr => {
                    let p = as_type::<CgroupSockAddr>(name, program)?;
                    let id = p.attach(&root, single).map_err(err)?;
                    Some(fd_link(name, p.take_link(id).map_err(err)?.try_into())?)
                }
                Hook::SockOps => {
                    let p = as_type::<SockOps>(name, program)?;
                    let id = p.attach(&root, single).map_err(err)?;
                    Some(fd_link(name, p.take_link(id).map_err(err)?.try_into())?)
                }
                Hook::CgroupSock => {
                    let p = as_type::<CgroupSock>(name, program)?;
                    let id = p.attach(&root, single).map_err(err)?;
                    Some(fd_link(name, p.take_link(id).map_err(err)?.try_into())?)
                }
                Hook::Sockopt => {
                    let p = as_type::<CgroupSockopt>(name, program)?;
                    match pin_dir {
                        // aya cannot hand this link over (see raw_link.rs).
                        Some(dir) => {
                            let path = dir.join("links").join(name);
                            let pin_err = |e: std::io::Error| KernelError::Pin {
                                path: path.clone(),
                                reason: e.to_string(),
                            };
                            let prog = p.fd().map_err(err)?;
                            let link = raw_link::link_create(
                                prog,
                                &root,
                                raw_link::ATTACH_CGROUP_SETSOCKOPT,
                            )
                            .map_err(pin_err)?;
                            raw_link::pin(&link, &path).map_err(pin_err)?;
                            let pinned =
                                PinnedLink::from_pin(&path).map_err(|e| KernelError::Pin {
                                    path: path.clone(),
                                    reason: e.to_string(),
                                })?;
                            self.links.push(Attached::Pinned(pinned));
                        }
                        // Owned by the program: detached when the agent exits.
                        None => {
                            p.attach(&root, single).map_err(err)?;
                        }
                    }
                    None
                }
                // The inbound program (on_demand.rs): after the loop, if
                // the policy needs it.
                Hook::SkbIngress => continue,
                Hook::SkbEgress => Some(attach_skb(
                    name,
                    program,
                    &root,
                    CgroupSkbAttachType::Egress,
                )?),
                Hook::TracePoint("sched", event) => {
                    let p = as_type::<TracePoint>(name, program)?;
                    let attached = match &self.process_error {
                        Some(e) => Err(e.clone()),
                        None => p.attach("sched", event).map_err(|e| e.to_string()),
                    };
                    let link = match attached {
                        // All three tracepoints or the feature is not active.
                        Ok(id) => {
                            coverage.process_identity = coverage.process_identity_reason.is_none();
                            Some(fd_link(name, p.take_link(id).map_err(err)?.try_into())?)
                        }
                        Err(e) => {
                            coverage.process_identity = false;
                            coverage.process_identity_reason.get_or_insert(format!(
                                "cannot track executables ({e}): decisions carry no `exe`, and rules with `exe` allow nothing"
                            ));
                            None
                        }
                    };
                    if event == "sched_process_exit" && coverage.process_identity {
                        self.scan_processes();
                    }
                    link
                }
                Hook::TracePoint(category, event) => {
                    let p = as_type::<TracePoint>(name, program)?;
                    let attached = ensure_tracefs()
                        .and_then(|()| p.attach(category, event).map_err(|e| e.to_string()));
                    match attached {
                        // Both tracepoints or the feature is not active.
                        Ok(id) => {
                            coverage.cgroup_creation = coverage.cgroup_creation_reason.is_none();
                            Some(fd_link(name, p.take_link(id).map_err(err)?.try_into())?)
                        }
                        Err(e) => {
                            coverage.cgroup_creation = false;
                            coverage.cgroup_creation_reason = Some(format!(
                                "cannot attach the {category}:{event} tracepoint ({e}); new and restarted services are picked up, and removed cgroups forgotten, by the 200 ms rescan only"
                            ));
                            None
                        }
                    }
                }
                Hook::Lsm(_) if self.lsm_loaded => {
                    let p = as_type::<Lsm>(name, program)?;
                    match p.attach() {
                        Ok(id) => {
                            coverage.packet_sockets = true;
                            Some(p.take_link(id).map_err(err)?.into())
                        }
                        Err(e) => {
                            coverage.packet_sockets_reason = Some(format!(
                                "BPF LSM is not active on this host ({e}); add `bpf` to the kernel's lsm= list"
                            ));
                            None
                        }
                    }
                }
                Hook::Lsm(_) => {
                    coverage.packet_sockets_reason = self.lsm_error.clone();
                    None
                }
            };
            let Some(link) = link else { continue };
            self.links.push(keep(name, link, links_dir.as_deref())?);
        }
        self.inbound = Some(on_demand::Inbound {
            cgroup_root: cgroup_root.to_path_buf(),
            links_dir,
            link: None,
        });
        self.attach_inbound_for(self.live.as_ref().map_or(0, maps::active_flags))?;
        Ok(coverage)
    }

    /// Gives an `exe` path that now names a new file (an upgrade) the
    /// rules of the file it named at load (see `kernel::executables`).
    pub fn follow_executables(&mut self) -> Result<Vec<super::executables::Followed>, KernelError> {
        let Some(live) = &self.live else {
            return Ok(Vec::new());
        };
        super::executables::follow(
            &mut self.ebpf,
            live,
            &mut self.followed,
            &mut self.exe_files,
        )
    }

    /// A take-over: `dir` holds the previous agent's pins, whose table of
    /// executables the attach carries over (and whose exec names come
    /// now, before the naming stage takes the map).
    pub fn take_over_from(&mut self, dir: PathBuf) {
        super::process_table::carry_names(&mut self.ebpf, &dir);
        self.previous_pins = Some(dir);
    }

    /// Writes the executable of every process already running into
    /// PROCESSES (the tracepoints, attached just before, keep every later
    /// one; an entry they wrote meanwhile is newer and stays): carried over
    /// from the previous agent, else read from `/proc`.
    fn scan_processes(&mut self) {
        if let Some(previous) = self.previous_pins.take() {
            match super::process_table::carry_over(&mut self.ebpf, &previous) {
                Some(carried) => {
                    tracing::info!(
                        processes = carried,
                        "executables of the processes already running carried over from the previous agent"
                    );
                    return;
                }
                None => tracing::warn!(
                    pins = %previous.display(),
                    "cannot read the previous agent's table of executables: reading /proc instead, which a process can forge (docs/threat-model.md, row 70)"
                ),
            }
        }
        let found = crate::process::scan::processes(Path::new("/proc"));
        let map = super::map_access::map_mut::<
            aya::maps::HashMap<&mut aya::maps::MapData, u32, agent_common::ExeId>,
        >(&mut self.ebpf, names::PROCESSES);
        let Ok(mut map) = map else {
            tracing::warn!("cannot open the PROCESSES map: processes started before the agent have no known executable until they exec or fork");
            return;
        };
        let mut written = 0usize;
        for p in &found {
            if map.insert(p.tgid, p.exe.to_kernel(), BPF_NOEXIST).is_ok() {
                written += 1;
            }
        }
        tracing::info!(
            processes = found.len(),
            written,
            "executables of the processes already running are known"
        );
        self.scanned = found;
    }

    /// The processes the start's scan found (once; empty after): the
    /// naming stage keeps their paths, for a process that predates the
    /// agent and exits before its decisions are named.
    pub fn take_scanned(&mut self) -> Vec<crate::process::scan::Found> {
        std::mem::take(&mut self.scanned)
    }

    /// Pins every map still held (call before any is taken out) under
    /// `dir/maps`.
    pub fn pin_maps(&self, dir: &Path) -> Result<(), KernelError> {
        let maps = dir.join("maps");
        fs::create_dir_all(&maps).map_err(|e| KernelError::Pin {
            path: maps.clone(),
            reason: e.to_string(),
        })?;
        for (name, map) in self.ebpf.maps() {
            // aya-log's and .rodata/.bss maps are the object's own business.
            if name.starts_with('.') || name == names::AYA_LOGS {
                continue;
            }
            let path = maps.join(name);
            map.pin(&path).map_err(|e| KernelError::Pin {
                path,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Stops without detaching: pinned links stay attached and keep
    /// enforcing (the normal stop; a new agent takes over from the pins).
    /// Unpinned links are detached.
    pub fn leave_pinned(self) {
        drop(self.links);
        drop(self.inbound);
        drop(self.ebpf);
    }

    /// Detaches every program and removes its pins.
    pub fn detach(mut self) {
        if let Some(inbound) = self.inbound.as_mut() {
            inbound.detach();
        }
        for link in self.links {
            if let Attached::Pinned(pinned) = link {
                let _ = pinned.unpin();
            }
        }
        drop(self.ebpf);
    }

    /// Applies service cgroup changes to the SERVICES map; returns those
    /// that failed.
    pub fn apply_service_changes(
        &mut self,
        changes: &[super::Change],
    ) -> Result<Vec<(super::Change, String)>, KernelError> {
        maps::apply_service_changes(&mut self.ebpf, changes)
    }

    /// Makes the kernel judge each socket in `now` (cookie -> cgroup id of
    /// the managed service holding it) by its holder; sockets of the last
    /// call that are gone are forgotten. Returns how many did not fit.
    pub fn set_held_sockets(
        &mut self,
        now: std::collections::HashMap<u64, u64>,
    ) -> Result<u64, KernelError> {
        if now == self.held {
            return Ok(0);
        }
        let overflow = maps::write_held_sockets(&mut self.ebpf, &self.held, &now)?;
        self.held = now;
        Ok(overflow)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// The maps sized at load time, with their `max_entries` (bytes for the
/// ring buffer). aya ignores a name the object has no map for, so
/// `contract.rs` checks each against the embedded object.
fn map_sizes(capacity: Capacity, options: &LoadOptions) -> Vec<(&'static str, u32)> {
    // Service ids and rulesets of both halves (see layout.rs).
    let max_services = capacity.services.saturating_mul(2);
    let mut sizes = vec![
        (names::SERVICES, options.max_cgroups),
        (names::COUNTERS, max_services.saturating_mul(COUNTER_SLOTS)),
        (names::EVENTS, options.events_bytes),
        (names::DENY_RATE, max_services.saturating_mul(2)),
        (names::SERVICE_PATHS, max_services),
        (names::UNIT_NAMES, max_services),
        (names::UDP_PEER_COUNT, max_services),
        (names::UDP_PEER_RELEASED, max_services),
        // Every service's bound fits (entries are allocated as used), so
        // one service's pinholes never crowd out another's.
        (
            names::UDP_PEERS,
            options.udp_peers_per_service.saturating_mul(max_services),
        ),
        (names::RULESETS, capacity.rulesets.saturating_mul(2)),
        (names::FLOWS, options.flow_table),
        (names::SOCK_OWNERS, options.sock_owners),
        (agent_common::LEARNT, options.max_learnt),
        (agent_common::LEARNT_V4, options.max_learnt),
    ];
    sizes.extend(capacity.prefixes);
    sizes
}

/// The size the kernel gives a ring buffer asked for `bytes` (a power of
/// two, as the config requires): at least a page, as aya rounds it.
fn ring_size(bytes: u32) -> u64 {
    // SAFETY: sysconf reads no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::from(bytes).max(u64::try_from(page).unwrap_or(4096))
}

/// The globals set at load time, with the bytes of their values (in
/// native order, as aya copies a value).
fn global_values(
    options: &LoadOptions,
    process_offsets: [u32; agent_common::PROCESS_OFFSETS_LEN],
) -> [(&'static str, Vec<u8>); 6] {
    let idle_ns = u64::try_from(options.udp_reply_idle.as_nanos()).unwrap_or(u64::MAX);
    [
        (globals::BPF_LOG, vec![u8::from(options.bpf_log)]),
        (
            globals::OBSERVE_UNMANAGED,
            vec![u8::from(options.observe_unmanaged)],
        ),
        (globals::UDP_REPLY_IDLE_NS, idle_ns.to_ne_bytes().to_vec()),
        (
            globals::UDP_PEERS_MAX,
            options.udp_peers_per_service.to_ne_bytes().to_vec(),
        ),
        (
            globals::EVENTS_WAKE_MARK,
            (ring_size(options.events_bytes) / agent_common::WAKE_FRACTION)
                .to_ne_bytes()
                .to_vec(),
        ),
        (
            globals::PROCESS_OFFSETS,
            process_offsets
                .iter()
                .flat_map(|o| o.to_ne_bytes())
                .collect(),
        ),
    ]
}

fn fd_link<E: std::fmt::Display>(
    name: &'static str,
    link: Result<FdLink, E>,
) -> Result<FdLink, KernelError> {
    link.map_err(|e| KernelError::Pin {
        path: std::path::PathBuf::from(name),
        reason: format!("link is not a BPF link: {e}"),
    })
}

/// Attaches the cgroup_skb program `name` at the cgroup `root` in
/// `direction`, its link taken out of aya's bookkeeping (see [`keep`]).
fn attach_skb(
    name: &'static str,
    program: &mut aya::programs::Program,
    root: &File,
    direction: CgroupSkbAttachType,
) -> Result<FdLink, KernelError> {
    let err = |source| KernelError::Program { name, source };
    let p = as_type::<CgroupSkb>(name, program)?;
    let id = p
        .attach(root, direction, CgroupAttachMode::Single)
        .map_err(err)?;
    fd_link(name, p.take_link(id).map_err(err)?.try_into())
}

/// Keeps the link of program `name`: pinned as `links_dir/name`, so that
/// it outlives this process, or owned by it when there is no pin
/// directory.
fn keep(
    name: &'static str,
    link: FdLink,
    links_dir: Option<&Path>,
) -> Result<Attached, KernelError> {
    let Some(dir) = links_dir else {
        return Ok(Attached::Owned(link));
    };
    let path = dir.join(name);
    let pinned = link.pin(&path).map_err(|e| KernelError::Pin {
        path,
        reason: e.to_string(),
    })?;
    Ok(Attached::Pinned(pinned))
}

fn as_type<'a, T>(
    name: &'static str,
    program: &'a mut aya::programs::Program,
) -> Result<&'a mut T, KernelError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    program
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

/// `BPF_NOEXIST`: insert only a key that is not there.
const BPF_NOEXIST: u64 = 1;

/// Tracepoints are attached by name through tracefs; mount it where the
/// kernel expects it when nothing is mounted there (as systemd would).
fn ensure_tracefs() -> Result<(), String> {
    let path = Path::new("/sys/kernel/tracing");
    if path.join("events").exists() {
        return Ok(());
    }
    match super::pins::mount_pseudo_fs(c"tracefs", path) {
        Ok(()) => {
            tracing::info!("mounted tracefs at /sys/kernel/tracing (it was not mounted)");
            Ok(())
        }
        Err(e) => Err(format!(
            "tracefs is not mounted and mounting it failed: {e}"
        )),
    }
}
