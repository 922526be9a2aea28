//! The gate in front of every test that needs root and BPF.
//!
//! Without them a test says so on stderr (`SKIPPED: ...`) and returns; with
//! `BULKHEAD_REQUIRE_BPF=1` (CI, `cargo xtask test` as root) it fails
//! instead, so nothing is ever skipped silently.

use std::io::{self, Write as _};

/// The switch that turns "skip" into "fail".
pub const REQUIRE_ENV: &str = "BULKHEAD_REQUIRE_BPF";

/// Whether this process may load BPF programs and make cgroups and network
/// namespaces. If not: panics when `BULKHEAD_REQUIRE_BPF=1`, otherwise prints
/// a `SKIPPED` line naming the test and the reason, and returns false.
///
/// Use as `if !require_bpf() { return; }` at the top of a test.
#[must_use]
pub fn require_bpf() -> bool {
    let Err(reason) = check() else {
        return true;
    };
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    assert!(
        std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
        "{test}: {reason}, and {REQUIRE_ENV}=1 says this must not be skipped"
    );
    // Straight to fd 2, past libtest's output capture, so the skip shows
    // even when the test "passes".
    let _ = writeln!(
        io::stderr(),
        "SKIPPED: {test}: needs root with BPF ({reason}); set {REQUIRE_ENV}=1 to fail instead"
    );
    false
}

fn check() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".to_owned());
    }
    bpf_usable()
}

/// Asks the kernel for the first loaded program id: ENOENT (none loaded) or
/// success mean the `bpf()` syscall is there and we may use it.
fn bpf_usable() -> Result<(), String> {
    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    // union bpf_attr { struct { __u32 start_id, next_id, open_flags; } ... }
    let mut attr = [0u32; 4];
    let size = std::mem::size_of_val(&attr);
    // SAFETY: `attr` is a valid, zeroed buffer of `size` bytes that lives
    // across the call; BPF_PROG_GET_NEXT_ID only writes `next_id` inside it.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_GET_NEXT_ID, attr.as_mut_ptr(), size) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(()),
        _ => Err(format!("bpf(BPF_PROG_GET_NEXT_ID) failed: {err}")),
    }
}

/// `Some(path)` of the tool `name` on `PATH`, or (after a `SKIPPED` line
/// naming Debian's `package`) `None`; under `BULKHEAD_REQUIRE_BPF=1` a
/// missing tool fails the test instead.
#[must_use]
pub fn require_tool(name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_some() {
        return found;
    }
    let current = std::thread::current();
    let test = current.name().unwrap_or("this test");
    let why = format!(
        "`{name}` is not installed (Debian package `{package}`: apt-get install {package})"
    );
    assert!(
        std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
        "{test}: {why}, and {REQUIRE_ENV}=1 says this must not be skipped"
    );
    let _ = writeln!(
        io::stderr(),
        "SKIPPED: {test}: {why}; set {REQUIRE_ENV}=1 to fail instead"
    );
    None
}

/// A server the tests start and never skip: the binary `$env` names, else
/// `name` on `PATH` or in `debian_dir` (where Debian's package puts it).
/// Panics saying how to install it.
#[must_use]
pub fn server_binary(env: &str, name: &str, debian_dir: &str) -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os(env) {
        let bin = std::path::PathBuf::from(bin);
        assert!(bin.is_file(), "{env}={} is not a file", bin.display());
        return bin;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([std::path::PathBuf::from(debian_dir)])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run `cargo xtask setup` (it installs Debian's \
                 package), or set {env} to a server binary"
            )
        })
}
