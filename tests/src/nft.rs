//! A host-wide nftables table loaded for one test (`nft -f -`) and deleted
//! by name when dropped: the host set-ups users have (wg-quick's rules,
//! for one) next to the agent.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

/// A loaded table, deleted on drop.
pub struct NftTable {
    nft: PathBuf,
    family: &'static str,
    name: &'static str,
}

impl NftTable {
    /// Loads `table FAMILY NAME { BODY }`; panics with nft's error if it
    /// is refused.
    #[must_use]
    pub fn load(nft: PathBuf, family: &'static str, name: &'static str, body: &str) -> Self {
        let table = Self { nft, family, name };
        // A leftover of an interrupted run goes first.
        table.delete();
        let mut child = Command::new(&table.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run nft: {e}"));
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(format!("table {family} {name} {{\n{body}\n}}\n").as_bytes())
            .unwrap_or_else(|e| panic!("cannot write to nft: {e}"));
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("nft: {e}"));
        assert!(
            out.status.success(),
            "nft refused table {family} {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        table
    }

    fn delete(&self) {
        let _ = Command::new(&self.nft)
            .args(["delete", "table", self.family, self.name])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        self.delete();
    }
}
