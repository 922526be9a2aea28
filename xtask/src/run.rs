//! `cargo xtask run`: the agent on the example policies.
pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
