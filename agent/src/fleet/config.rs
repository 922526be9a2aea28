//! The `[fleet]` section (docs/config.md, docs/fleet.md), and what it
//! resolves to when something connects: the [`Connection`] (with the
//! password read from its file) and the [`HostIdentity`] rows carry.
//!
//! `Config::parse` checks every value it can without touching the system
//! ([`FleetConfig::problems`], reported at FILE:LINE); the files it names
//! are read only when they are needed ([`FleetConfig::connection`],
//! [`FleetConfig::identity`]), and their errors name those files.

use std::{
    fmt,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper::Uri;
use serde::Deserialize;

use crate::events::host::HOSTNAME_FILE;

/// Where the host id comes from by default (systemd's machine id).
pub const DEFAULT_MACHINE_ID_FILE: &str = "/etc/machine-id";
/// The spool's directory under the state directory, by default.
pub const SPOOL_SUBDIR: &str = "fleet-spool";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Export to ClickHouse (off by default). `fleet init`/`prune` work
    /// either way.
    pub enabled: bool,
    /// ClickHouse's HTTP interface, `http://HOST:PORT`; "" is unset.
    pub clickhouse_url: String,
    /// The database holding the fleet's tables.
    pub database: String,
    /// The ClickHouse user.
    pub user: String,
    /// A file holding the user's password (its first line); unset: none.
    pub password_file: Option<PathBuf>,
    /// The name rows carry as `host`; unset: this machine's host name.
    pub host: Option<String>,
    /// The file whose content is the `host_id` rows carry.
    pub machine_id_file: PathBuf,
    /// Rows are sent at least this often.
    pub batch_interval_secs: u32,
    /// Per-request timeout (connecting, sending, reading the answer).
    pub timeout_secs: u32,
    /// Rows waiting in memory at most; past it they go to the spool.
    pub queue_rows: usize,
    /// Bytes the on-disk spool holds at most; past it rows are dropped
    /// and counted.
    pub spool_bytes: u64,
    /// The spool's directory; unset: `fleet-spool` in the state directory.
    pub spool_dir: Option<PathBuf>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            clickhouse_url: String::new(),
            database: "bulkhead".to_string(),
            user: "default".to_string(),
            password_file: None,
            host: None,
            machine_id_file: PathBuf::from(DEFAULT_MACHINE_ID_FILE),
            batch_interval_secs: 5,
            timeout_secs: 10,
            queue_rows: 100_000,
            spool_bytes: 256 * 1024 * 1024,
            spool_dir: None,
        }
    }
}

impl FleetConfig {
    /// The bounds of `batch_interval_secs`.
    pub const BATCH_INTERVAL: std::ops::RangeInclusive<u32> = 1..=3600;
    /// The bounds of `timeout_secs`.
    pub const TIMEOUT: std::ops::RangeInclusive<u32> = 1..=600;
    /// The bounds of `queue_rows`.
    pub const QUEUE_ROWS: std::ops::RangeInclusive<usize> = 100..=10_000_000;
    /// The bounds of `spool_bytes` (1 MiB to 1 TiB).
    pub const SPOOL_BYTES: std::ops::RangeInclusive<u64> = 1 << 20..=1 << 40;

