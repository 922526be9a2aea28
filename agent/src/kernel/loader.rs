//! Loads the embedded eBPF object, sizes its maps from the policy, fills
//! them, and attaches the programs once at the cgroup2 root.

use std::{fs::File, path::Path};

use agent_common::{
    maps as names, COUNTER_SLOTS, DEFAULT_EVENTS_BYTES, DEFAULT_MAX_PREFIXES, DEFAULT_MAX_RULESETS,
    DEFAULT_MAX_SERVICES,
};
use aya::{
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId, CgroupAttachMode,
        CgroupSockAddr, SockOps,
    },
    Ebpf, EbpfLoader,
};

use super::{compile::CompiledPolicy, maps, KernelError, ResolvedService};

/// The kernel programs, built by build.rs and embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-ebpf"));

/// The cgroup/sock_addr programs, in attach order.
pub const PROGRAMS: [&str; 6] = [
    "bulkhead_bind4",
    "bulkhead_bind6",
    "bulkhead_connect4",
    "bulkhead_connect6",
    "bulkhead_sendmsg4",
    "bulkhead_sendmsg6",
];
/// The sock_ops program (TCP lifecycle events).
pub const SOCK_OPS: &str = "bulkhead_sockops";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Turn on aya-log diagnostics in the kernel programs.
    pub bpf_log: bool,
    /// Emit events (never enforce) for tasks outside every managed service.
    pub observe_unmanaged: bool,
    /// Size of the event ring buffer in bytes (a power of two, >= 4096).
    pub events_bytes: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            bpf_log: false,
            observe_unmanaged: false,
            events_bytes: DEFAULT_EVENTS_BYTES,
        }
    }
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct Enforcer {
    ebpf: Ebpf,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    sock_ops_link: Option<SockOpsLinkId>,
    /// How many services the COUNTERS map has room for.
    pub max_services: u32,
}

impl Enforcer {
    /// Loads the programs into the kernel (not attached yet), with maps
    /// large enough for `policy`.
    pub fn load(policy: &CompiledPolicy, options: &LoadOptions) -> Result<Self, KernelError> {
        let size = |needed: usize, floor: u32| -> u32 {
            // Headroom for services and rules added by later reloads.
            u32::try_from(needed.saturating_mul(2))
                .unwrap_or(u32::MAX)
                .max(floor)
        };
        let bpf_log = u8::from(options.bpf_log);
        let observe = u8::from(options.observe_unmanaged);
        let max_services = size(policy.services.len(), DEFAULT_MAX_SERVICES);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::SERVICES, max_services)
            .map_max_entries(names::COUNTERS, max_services.saturating_mul(COUNTER_SLOTS))
            .map_max_entries(names::EVENTS, options.events_bytes)
            .map_max_entries(
                names::EGRESS_V4,
                size(policy.v4.len(), DEFAULT_MAX_PREFIXES),
            )
            .map_max_entries(
                names::EGRESS_V6,
                size(policy.v6.len(), DEFAULT_MAX_PREFIXES),
            )
            .map_max_entries(
                names::RULESETS,
                size(policy.rulesets.len(), DEFAULT_MAX_RULESETS),
            )
            .override_global("BPF_LOG", &bpf_log, true)
            .override_global("OBSERVE_UNMANAGED", &observe, true)
            .load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| KernelError::Program { name, source })?;
        }
        sock_ops(&mut ebpf)?
            .load()
            .map_err(|source| KernelError::Program {
                name: SOCK_OPS,
                source,
            })?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
            sock_ops_link: None,
            max_services,
        })
    }

    /// Writes the policy into the maps. Call before `attach` so that the
    /// first connection judged already sees the whole policy.
    pub fn write_policy(
        &mut self,
        policy: &CompiledPolicy,
        resolved: &[ResolvedService],
    ) -> Result<(), KernelError> {
        maps::write(&mut self.ebpf, policy, resolved)
    }

    /// Attaches every program at the cgroup2 root (one attach serves every
    /// service). The attach is a BPF link (kernel >= 5.7), which is always
    /// "multi": other tools' programs (systemd's IPAddressAllow, for
    /// instance) stay in place, the kernel runs them all and a connection
    /// needs every one to allow it. Links take no attach flags, hence
    /// `Single` (flags 0) here.
    pub fn attach(&mut self, cgroup_root: &Path) -> Result<(), KernelError> {
        let root = File::open(cgroup_root).map_err(|source| KernelError::Cgroup {
            path: cgroup_root.to_path_buf(),
            source,
        })?;
        for name in PROGRAMS {
            let link = program(&mut self.ebpf, name)?
                .attach(&root, CgroupAttachMode::Single)
                .map_err(|source| KernelError::Program { name, source })?;
            self.links.push((name, link));
        }
        let link = sock_ops(&mut self.ebpf)?
            .attach(&root, CgroupAttachMode::Single)
            .map_err(|source| KernelError::Program {
                name: SOCK_OPS,
                source,
            })?;
        self.sock_ops_link = Some(link);
        Ok(())
    }

    /// Detaches every program (the maps go when `self` is dropped).
    pub fn detach(&mut self) -> Result<(), KernelError> {
        let mut first_error = None;
        for (name, link) in self.links.drain(..) {
            let result = program(&mut self.ebpf, name).and_then(|p| {
                p.detach(link)
                    .map_err(|source| KernelError::Program { name, source })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        if let Some(link) = self.sock_ops_link.take() {
            let result = sock_ops(&mut self.ebpf).and_then(|p| {
                p.detach(link).map_err(|source| KernelError::Program {
                    name: SOCK_OPS,
                    source,
                })
            });
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, KernelError> {
    ebpf.program_mut(name)
        .ok_or(KernelError::MissingProgram(name))?
        .try_into()
        .map_err(|source| KernelError::Program { name, source })
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, KernelError> {
    ebpf.program_mut(SOCK_OPS)
        .ok_or(KernelError::MissingProgram(SOCK_OPS))?
        .try_into()
        .map_err(|source| KernelError::Program {
            name: SOCK_OPS,
            source,
        })
}
