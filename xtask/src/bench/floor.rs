//! The "trivial hook" cases: the least any program can cost where bulkhead
//! attaches. Programs of two instructions (`r0 = 1; exit`: allow or pass at
//! once), loaded with the raw bpf(2) syscall and attached to the case's own
//! cgroup for its run only, so the probes pay the kernel's cost of running
//! cgroup programs and nothing of a program's own work. Two sets:
//! connect4 and sendmsg4 only (the floor goal (c) is read against), and one
//! program on every hook bulkhead attaches (what its design costs before
//! any of its work: a sendto() also passes the packet hooks).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

/// `enum bpf_cmd` (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_prog_type`.
const PROG_TYPE_CGROUP_SKB: u32 = 8;
const PROG_TYPE_CGROUP_SOCK: u32 = 9;
const PROG_TYPE_SOCK_OPS: u32 = 13;
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_TYPE_CGROUP_SOCKOPT: u32 = 25;
/// `enum bpf_attach_type`.
const CGROUP_INET_EGRESS: u32 = 1;
const CGROUP_INET_SOCK_CREATE: u32 = 2;
const CGROUP_SOCK_OPS: u32 = 3;
const CGROUP_INET4_BIND: u32 = 8;
const CGROUP_INET6_BIND: u32 = 9;
const CGROUP_INET4_CONNECT: u32 = 10;
const CGROUP_INET6_CONNECT: u32 = 11;
const CGROUP_UDP4_SENDMSG: u32 = 14;
const CGROUP_UDP6_SENDMSG: u32 = 15;
const CGROUP_UDP4_RECVMSG: u32 = 19;
const CGROUP_UDP6_RECVMSG: u32 = 20;
const CGROUP_SETSOCKOPT: u32 = 22;
const CGROUP_INET4_GETPEERNAME: u32 = 29;
const CGROUP_INET6_GETPEERNAME: u32 = 30;
const CGROUP_INET_SOCK_RELEASE: u32 = 34;
/// Attach beside whatever else is attached there (none is, in its case).
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// One trivial program: its type, where it attaches, and its name
/// (bpftool shows it).
#[derive(Clone, Copy)]
pub struct Hook {
    prog_type: u32,
    attach_type: u32,
    name: &'static str,
}

const fn hook(prog_type: u32, attach_type: u32, name: &'static str) -> Hook {
    Hook {
        prog_type,
        attach_type,
        name,
    }
}

/// The hooks the UDP probes' calls are judged at.
pub const CALL_HOOKS: [Hook; 2] = [
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_INET4_CONNECT,
        "floor_connect4",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_UDP4_SENDMSG,
        "floor_sendmsg4",
    ),
];

/// Every hook bulkhead attaches for the bench's policies: all of its
/// hooks but the inbound packet one, attached only while a policy needs
/// it (agent/src/kernel/loader/on_demand.rs), which no bench policy does
/// (no inbound rule, bind list, quarantine or name rule). Its sock_ops
/// program also asks for TCP state callbacks, which the trivial one does
/// not: those extra calls are bulkhead's own cost.
pub const ALL_HOOKS: [Hook; 15] = [
    hook(PROG_TYPE_CGROUP_SKB, CGROUP_INET_EGRESS, "floor_egress"),
    hook(
        PROG_TYPE_CGROUP_SOCK,
        CGROUP_INET_SOCK_CREATE,
        "floor_sock_crea",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK,
        CGROUP_INET_SOCK_RELEASE,
        "floor_sock_rele",
    ),
    hook(PROG_TYPE_SOCK_OPS, CGROUP_SOCK_OPS, "floor_sockops"),
    hook(PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET4_BIND, "floor_bind4"),
    hook(PROG_TYPE_CGROUP_SOCK_ADDR, CGROUP_INET6_BIND, "floor_bind6"),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_INET4_CONNECT,
        "floor_connect4",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_INET6_CONNECT,
        "floor_connect6",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_UDP4_SENDMSG,
        "floor_sendmsg4",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_UDP6_SENDMSG,
        "floor_sendmsg6",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_UDP4_RECVMSG,
        "floor_recvmsg4",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_UDP6_RECVMSG,
        "floor_recvmsg6",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_INET4_GETPEERNAME,
        "floor_getpeer4",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCK_ADDR,
        CGROUP_INET6_GETPEERNAME,
        "floor_getpeer6",
    ),
    hook(
        PROG_TYPE_CGROUP_SOCKOPT,
        CGROUP_SETSOCKOPT,
        "floor_setsockop",
    ),
];

