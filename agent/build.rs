//! Builds the eBPF programs with the pinned nightly and bpf-linker, so that
//! the `bulkhead` binary embeds its own object (see `loader::EBPF_OBJECT`).
//! `cargo xtask setup` installs both; the toolchain name lives here and in
//! xtask (EBPF_TOOLCHAIN), which checks they agree.

const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
