//! `cargo xtask setup`.
pub fn run() -> anyhow::Result<()> {
    Ok(())
}
