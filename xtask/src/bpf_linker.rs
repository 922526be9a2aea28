//! bpf-linker, built against the eBPF toolchain's own libLLVM.
//!
//! bpf-linker must use the same LLVM as the rustc that emits the bitcode.
//! Debian packages no matching LLVM, but every rustup toolchain ships its own
//! libLLVM, and bpf-linker can link to that one.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::util::{find_in_path, output_of, run_cmd, EBPF_TOOLCHAIN};

/// The bpf-linker release we build (it must support the toolchain's LLVM).
pub const VERSION: &str = "0.13.0";

/// Makes sure a working bpf-linker `VERSION` that loads the libLLVM of the
/// toolchain at `sysroot` is on PATH. Returns whether it had to install it.
pub fn ensure(sysroot: &Path) -> Result<bool> {
    match check(sysroot) {
        Ok(bin) => {
            eprintln!(
                "xtask: bpf-linker {VERSION} on the LLVM of {EBPF_TOOLCHAIN}: present ({})",
                bin.display()
            );
            Ok(false)
        }
        Err(why) => {
            eprintln!("xtask: bpf-linker needs installing: {why}");
            install(sysroot)?;
            let bin = check(sysroot).map_err(|why| {
                anyhow::anyhow!("bpf-linker still unusable after installing it: {why}")
            })?;
            eprintln!("xtask: bpf-linker {VERSION} installed ({})", bin.display());
            Ok(true)
        }
    }
}

/// The bpf-linker on PATH if it is `VERSION` and resolves libLLVM inside
/// `sysroot`, else why not. `LD_LIBRARY_PATH` is dropped (cargo and rustup set
/// it) so that we test what the binary loads on its own.
fn check(sysroot: &Path) -> Result<PathBuf, String> {
    let bin = find_in_path("bpf-linker").ok_or("no bpf-linker on PATH")?;
    let version = output_of(
        Command::new(&bin)
            .arg("--version")
            .env_remove("LD_LIBRARY_PATH"),
    )
    .ok_or_else(|| format!("`{} --version` fails", bin.display()))?;
    if version.split_whitespace().nth(1) != Some(VERSION) {
        return Err(format!("{} is `{}`", bin.display(), version.trim()));
    }
    let ldd = output_of(Command::new("ldd").arg(&bin).env_remove("LD_LIBRARY_PATH"))
        .ok_or_else(|| format!("`ldd {}` fails", bin.display()))?;
    let lib = libllvm_from_ldd(&ldd).ok_or("it does not load libLLVM from a file")?;
    let lib = fs::canonicalize(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    let root = fs::canonicalize(sysroot).map_err(|e| format!("{}: {e}", sysroot.display()))?;
    if !lib.starts_with(&root) {
        return Err(format!(
            "it loads {}, not the libLLVM of {EBPF_TOOLCHAIN}",
            lib.display()
        ));
    }
    Ok(bin)
}

/// Builds and installs bpf-linker against the toolchain's libLLVM.
///
/// The recipe: an `LLVM_PREFIX` whose `lib/` holds a `libLLVM.so` symlink. But
/// bpf-linker's build script bakes that `lib/` into the binary's RUNPATH, so
/// a throwaway prefix would leave a RUNPATH into a deleted temp dir (broken,
/// and a dir any local user could re-create to inject libraries). So the
/// prefix's `lib` is a symlink to the sysroot's `lib/` (the build script
/// canonicalises it: RUNPATH becomes the toolchain's own lib dir), and the
/// `libLLVM.so` the linker needs for `-lLLVM` sits in a separate link-time
/// search dir that never reaches the binary.
fn install(sysroot: &Path) -> Result<()> {
    let lib_dir = sysroot.join("lib");
    let libllvm = find_libllvm(&lib_dir)?;
    let major = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(llvm_major)
        .with_context(|| format!("no LLVM version in the name {}", libllvm.display()))?;
    let feature = format!("llvm-{major}");

    let pfx = tempfile::Builder::new()
        .prefix("bulkhead-llvm-")
        .tempdir()
        .context("failed to create a temporary LLVM prefix")?;
    let link_dir = pfx.path().join("link");
    fs::create_dir(&link_dir).with_context(|| format!("mkdir {}", link_dir.display()))?;
    symlink(&libllvm, link_dir.join("libLLVM.so")).context("symlink libLLVM.so")?;
    symlink(&lib_dir, pfx.path().join("lib")).context("symlink the prefix's lib")?;

    eprintln!(
        "xtask: building bpf-linker {VERSION} against {} (feature {feature}, about a minute)",
        libllvm.display()
    );
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{EBPF_TOOLCHAIN}"))
            .args(["install", "bpf-linker", "--version", VERSION, "--force"])
            .args(["--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", pfx.path())
            // -L only matters at link time; it adds nothing to RUNPATH.
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                format!("-Lnative={}", link_dir.display()),
            )
            .env_remove("RUSTFLAGS")
            // Outside the workspace: its rust-toolchain.toml and config stay out.
            .current_dir(pfx.path())
            .stdin(Stdio::null());
        if locked {
            cmd.arg("--locked");
        }
        run_cmd(&mut cmd)
    };
    if let Err(e) = install(true) {
        eprintln!("xtask: {e:#}; retrying without --locked");
        install(false)?;
    }
    Ok(())
}

/// The toolchain's `libLLVM.so.<version>...` (it also ships the same library
/// as `libLLVM-<major>-rust-...so`; either would do).
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib_dir).with_context(|| format!("read {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", lib_dir.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("libLLVM.so.")
        {
            return Ok(entry.path());
        }
    }
    bail!("no libLLVM.so.* in {}", lib_dir.display())
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM.so.")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The file an `ldd` listing resolves libLLVM to, if it resolves it.
fn libllvm_from_ldd(ldd: &str) -> Option<PathBuf> {
    ldd.lines().find_map(|line| {
        let (name, target) = line.trim().split_once(" => ")?;
        if !name.starts_with("libLLVM") {
            return None;
        }
        let path = target.rsplit_once(" (").map_or(target, |(p, _)| p);
        path.starts_with('/').then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_toolchain_file_name() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"), Some(22));
        assert_eq!(llvm_major("libLLVM.so.21.1-rust-1.95.0-stable"), Some(21));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }

    #[test]
    fn ldd_resolved_and_not_found() {
        let found = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibLLVM.so.22.1-rust-1.97.0-nightly => /tc/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n";
        assert_eq!(
            libllvm_from_ldd(found),
            Some(PathBuf::from("/tc/lib/libLLVM.so.22.1-rust-1.97.0-nightly"))
        );
        let missing = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found\n";
        assert_eq!(libllvm_from_ldd(missing), None);
    }
}
