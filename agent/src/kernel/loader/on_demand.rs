//! The inbound packet program, attached only while a policy needs it.
//!
//! `bulkhead_ingress` runs for every packet the host receives, in every
//! cgroup. With no service restricting inbound traffic, binding, in
//! quarantine or with name rules it only reads ACTIVE_FLAGS and passes,
//! but the kernel's call into it stays: on a CPU whose returns go through
//! a thunk (AMD's SRSO "Safe RET") that call is most of the cost, about
//! 60 ns of a loopback sendto() here (BENCHMARKS.md, the trivial hooks).
//! So it is attached when the flags in force ask for it and detached when
//! they stop: attached before the flags that need it are written (a switch
//! fails, and the old policy stays, when it cannot be), detached after
//! they are gone.

use std::path::{Path, PathBuf};

use agent_common::{FLAG_BIND, FLAG_INGRESS, FLAG_NAMES, FLAG_QUARANTINE};
use aya::{programs::CgroupSkbAttachType, Ebpf};

use super::{attach_skb, keep, Attached};
use crate::kernel::KernelError;

/// The program attached on demand.
pub const PROGRAM: &str = "bulkhead_ingress";

/// Flags of ACTIVE_FLAGS whose services the inbound program judges or
/// serves (names.rs's `stamp_query` for the DNS proxy).
const NEEDS: u32 = (FLAG_INGRESS | FLAG_QUARANTINE | FLAG_BIND | FLAG_NAMES) as u32;

/// Whether a policy whose services have `active` flags (see
/// `maps::active_flags`) needs the inbound program.
pub fn needed(active: u32) -> bool {
    active & NEEDS != 0
}

/// Where the inbound link is attached and pinned.
pub struct Inbound {
    /// The cgroup2 mount (the programs attach at its root).
    pub cgroup_root: PathBuf,
    /// The directory its link is pinned in (`PIN/links`), if pinning.
    pub links_dir: Option<PathBuf>,
    pub link: Option<Attached>,
}

impl Inbound {
    /// Attaches the program at the cgroup2 root (and pins its link) unless
    /// it already is.
    pub fn attach(&mut self, ebpf: &mut Ebpf) -> Result<(), KernelError> {
        if self.link.is_some() {
            return Ok(());
        }
        let root =
            std::fs::File::open(&self.cgroup_root).map_err(|source| KernelError::Cgroup {
                path: self.cgroup_root.clone(),
                source,
            })?;
        let program = ebpf
            .program_mut(PROGRAM)
            .ok_or(KernelError::MissingProgram(PROGRAM))?;
        let link = attach_skb(PROGRAM, program, &root, CgroupSkbAttachType::Ingress)?;
        if let Some(dir) = &self.links_dir {
            // A pin left by an earlier attach of ours that could not be
            // removed would make this one fail: replace it.
            let _ = std::fs::remove_file(dir.join(PROGRAM));
        }
        self.link = Some(keep(PROGRAM, link, self.links_dir.as_deref())?);
        tracing::info!(
            program = PROGRAM,
            "inbound packets are judged: a policy in force restricts inbound traffic or binding, quarantines, or has name rules"
        );
        Ok(())
    }

    /// Detaches the program (and removes its pin) if it is attached. A
    /// failure costs only time per packet: logged, and the link kept, so
    /// that a later call tries again.
    pub fn detach(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        // By its path now: the pin moved with its directory since it was
        // made (see `pins_moved_to`), so the link's own record of it is
        // stale. With the pin gone, dropping the link detaches it.
        if let Some(dir) = &self.links_dir {
            let path = dir.join(PROGRAM);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(program = PROGRAM, pin = %path.display(), error = %e, "cannot remove the inbound program's pin: it stays attached");
                    self.link = Some(link);
                    return;
                }
            }
        }
        drop(link);
        tracing::info!(
            program = PROGRAM,
            "inbound packets are no longer judged: no policy in force needs it"
        );
    }

    /// The pins moved (a start's staging directory became `current`).
    pub fn pins_moved_to(&mut self, pins: &Path) {
        if self.links_dir.is_some() {
            self.links_dir = Some(pins.join("links"));
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_common::{ACTIVE_ICMP, ACTIVE_MANAGED, FLAG_ALLOW_PACKET, FLAG_ALLOW_RAW};

    use super::*;

    #[test]
    fn the_attach_loop_leaves_exactly_this_program_to_the_on_demand_attach() {
        let skipped: Vec<&str> = super::super::PROGRAMS
            .iter()
            .filter(|(_, hook)| *hook == super::super::Hook::SkbIngress)
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(skipped, [PROGRAM]);
    }

    #[test]
    fn only_inbound_rules_binds_quarantine_and_names_need_it() {
        assert!(!needed(0));
        assert!(!needed(
            ACTIVE_MANAGED | ACTIVE_ICMP | u32::from(FLAG_ALLOW_RAW | FLAG_ALLOW_PACKET)
        ));
        for flag in [FLAG_INGRESS, FLAG_QUARANTINE, FLAG_BIND, FLAG_NAMES] {
            assert!(needed(ACTIVE_MANAGED | u32::from(flag)), "flag {flag:#x}");
        }
    }
}
