//! Name lookups the way a real service makes them: glibc's `getaddrinfo`
//! (what `std`'s `ToSocketAddrs` calls), reading `/etc/resolv.conf` and
//! `/etc/nsswitch.conf`, which `--bind` replaces in a mount namespace of
//! the probe's own (the host's files are never touched).
//!
//! - `resolve-connect NAME PORT`: one lookup, then a TCP connect to the
//!   first address it gave and a read of the listener's byte; a failed
//!   lookup is stage `resolve`.
//! - `resolve-loop NAME PORT`: for each stdin line `N`, N such rounds;
//!   one JSON line per batch with exact counts (see [`resolve_loop`]).
//! - `exec CMD ARGS...`: runs CMD in the probe's cgroup and mount
//!   namespace (curl with the test's own resolv.conf).

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{self, BufRead as _, Write as _},
    net::{SocketAddr, ToSocketAddrs as _},
    os::unix::process::CommandExt as _,
    process::Command,
};

use serde_json::json;

use crate::client::{self, Ctx, Failure};

/// `--bind SRC=DST`: the first one moves the probe into a mount namespace
/// of its own (private propagation, so nothing reaches the host's), then
/// each bind-mounts SRC over DST there.
pub fn bind(spec: &str, private: &mut bool) -> Result<(), String> {
    let (src, dst) = spec
        .split_once('=')
        .ok_or_else(|| format!("bad --bind {spec:?} (want SRC=DST)"))?;
    if !*private {
        // SAFETY: plain syscalls; the probe is single-threaded here.
        if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
            return Err(format!(
                "unshare(CLONE_NEWNS): {}",
                io::Error::last_os_error()
            ));
        }
        let root = CString::new("/").map_err(|e| e.to_string())?;
        // SAFETY: a NUL-ended path; no source, type or data.
        let done = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        if done != 0 {
            return Err(format!(
                "cannot make / private in the probe's mount namespace: {}",
                io::Error::last_os_error()
            ));
        }
        *private = true;
    }
    let c = |p: &str| CString::new(p).map_err(|e| format!("path {p:?}: {e}"));
    let (c_src, c_dst) = (c(src)?, c(dst)?);
    // SAFETY: NUL-ended paths; a bind mount takes no type or data.
    let done = unsafe {
        libc::mount(
            c_src.as_ptr(),
            c_dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if done != 0 {
        return Err(format!(
            "mount --bind {src} {dst}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// getaddrinfo(NAME, PORT): every address, in glibc's order.
fn lookup(name: &str, port: u16) -> Result<Vec<SocketAddr>, Failure> {
    let addrs: Vec<SocketAddr> = (name, port)
        .to_socket_addrs()
        .map_err(client::at("resolve"))?
        .collect();
    if addrs.is_empty() {
        return Err(Failure {
            stage: "resolve",
            err: io::Error::other("getaddrinfo gave no address"),
        });
    }
    Ok(addrs)
}

/// One round: look `name` up, connect to the first address, read the byte.
/// Returns the address connected to.
fn round(ctx: &mut Ctx, name: &str, port: u16) -> Result<SocketAddr, Failure> {
    let first = lookup(name, port)?[0];
    client::tcp_connect(ctx, first)?;
    Ok(first)
}

/// `resolve-connect NAME PORT`.
pub fn resolve_connect(ctx: &mut Ctx, name: &str, port: u16) -> Result<(), Failure> {
    round(ctx, name, port).map(|_| ())
}

/// `resolve-loop NAME PORT`: per stdin line `N`, N rounds, then one line
/// `{"rounds":N,"connected":C,"eperm":E,"resolve_failed":R,"other_failed":O,
/// "peers":{"ADDR":COUNT,...},"errors":[first few failures]}`. Exits at
/// the end of stdin.
pub fn resolve_loop(ctx: &mut Ctx, name: &str, port: u16) -> Result<(), String> {
    say(&json!({ "ready": true }).to_string())?;
    for line in io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let rounds: u64 = line
            .trim()
            .parse()
            .map_err(|e| format!("bad batch size {line:?}: {e}"))?;
        let (mut connected, mut eperm, mut resolve_failed, mut other_failed) =
            (0u64, 0u64, 0u64, 0u64);
        let mut peers: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors = Vec::new();
        for _ in 0..rounds {
            ctx.local = None;
            match round(ctx, name, port) {
                Ok(peer) => {
                    connected += 1;
                    *peers.entry(peer.ip().to_string()).or_default() += 1;
                }
                Err(f) => {
                    if f.stage == "resolve" {
                        resolve_failed += 1;
                    } else if f.err.raw_os_error() == Some(libc::EPERM) {
                        eperm += 1;
                    } else {
                        other_failed += 1;
                    }
                    if errors.len() < 10 {
                        errors.push(format!("{}: {}", f.stage, f.err));
                    }
                }
            }
        }
        let report = json!({
            "rounds": rounds,
            "connected": connected,
            "eperm": eperm,
            "resolve_failed": resolve_failed,
            "other_failed": other_failed,
            "peers": peers,
            "errors": errors,
        });
        say(&report.to_string())?;
    }
    Ok(())
}

fn say(line: &str) -> Result<(), String> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

/// `exec CMD ARGS...`: replaces the probe with CMD (returns only on error).
pub fn exec(command: &[&str]) -> String {
    let Some((cmd, args)) = command.split_first() else {
        return "exec: no command".to_owned();
    };
    let err = Command::new(cmd).args(args).exec();
    format!("exec {cmd}: {err}")
}
