//! A BPF link made and pinned with the bpf(2) system call directly, for
//! the one program aya cannot hand over as a pinnable link: aya 0.14 keeps
//! a cgroup/setsockopt program's link private (no conversion into an
//! `FdLink`), so it could not outlive the agent like the other programs.
//! Two small calls, kept here until aya offers the conversion.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_CGROUP_SETSOCKOPT.
pub const ATTACH_CGROUP_SETSOCKOPT: u32 = 22;

/// The bpf_attr union, as large as any command here needs (zero-filled).
#[repr(C, align(8))]
struct Attr([u8; 128]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised bpf_attr of sufficient size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Attaches `prog` to the cgroup `target` as a BPF link.
pub fn link_create(prog: impl AsFd, target: impl AsFd, attach_type: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 128]);
    let prog_fd = u32::try_from(prog.as_fd().as_raw_fd()).map_err(io::Error::other)?;
    let target_fd = u32::try_from(target.as_fd().as_raw_fd()).map_err(io::Error::other)?;
    attr.0[0..4].copy_from_slice(&prog_fd.to_ne_bytes());
    attr.0[4..8].copy_from_slice(&target_fd.to_ne_bytes());
    attr.0[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel returned a new file descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins `fd` (a link) at `path` on bpffs.
pub fn pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = Attr([0; 128]);
    attr.0[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    let fd = u32::try_from(fd.as_fd().as_raw_fd()).map_err(io::Error::other)?;
    attr.0[8..12].copy_from_slice(&fd.to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}
