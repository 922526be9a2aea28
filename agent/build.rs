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
    // took 38 s of CI's clean lint. An empty object stands in, always (an
    // older build's object may be there: never embed a stale one), and the
    // agent refuses to start with it (`KernelError::NoPrograms`). Unset
    // again, aya-build reruns this and copies the real object back.
    let skipped = env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skipped {
        let out_dir = env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?;
        fs::write(PathBuf::from(out_dir).join("bulkhead-ebpf"), [])?;
    }
    Ok(())
}