    /// Every problem at once, as "fleet.key = value: why" lines (the key
    /// first: `Config::parse` finds its line by it).
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.clickhouse_url.is_empty() {
            if self.enabled {
                out.push("fleet.clickhouse_url: must be set when fleet.enabled = true".to_string());
            }
        } else if let Err(e) = parse_clickhouse_url(&self.clickhouse_url) {
            out.push(format!(
                "fleet.clickhouse_url = {:?}: {e}",
                self.clickhouse_url
            ));
        }
        if let Err(e) = crate::fleet::sql::check_identifier(&self.database) {
            out.push(format!("fleet.database = {:?}: {e}", self.database));
        }
        if let Err(e) = check_user(&self.user) {
            out.push(format!("fleet.user = {:?}: {e}", self.user));
        }
        if let Some(host) = &self.host {
            if let Err(e) = check_host(host) {
                out.push(format!("fleet.host = {host:?}: {e}"));
            }
        }
        let paths = [
            ("fleet.password_file", self.password_file.as_deref()),
            (
                "fleet.machine_id_file",
                Some(self.machine_id_file.as_path()),
            ),
            ("fleet.spool_dir", self.spool_dir.as_deref()),
        ];
        for (key, path) in paths {
            if let Some(path) = path.filter(|p| !p.is_absolute()) {
                out.push(format!(
                    "{key} = {:?}: must be an absolute path",
                    path.display()
                ));
            }
        }
        bound(
            &mut out,
            "fleet.batch_interval_secs",
            self.batch_interval_secs,
            &Self::BATCH_INTERVAL,
        );
        bound(
            &mut out,
            "fleet.timeout_secs",
            self.timeout_secs,
            &Self::TIMEOUT,
        );
        bound(
            &mut out,
            "fleet.queue_rows",
            self.queue_rows,
            &Self::QUEUE_ROWS,
        );
        bound(
            &mut out,
            "fleet.spool_bytes",
            self.spool_bytes,
            &Self::SPOOL_BYTES,
        );
        out
    }

    /// The spool's directory: `spool_dir`, or `fleet-spool` in `state_dir`.
    #[must_use]
    pub fn spool_dir(&self, state_dir: &Path) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| state_dir.join(SPOOL_SUBDIR))
    }

    #[must_use]
    pub fn batch_interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.batch_interval_secs))
    }

    /// What a [`crate::fleet::Client`] needs: the URL (`clickhouse_url`, or
    /// `url_override` from a command line), the database, the user and the
    /// password, read from `password_file` now.
    ///
    /// # Errors
    /// No URL, a bad one, or a password file that cannot be read, is
    /// readable by others, or is empty.
    pub fn connection(&self, url_override: Option<&str>) -> Result<Connection, SetupError> {
        let url = url_override.unwrap_or(self.clickhouse_url.as_str());
        if url.is_empty() {
            return Err(SetupError::NoUrl);
        }
        let url = parse_clickhouse_url(url).map_err(|problem| SetupError::Url {
            url: url.to_string(),
            problem,
        })?;
        let password = match &self.password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        Ok(Connection {
            url,
            database: self.database.clone(),
            user: self.user.clone(),
            password,
            timeout: Duration::from_secs(u64::from(self.timeout_secs)),
        })
    }

    /// The name this agent's rows and events carry: `host`, or the
    /// kernel's host name.
    ///
    /// # Errors
    /// The host name cannot be read or is not a usable name.
    pub fn host_name(&self) -> Result<String, SetupError> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let path = Path::new(HOSTNAME_FILE);
        let name = read_small(path, "fleet.host")?.trim().to_string();
        check_host(&name).map_err(|problem| SetupError::File {
            path: path.to_path_buf(),
            key: "fleet.host",
            problem: format!("the host name {name:?}: {problem}; set fleet.host"),
        })?;
        Ok(name)
    }

    /// The `host` and `host_id` every row of this agent carries: `host`
    /// or the kernel's host name; the machine id from `machine_id_file`.
    ///
    /// # Errors
    /// A file that cannot be read, or holds no usable name or id.
    pub fn identity(&self) -> Result<HostIdentity, SetupError> {
        let host = self.host_name()?;
        let path = &self.machine_id_file;
        let id = read_small(path, "fleet.machine_id_file")?
            .trim()
            .to_string();
        if id.is_empty() || id.len() > MAX_HOST_ID || !id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(SetupError::File {
                path: path.clone(),
                key: "fleet.machine_id_file",
                problem: format!(
                    "{id:?} is not a machine id (1 to {MAX_HOST_ID} letters and digits, like systemd's 32 hex digits)"
                ),
            });
        }
        Ok(HostIdentity { host, host_id: id })
    }
}

/// The longest host id (systemd's are 32 characters); it starts every
/// batch id (`rows::batch_id`).
pub const MAX_HOST_ID: usize = 64;
/// Files read here are a line or two; anything longer is not one of them.
const SMALL_FILE: u64 = 4096;

fn bound<T: PartialOrd + fmt::Display>(
    out: &mut Vec<String>,
    key: &str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) {
    if !range.contains(&value) {
        out.push(format!(
            "{key} = {value}: must be between {} and {}",
            range.start(),
            range.end()
        ));
    }
}

