//! The learnt cache's entries saved in the state directory
//! (`dns-learnt.json`), so that the next agent knows which name holds
//! each address the pinned map carries over: for `dst_name`, the per-name
//! caps and the learnt-address counts. The pinned map stays the authority:
//! an entry comes back only while the map still holds it (see
//! [`LearntCache::restore`]), so a file older than the map (a crash since
//! its last save) or from before a reboot (the map is gone, and so is the
//! boot the expiries were measured in) restores nothing the map does not
//! enforce.

use std::{net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::state_file::boot_id;

use super::{
    answer::DnsName,
    learnt::{Entry, Nanos, RuleBits, ServiceId},
};

/// The file's name in the state directory.
pub const FILE: &str = "dns-learnt.json";

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    boot_id: String,
    /// Oldest learnt first.
    entries: Vec<SavedEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedEntry {
    service: ServiceId,
    /// As `DnsName` displays it (`\DDD` escapes).
    name: String,
    addr: IpAddr,
    expires_ns: Nanos,
    rules: RuleBits,
}

/// `entries` as the file's bytes.
///
/// # Errors
/// Serialisation failed (it does not for these types).
pub fn to_bytes(entries: &[Entry]) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(&Saved {
        boot_id: boot_id(),
        entries: entries
            .iter()
            .map(|e| SavedEntry {
                service: e.service,
                name: e.name.to_string(),
                addr: e.addr,
                expires_ns: e.expires,
                rules: e.rules,
            })
            .collect(),
    })
}

/// Writes `entries` to the state directory, whole or not at all; the
/// oldest left out if they would make it larger than a state file may be.
pub fn save(state_dir: &Path, entries: &[Entry]) {
    let write = || -> std::io::Result<()> {
        let (bytes, left_out) =
            crate::state_file::fitting(entries, crate::state_file::MAX_BYTES, to_bytes)
                .map_err(std::io::Error::other)?;
        if left_out > 0 {
            warn!(
                left_out,
                "the DNS names of the oldest learnt addresses are not saved: the file would pass the state-file limit"
            );
        }
        crate::state_file::write_atomic(state_dir, FILE, &bytes, 0o600)
    };
    if let Err(e) = write() {
        warn!(dir = %state_dir.display(), "cannot save the DNS names of learnt addresses: {e}");
    }
}

/// The entries a previous agent saved in this boot; none if there is no
/// file or it is from another boot. A damaged file is set aside (logged,
/// counted) and restores nothing.
pub fn load(state_dir: &Path) -> Vec<Entry> {
    crate::state_file::load(
        state_dir,
        FILE,
        |bytes| from_bytes(bytes, &boot_id()),
        "carried-over learnt addresses stay enforced, without their names, until they expire",
    )
    .unwrap_or_default()
}

/// The entries in `bytes` if saved in the boot `boot`.
///
/// # Errors
/// Not a saved cache, or a name in it is not a DNS name.
pub fn from_bytes(bytes: &[u8], boot: &str) -> Result<Vec<Entry>, String> {
    let saved: Saved =
        serde_json::from_slice(bytes).map_err(|e| format!("not saved learnt addresses: {e}"))?;
    if saved.boot_id != boot {
        return Ok(Vec::new());
    }
    saved
        .entries
        .into_iter()
        .map(|e| {
            let name = DnsName::from_presentation(&e.name)
                .ok_or_else(|| format!("{:?} is not a DNS name", e.name))?;
            Ok(Entry {
                service: e.service,
                name,
                addr: e.addr,
                expires: e.expires_ns,
                rules: e.rules,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, addr: &str) -> Entry {
        Entry {
            service: 7,
            name: DnsName::from_ascii(name).expect("a name"),
            addr: addr.parse().expect("an address"),
            expires: 123,
            rules: 0b10,
        }
    }

    #[test]
    fn entries_come_back_as_saved_in_the_same_boot() {
        let mut odd = entry("x.example.test", "2001:db8::1");
        // A label with a dot and a space in it, as an answer may carry.
        odd.name = DnsName::from_presentation("a\\046b\\032c.example.test").expect("escaped");
        assert_eq!(odd.name.labels()[0].as_ref(), b"a.b c");
        let entries = vec![entry("api.example.test", "192.0.2.1"), odd];
        let bytes = to_bytes(&entries).expect("serialised");
        assert_eq!(from_bytes(&bytes, &boot_id()), Ok(entries));
    }

    #[test]
    fn past_the_size_limit_the_oldest_entries_are_left_out() {
        let entries: Vec<Entry> = (0..100)
            .map(|i| entry(&format!("n{i}.example.test"), &format!("192.0.2.{i}")))
            .collect();
        let fitting = |limit| crate::state_file::fitting(&entries, limit, to_bytes);
        let (whole, left_out) = fitting(u64::MAX).expect("serialised");
        assert_eq!(left_out, 0);
        let limit = whole.len() as u64 / 2;
        let (bytes, left_out) = fitting(limit).expect("serialised");
        assert!(bytes.len() as u64 <= limit, "{} > {limit}", bytes.len());
        assert!((40..=60).contains(&left_out), "{left_out} left out");
        let kept = from_bytes(&bytes, &boot_id()).expect("readable");
        assert_eq!(kept, entries[left_out..], "the newest kept, in order");
    }

    #[test]
    fn a_file_from_another_boot_restores_nothing() {
        let bytes = to_bytes(&[entry("api.example.test", "192.0.2.1")]).expect("serialised");
        assert_eq!(from_bytes(&bytes, "another-boot"), Ok(Vec::new()));
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_the_problem() {
        let err = from_bytes(b"{\"boot_id\":", &boot_id()).expect_err("damaged");
        assert!(err.starts_with("not saved learnt addresses"), "{err}");
        let bad = format!(
            "{{\"boot_id\":\"{}\",\"entries\":[{{\"service\":1,\"name\":\"a..b\",\"addr\":\"192.0.2.1\",\"expires_ns\":1,\"rules\":1}}]}}",
            boot_id()
        );
        let err = from_bytes(bad.as_bytes(), &boot_id()).expect_err("bad name");
        assert_eq!(err, "\"a..b\" is not a DNS name");
    }
}
