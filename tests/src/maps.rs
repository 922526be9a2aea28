//! Changing a running daemon's kernel maps behind its back, through their
//! pins and `bpftool`: to corrupt them (the self-check must notice) and to
//! fill them (so that the daemon's own writes fail with `E2BIG`).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{daemon::Daemon, process::try_output_with_timeout};

const BPFTOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// The pin of `daemon`'s map `name` (`SERVICES`, `EGRESS_V4`, ...).
#[must_use]
pub fn pinned(daemon: &Daemon, name: &str) -> PathBuf {
    daemon.pin_dir().join("current/maps").join(name)
}

fn bpftool(args: &[&str]) -> Result<Vec<u8>, String> {
    let out = try_output_with_timeout(Command::new("bpftool").args(args), BPFTOOL_TIMEOUT)
        .map_err(|e| format!("{e} (bpftool is installed by `cargo xtask setup`)"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "`bpftool {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::from("hex");
    for b in bytes {
        let _ = write!(out, " {b:02x}");
    }
    out
}

fn path_str(map: &Path) -> &str {
    map.to_str()
        .unwrap_or_else(|| panic!("test bug: pin path {} is not UTF-8", map.display()))
}

/// Every (key, value) of the pinned `map`, as bytes.
#[must_use]
pub fn dump(map: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let out = bpftool(&["--json", "map", "dump", "pinned", path_str(map)])
        .unwrap_or_else(|e| panic!("{e}"));
    let value: Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("bpftool map dump printed no JSON ({e})"));
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap_or_else(|| panic!("bpftool map dump: not a byte list: {v}"))
            .iter()
            .map(|b| {
                let s = b.as_str().unwrap_or_default().trim_start_matches("0x");
                u8::from_str_radix(s, 16)
                    .unwrap_or_else(|e| panic!("bpftool map dump: bad byte {b}: {e}"))
            })
            .collect()
    };
    value
        .as_array()
        .unwrap_or_else(|| panic!("bpftool map dump printed no JSON array: {value}"))
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

/// Writes `key` -> `value` into the pinned `map`; panics if it fails.
pub fn update(map: &Path, key: &[u8], value: &[u8]) {
    let (key, value) = (hex(key), hex(value));
    let mut args = vec!["map", "update", "pinned", path_str(map), "key"];
    args.extend(key.split(' '));
    args.push("value");
    args.extend(value.split(' '));
    bpftool(&args).unwrap_or_else(|e| panic!("{e}"));
}

/// Pins a new hash map (no preallocation, as the agent's learnt maps)
/// named `name` at `pin`, for a map of an older agent's layout; panics if
/// it fails.
pub fn create_hash(pin: &Path, name: &str, key_size: usize, value_size: usize, entries: u32) {
    let (key, value, entries) = (
        key_size.to_string(),
        value_size.to_string(),
        entries.to_string(),
    );
    bpftool(&[
        "map",
        "create",
        path_str(pin),
        "type",
        "hash",
        "key",
        &key,
        "value",
        &value,
        "entries",
        &entries,
        "name",
        name,
        "flags",
        "1",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Deletes `key` from the pinned `map`; panics if it fails.
pub fn delete(map: &Path, key: &[u8]) {
    let key = hex(key);
    let mut args = vec!["map", "delete", "pinned", path_str(map), "key"];
    args.extend(key.split(' '));
    bpftool(&args).unwrap_or_else(|e| panic!("{e}"));
}

/// Fills the pinned hash `map` to its capacity with `u64` keys counting
/// up from `first_key` (little-endian) and `value`; returns how many it
/// wrote. Panics unless the map is then full (one more insert fails).
#[expect(
    clippy::must_use_candidate,
    reason = "filling is what it is for; the count is extra"
)]
pub fn fill(map: &Path, first_key: u64, value: &[u8]) -> u64 {
    let info: Value = serde_json::from_slice(
        &bpftool(&["--json", "map", "show", "pinned", path_str(map)])
            .unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("bpftool map show printed no JSON ({e})"));
    let capacity = info["max_entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("bpftool map show: no max_entries in {info}"));
    let room = capacity - dump(map).len() as u64;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("cannot create a tempdir: {e}"));
    let batch = dir.path().join("fill.batch");
    let mut text = String::new();
    for k in 0..room {
        let _ = writeln!(
            text,
            "map update pinned {} key {} value {}",
            path_str(map),
            hex(&(first_key + k).to_le_bytes()),
            hex(value)
        );
    }
    std::fs::write(&batch, text)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", batch.display()));
    bpftool(&["batch", "file", path_str(&batch)]).unwrap_or_else(|e| panic!("{e}"));
    let one_more = (first_key + room).to_le_bytes();
    let refused = {
        let (key, value) = (hex(&one_more), hex(value));
        let mut args = vec!["map", "update", "pinned", path_str(map), "key"];
        args.extend(key.split(' '));
        args.push("value");
        args.extend(value.split(' '));
        bpftool(&args).is_err()
    };
    assert!(
        refused,
        "{} is not full after {room} inserts",
        map.display()
    );
    room
}

/// The SERVICES value (a `ServiceEntry`) for `cgroup_id` in `daemon`'s
/// maps, if there is one.
#[must_use]
pub fn service_entry(daemon: &Daemon, cgroup_id: u64) -> Option<Vec<u8>> {
    dump(&pinned(daemon, "SERVICES"))
        .into_iter()
        .find(|(k, _)| k.as_slice() == cgroup_id.to_le_bytes())
        .map(|(_, v)| v)
}

/// The LPM key of an IPv4 prefix of service `service_id` (as the tries
/// hold it: prefix length in host order, then service id and address
/// big-endian).
#[must_use]
pub fn lpm_v4_key(service_id: u32, addr: std::net::Ipv4Addr, prefix: u32) -> Vec<u8> {
    let mut key = (32 + prefix).to_le_bytes().to_vec();
    key.extend(host_v4_key(service_id, addr));
    key
}

/// The key of a whole IPv4 address in `EGRESS_HOSTS_V4`/`INGRESS_HOSTS_V4`
/// (an LPM key without its prefix length).
#[must_use]
pub fn host_v4_key(service_id: u32, addr: std::net::Ipv4Addr) -> Vec<u8> {
    let mut key = service_id.to_be_bytes().to_vec();
    key.extend(addr.octets());
    key
}

/// Every entry of `daemon`'s learnt-address maps (`LEARNT_V4` and `LEARNT`,
/// egress by DNS name): (the service's `name_key`, the address), read
/// with `bpftool`.
#[must_use]
pub fn learnt(daemon: &Daemon) -> Vec<(u64, std::net::IpAddr)> {
    let v4 = dump(&pinned(daemon, agent_common::LEARNT_V4))
        .into_iter()
        .map(|(key, value)| {
            // LearntV4Key: the name key folded (4 bytes), the address (4);
            // LearntV4Value: expiry (8 bytes), the whole name key (8), ...
            assert_eq!(key.len(), 8, "a LEARNT_V4 key is 8 bytes, got {key:?}");
            assert_eq!(
                value.len(),
                24,
                "a LEARNT_V4 value is 24 bytes, got {value:?}"
            );
            let mut name_key = [0u8; 8];
            name_key.copy_from_slice(&value[8..16]);
            let name_key = u64::from_ne_bytes(name_key);
            assert_eq!(
                key[..4],
                agent_common::fold(name_key).to_ne_bytes(),
                "a LEARNT_V4 key carries its value's name key folded"
            );
            let ip = std::net::IpAddr::from([key[4], key[5], key[6], key[7]]);
            (name_key, ip)
        });
    let v6 = dump(&pinned(daemon, agent_common::LEARNT))
        .into_iter()
        .map(|(key, _)| {
            // LearntKey: name_key (u64), family (u8), 7 bytes of padding,
            // the address in 16 bytes.
            assert_eq!(key.len(), 32, "a LEARNT key is 32 bytes, got {key:?}");
            assert_eq!(
                key[8],
                agent_common::FAMILY_V6,
                "LEARNT holds IPv6 only: {key:?}"
            );
            let mut name_key = [0u8; 8];
            name_key.copy_from_slice(&key[..8]);
            let mut addr = [0u8; 16];
            addr.copy_from_slice(&key[16..32]);
            (u64::from_ne_bytes(name_key), std::net::IpAddr::from(addr))
        });
    v4.chain(v6).collect()
}