/// Checks a ClickHouse URL: `http://HOST:PORT` with an explicit port (a
/// missing one would mean 80, while ClickHouse listens on 8123), and
/// nothing else: no path, no query, no credentials (those go in
/// `user` and `password_file`).
///
/// # Errors
/// What is wrong with it.
pub fn parse_clickhouse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("must start with http:// (for TLS, put a local proxy in front)".to_string());
    }
    let Some(authority) = uri.authority() else {
        return Err("has no host".to_string());
    };
    if authority.as_str().contains('@') {
        return Err(
            "must not hold credentials: set fleet.user and fleet.password_file".to_string(),
        );
    }
    if authority.port_u16().is_none() {
        return Err("needs a port, like http://127.0.0.1:8123".to_string());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("must be http://HOST:PORT with no path or query".to_string());
    }
    Ok(uri)
}

/// A user name goes into HTTP basic authentication, where a ':' would end
/// it.
fn check_user(user: &str) -> Result<(), &'static str> {
    if user.is_empty() || user.len() > 128 {
        return Err("must be 1 to 128 characters");
    }
    if user.chars().any(|c| c == ':' || c.is_control()) {
        return Err("must not hold ':' or control characters");
    }
    Ok(())
}

fn check_host(host: &str) -> Result<(), &'static str> {
    if host.is_empty() || host.len() > 255 {
        return Err("must be 1 to 255 characters");
    }
    if host.chars().any(char::is_control) {
        return Err("must not hold control characters");
    }
    Ok(())
}

/// Reads a file of a few lines at most.
fn read_small(path: &Path, key: &'static str) -> Result<String, SetupError> {
    let file = |problem: String| SetupError::File {
        path: path.to_path_buf(),
        key,
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| file(format!("cannot read: {e}")))?;
    if !meta.is_file() || meta.len() > SMALL_FILE {
        return Err(file(format!(
            "must be a regular file of at most {SMALL_FILE} bytes"
        )));
    }
    std::fs::read_to_string(path).map_err(|e| file(format!("cannot read: {e}")))
}

/// The password: the file's first line (a final newline is not part of
/// it). A file others can read is refused: the password would not be
/// secret.
fn read_password(path: &Path) -> Result<Password, SetupError> {
    let problem = |problem: String| SetupError::File {
        path: path.to_path_buf(),
        key: "fleet.password_file",
        problem,
    };
    let meta = std::fs::metadata(path).map_err(|e| problem(format!("cannot read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(problem(format!(
            "mode {mode:04o} lets every user read or change it; `chmod o-rwx` it"
        )));
    }
    let text = read_small(path, "fleet.password_file")?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Err(problem("its first line is empty".to_string()));
    }
    Ok(Password(line.to_string()))
}

/// How to reach the fleet's ClickHouse.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `http://HOST:PORT`, checked by [`parse_clickhouse_url`].
    pub url: Uri,
    /// A checked identifier (`sql::check_identifier`).
    pub database: String,
    pub user: String,
    pub password: Option<Password>,
    /// For one whole request and its answer.
    pub timeout: Duration,
}

/// A password: never printed (`Debug` hides it, there is no `Display`).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    #[must_use]
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, for the one place that sends it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<hidden>)")
    }
}

/// Which host a row comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// A name for people (`fleet.host`, or the host name).
    pub host: String,
    /// A stable id (the machine id): host names repeat and change.
    pub host_id: String,
}