/// `struct bpf_insn`: opcode, dst_reg (low nibble) and src_reg (high
/// nibble), offset, immediate.
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = 1` (BPF_ALU64 | BPF_MOV | BPF_K) then `exit` (BPF_JMP | BPF_EXIT):
/// 1 lets the call (or the packet, or the setsockopt()) go on.
const PROGRAM: [Insn; 2] = [
    Insn {
        code: 0x07 | 0xb0,
        regs: 0,
        off: 0,
        imm: 1,
    },
    Insn {
        code: 0x05 | 0x90,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`; the
/// kernel zero-fills the fields after the size passed.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH and BPF_PROG_DETACH.
#[repr(C)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The floor's programs, attached to one cgroup until `detach` (or drop).
pub struct Floor {
    cgroup: File,
    /// (attach type, program fd, program id).
    programs: Vec<(u32, OwnedFd, u32)>,
}

impl Floor {
    /// Loads a program per hook and attaches it to `cgroup`.
    pub fn attach(cgroup: &Path, hooks: &[Hook]) -> Result<Self> {
        let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let mut floor = Self {
            cgroup: dir,
            programs: Vec::new(),
        };
        for &Hook {
            prog_type,
            attach_type,
            name,
        } in hooks
        {
            let prog = load(prog_type, attach_type, name)
                .with_context(|| format!("load the trivial {name} program"))?;
            let id = program_id(&prog).with_context(|| format!("the id of {name}"))?;
            attach_cmd(BPF_PROG_ATTACH, &floor.cgroup, &prog, attach_type)
                .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
            floor.programs.push((attach_type, prog, id));
        }
        Ok(floor)
    }

    /// The kernel's ids of the attached programs (as bpftool lists them).
    pub fn ids(&self) -> Vec<u32> {
        self.programs.iter().map(|(_, _, id)| *id).collect()
    }

    /// Detaches every program; closing their fds then frees them.
    pub fn detach(mut self) -> Result<()> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for (attach_type, prog, _) in self.programs.drain(..) {
            if let Err(e) = attach_cmd(BPF_PROG_DETACH, &self.cgroup, &prog, attach_type) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e).context("detach the trivial programs"),
            None => Ok(()),
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Err(e) = self.detach_all() {
            eprintln!("xtask bench: WARNING: {e:#}");
        }
    }
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of
    // `union bpf_attr` for `cmd`, of the size passed; the pointers inside it
    // point to memory that outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn load(prog_type: u32, attach_type: u32, name: &str) -> Result<OwnedFd> {
    let license = CString::new("GPL").context("license")?;
    let mut prog_name = [0u8; 16];
    // At most 15 bytes, so the name stays NUL-terminated.
    for (dst, src) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr).context("bpf(BPF_PROG_LOAD)")?;
    let fd = i32::try_from(fd).context("bpf() returned an odd fd")?;
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The program's id: `struct bpf_prog_info` starts with `type` then `id`,
/// and the kernel fills no more than the `info_len` asked for.
fn program_id(prog: &OwnedFd) -> Result<u32> {
    let mut info = [0u32; 2];
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(prog)?,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("bpf(BPF_OBJ_GET_INFO_BY_FD)")?;
    Ok(info[1])
}

fn attach_cmd(cmd: libc::c_long, cgroup: &File, prog: &OwnedFd, attach_type: u32) -> Result<()> {
    let mut attr = AttachAttr {
        target_fd: fd_u32(cgroup)?,
        attach_bpf_fd: fd_u32(prog)?,
        attach_type,
        attach_flags: if cmd == BPF_PROG_ATTACH {
            BPF_F_ALLOW_MULTI
        } else {
            0
        },
    };
    bpf(cmd, &mut attr)?;
    Ok(())
}

fn fd_u32(fd: &impl AsRawFd) -> Result<u32> {
    u32::try_from(fd.as_raw_fd()).context("negative fd")
}
