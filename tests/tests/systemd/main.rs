//! The systemd unit, the install and the Debian package, tested for real as
//! far as a host whose PID 1 is not systemd allows. One module per topic:
//!
//! - `unit_file`: `systemd-analyze verify` is clean and `systemd-analyze
//!   security --offline=true` rates the unit at most `MAX_EXPOSURE`; the
//!   unit raises the open-file limit;
//! - `as_unit`: the daemon, run with the unit's `ExecStart=` line, its
//!   environment and its capability bounding set (through `setpriv`), sends
//!   `READY=1` only once a denied connect already gets `EPERM`, then keeps
//!   pinging the watchdog;
//! - `package`: `cargo xtask install --destdir` lays out the expected files
//!   and modes; `cargo xtask package` builds a .deb that carries them, and
//!   whose maintainer scripts install and purge cleanly (`dpkg --root`);
//! - `namespace`: the unit under a real systemd, PID 1 of its own PID,
//!   mount and cgroup namespaces;
//! - `dns_socket`: there, `bulkhead-dns.socket` holds the DNS proxy's
//!   sockets across `systemctl restart bulkhead`: no lookup is lost;
//! - `journal`: there, with systemd-journald: log lines reach the journal
//!   with their priority (`journalctl -p warning`), and SIGUSR1 re-opens the
//!   decision log without a reload.
//!
//! What more than one of them uses (the repository's unit file, read the
//! way systemd reads it; tools; command output) is here.
//!
//! Missing tools (`systemd-analyze`, `setpriv`, `dpkg-deb`) skip a test
//! with a `SKIPPED` line, or fail it under `BULKHEAD_REQUIRE_BPF=1`.

mod as_unit;
mod dns_socket;
mod journal;
mod namespace;
mod package;
mod unit_file;

use std::{
    collections::BTreeMap, fs, io::Read as _, io::Write as _, net::Ipv4Addr, net::TcpStream,
    os::unix::fs::PermissionsExt as _, path::Path, path::PathBuf, process::Output, time::Duration,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

fn unit_path() -> PathBuf {
    repo().join("systemd/bulkhead.service")
}

fn unit_text() -> String {
    let path = unit_path();
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `Some(path)` of tool `name`, or (after a `SKIPPED` line) `None`; under
/// `BULKHEAD_REQUIRE_BPF=1` a missing tool fails the test instead.
fn tool(name: &str, package: &str) -> Option<PathBuf> {
    integration_tests::require::require_tool(name, package)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `[Service]` (or any section) settings: key -> every value, in order.
fn section(unit: &str, name: &str) -> BTreeMap<String, Vec<String>> {
    let header = format!("[{name}]");
    let mut inside = false;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "line continuations are not handled by this test: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE in [{name}]: {line}"));
        out.entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    out
}

/// The single value of `key` in `[Service]`.
fn service_setting(unit: &str, key: &str) -> String {
    let service = section(unit, "Service");
    match service.get(key).map(Vec::as_slice) {
        Some([one]) => one.clone(),
        other => panic!("the unit must set {key}= exactly once in [Service], found {other:?}"),
    }
}

/// `GET path` on loopback; the whole response.
fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .unwrap_or_else(|e| panic!("cannot connect to the metrics port {port}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is missing: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