/// Why a connection or an identity could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no ClickHouse URL: pass --clickhouse URL or set fleet.clickhouse_url in the config")]
    NoUrl,
    #[error("ClickHouse URL {url:?}: {problem}")]
    Url { url: String, problem: String },
    #[error("{}: {key}: {problem}", path.display())]
    File {
        path: PathBuf,
        /// The config key that names the file.
        key: &'static str,
        problem: String,
    },
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("c.toml"), text).map_err(|e| e.to_string())
    }

    /// The error of `text`, which must be refused at `at` (line:column)
    /// and say `says`.
    fn refused(text: &str, at: &str, says: &str) {
        let err = parse(text).expect_err(text);
        assert!(
            err.starts_with(&format!("c.toml:{at}: ")),
            "{text:?}: {err}"
        );
        assert!(err.contains(says), "{text:?}: {err}");
    }

    #[test]
    fn the_section_is_off_by_default_with_the_documented_values() {
        let c = parse("").expect("defaults");
        let f = &c.fleet;
        assert!(!f.enabled);
        assert_eq!(f.clickhouse_url, "");
        assert_eq!(f.database, "bulkhead");
        assert_eq!(f.user, "default");
        assert_eq!(f.password_file, None);
        assert_eq!(f.host, None);
        assert_eq!(f.machine_id_file, PathBuf::from("/etc/machine-id"));
        assert_eq!(f.batch_interval(), Duration::from_secs(5));
        assert_eq!(f.timeout_secs, 10);
        assert_eq!(f.queue_rows, 100_000);
        assert_eq!(f.spool_bytes, 268_435_456);
        assert_eq!(
            f.spool_dir(Path::new("/var/lib/bulkhead")),
            PathBuf::from("/var/lib/bulkhead/fleet-spool")
        );
    }

    #[test]
    fn the_shipped_config_has_the_fleet_defaults() {
        let text = include_str!("../../../policies/config/bulkhead.toml");
        let c = Config::parse(Path::new("/etc/bulkhead/bulkhead.toml"), text).expect("parses");
        assert_eq!(c.fleet, FleetConfig::default());
    }

    #[test]
    fn a_full_section_parses() {
        let c = parse(
            "[fleet]\nenabled = true\nclickhouse_url = \"http://127.0.0.1:8123\"\n\
             database = \"fleet_1\"\nuser = \"bulkhead\"\npassword_file = \"/etc/bulkhead/ch.pw\"\n\
             host = \"web-1\"\nmachine_id_file = \"/run/id\"\nbatch_interval_secs = 2\n\
             timeout_secs = 3\nqueue_rows = 1000\nspool_bytes = 1048576\nspool_dir = \"/srv/spool\"\n",
        )
        .expect("valid");
        let f = &c.fleet;
        assert!(f.enabled);
        assert_eq!(f.database, "fleet_1");
        assert_eq!(f.host.as_deref(), Some("web-1"));
        assert_eq!(f.spool_dir(Path::new("/x")), PathBuf::from("/srv/spool"));
        assert_eq!(f.queue_rows, 1000);
    }

    #[test]
    fn enabled_needs_a_url_and_points_at_the_section() {
        refused(
            "bpf_log = false\n[fleet]\nenabled = true\n",
            "2:2",
            "fleet.clickhouse_url: must be set when fleet.enabled = true",
        );
    }

    #[test]
    fn each_bad_value_is_refused_at_its_line_saying_why() {
        let url = |u: &str| format!("[fleet]\nclickhouse_url = \"{u}\"\n");
        refused(
            &url("https://ch.example:8443"),
            "2:1",
            "must start with http://",
        );
        refused(&url("http://ch.example"), "2:1", "needs a port");
        refused(
            &url("http://u:pw@ch.example:8123"),
            "2:1",
            "must not hold credentials",
        );
        refused(
            &url("http://ch.example:8123/db?x=1"),
            "2:1",
            "no path or query",
        );
        refused(&url("not a url"), "2:1", "not a URL");
        refused(
            "[fleet]\ndatabase = \"my-db\"\n",
            "2:1",
            "fleet.database = \"my-db\"",
        );
        refused("[fleet]\ndatabase = \"system\"\n", "2:1", "reserved");
        refused("[fleet]\nuser = \"a:b\"\n", "2:1", "must not hold ':'");
        refused("[fleet]\nhost = \"\"\n", "2:1", "fleet.host");
        refused(
            "[fleet]\npassword_file = \"ch.pw\"\n",
            "2:1",
            "fleet.password_file = \"ch.pw\": must be an absolute path",
        );
        refused("[fleet]\nspool_dir = \"spool\"\n", "2:1", "absolute");
        refused(
            "[fleet]\nbatch_interval_secs = 0\n",
            "2:1",
            "fleet.batch_interval_secs = 0: must be between 1 and 3600",
        );
        refused(
            "[fleet]\ntimeout_secs = 601\n",
            "2:1",
            "fleet.timeout_secs = 601",
        );
        refused("[fleet]\nqueue_rows = 10\n", "2:1", "fleet.queue_rows = 10");
        refused(
            "[fleet]\nspool_bytes = 1000\n",
            "2:1",
            "fleet.spool_bytes = 1000",
        );
        refused(
            "[fleet]\nbatch_size = 10\n",
            "2:1",
            "unknown field `batch_size`",
        );
        refused("[fleet]\nenabled = \"yes\"\n", "2:11", "invalid type");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse("[fleet]\ndatabase = \"a b\"\nqueue_rows = 1\n").expect_err("two problems");
        assert!(err.starts_with("c.toml:2:1: "), "{err}");
        assert!(
            err.contains("fleet.database") && err.contains("fleet.queue_rows"),
            "{err}"
        );
    }

    fn config_with(extra: &str) -> FleetConfig {
        parse(&format!("[fleet]\n{extra}")).expect("valid").fleet
    }

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn the_password_is_the_first_line_of_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = write(dir.path(), "pw", "s3cret\n", 0o600);
        let f = config_with(&format!(
            "clickhouse_url = \"http://127.0.0.1:8123\"\npassword_file = {:?}\n",
            pw.display().to_string()
        ));
        let conn = f.connection(None).expect("connection");
        assert_eq!(conn.password.as_ref().map(Password::expose), Some("s3cret"));
        assert_eq!(conn.url.to_string(), "http://127.0.0.1:8123/");
        assert_eq!(conn.timeout, Duration::from_secs(10));
        // Never printed.
        assert!(!format!("{conn:?}").contains("s3cret"));
        // The command line's URL wins.
        let conn = f.connection(Some("http://[::1]:9000")).expect("override");
        assert_eq!(conn.url.port_u16(), Some(9000));
    }

    #[test]
    fn a_password_file_others_can_read_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pw = write(dir.path(), "pw", "s3cret\n", 0o644);
        let f = config_with(&format!("password_file = {:?}\n", pw.display().to_string()));
        let err = f
            .connection(Some("http://127.0.0.1:8123"))
            .expect_err("world-readable")
            .to_string();
        assert_eq!(
            err,
            format!(
                "{}: fleet.password_file: mode 0644 lets every user read or change it; `chmod o-rwx` it",
                pw.display()
            )
        );
        let empty = write(dir.path(), "empty", "\n", 0o600);
        let f = config_with(&format!(
            "password_file = {:?}\n",
            empty.display().to_string()
        ));
        let err = f
            .connection(Some("http://127.0.0.1:8123"))
            .expect_err("empty");
        assert!(err.to_string().contains("first line is empty"), "{err}");
        let f = config_with("password_file = \"/nonexistent/pw\"\n");
        let err = f
            .connection(Some("http://127.0.0.1:8123"))
            .expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/pw: fleet.password_file: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn no_url_or_a_bad_override_is_an_error() {
        let f = FleetConfig::default();
        assert!(matches!(f.connection(None), Err(SetupError::NoUrl)));
        let err = f.connection(Some("http://x")).expect_err("no port");
        assert_eq!(
            err.to_string(),
            "ClickHouse URL \"http://x\": needs a port, like http://127.0.0.1:8123"
        );
    }

    #[test]
    fn the_identity_comes_from_the_machine_id_file_and_the_host_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = write(
            dir.path(),
            "machine-id",
            "0123456789abcdef0123456789abcdef\n",
            0o444,
        );
        let f = config_with(&format!(
            "machine_id_file = {:?}\nhost = \"h1\"\n",
            id.display().to_string()
        ));
        let me = f.identity().expect("identity");
        assert_eq!(me.host, "h1");
        assert_eq!(me.host_id, "0123456789abcdef0123456789abcdef");
        // Unset: the kernel's host name.
        let f = config_with(&format!(
            "machine_id_file = {:?}\n",
            id.display().to_string()
        ));
        let kernel = std::fs::read_to_string(HOSTNAME_FILE).expect("hostname");
        assert_eq!(f.identity().expect("identity").host, kernel.trim());
        let bad = write(dir.path(), "bad-id", "not an id\n", 0o444);
        let f = config_with(&format!(
            "machine_id_file = {:?}\n",
            bad.display().to_string()
        ));
        let err = f.identity().expect_err("bad id").to_string();
        assert!(
            err.starts_with(&format!("{}: fleet.machine_id_file: ", bad.display())),
            "{err}"
        );
    }
}
