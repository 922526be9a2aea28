//! Builds the eBPF programs with the pinned nightly and bpf-linker, so that
//! the `bulkhead` binary embeds its own object (see `loader::EBPF_OBJECT`).
//! `cargo xtask setup` installs both; the toolchain name lives here and in
//! xtask (EBPF_TOOLCHAIN), which checks they agree.

use std::{env, fs, path::PathBuf};

const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// aya-build's switch: set, it builds no eBPF object.
const SKIP: &str = "AYA_BUILD_SKIP";

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;
    // `cargo xtask lint` sets it: clippy needs no object, and building one
    // took 38 s of every clean lint here. An empty object stands in, which
    // the agent refuses to start with (`KernelError::NoPrograms`).
    let skipped = env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skipped {
        let out =
            PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("no OUT_DIR"))?)
                .join("bulkhead-ebpf");
        if !out.exists() {
            fs::write(&out, [])?;
        }
    }
    Ok(())
}
