//! `cargo xtask run`: the agent on the example policies in `policies/`.

use std::{
    io,
    os::unix::process::ExitStatusExt,
    process::{Command, ExitCode, ExitStatus},
};

use anyhow::{bail, Context, Result};

use crate::{
    build,
    util::{find_in_path, is_root, target_dir, workspace_root},
};

pub fn run(args: &[String]) -> Result<ExitCode> {
    build::run(false)?;
    let bin = target_dir()?.join("debug").join("bulkhead");
    // Built as the invoking user (so target/ stays theirs), run as root.
    let mut cmd = if is_root() {
        Command::new(&bin)
    } else if let Some(sudo) = find_in_path("sudo") {
        eprintln!("xtask: bulkhead needs root; running it under sudo");
        let mut cmd = Command::new(sudo);
        cmd.arg("-E").arg(&bin);
        cmd
    } else {
        bail!("bulkhead needs root (BPF, cgroups) and there is no sudo: run `cargo xtask run` as root");
    };
    cmd.current_dir(workspace_root())
        .args(["run", "--config", "policies/config/bulkhead.toml"])
        .args(["--policy-dir", "policies"])
        .args(args);

    outlive_sigint().context("failed to set a SIGINT handler")?;
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {}", bin.display()))?;
    Ok(exit_code(status))
}

/// Ctrl-C goes to the whole foreground process group: the agent gets it and
/// shuts down on its own, and we must stay alive to wait for it and pass its
/// exit code on. A handler that does nothing, not `SIG_IGN`: exec resets a
/// handler to the default in the child, but would pass `SIG_IGN` on to it.
fn outlive_sigint() -> io::Result<()> {
    extern "C" fn nothing(_: libc::c_int) {}
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe
    // (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&raw mut action.sa_mask);
        if libc::sigaction(libc::SIGINT, &raw const action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The child's exit code, or 128 + signal number like a shell.
fn exit_code(status: ExitStatus) -> ExitCode {
    let code = status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
