//! A real `clickhouse-server` for the fleet tests (Debian's package,
//! installed by `cargo xtask setup`), started on loopback with a
//! configuration, users and data of its own in a temporary directory, and
//! stopped by its pid on `Drop`.
//!
//! The configuration is what 18.16 (Debian bookworm's release) and current
//! releases both read: a `<yandex>` root, `users_config`, plain ports. Its
//! time zone is UTC, so `DateTime` text in answers is UTC. A different
//! server binary (a newer release) can stand in through
//! [`SERVER_ENV`].

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;

use crate::{
    http::{dechunk, http_request},
    ports::free_port_block,
    process::{stop_server, terminate, wait_http_ready},
};

/// `BULKHEAD_CLICKHOUSE_SERVER`: the server binary to run instead of
/// `clickhouse-server` from `PATH`.
pub const SERVER_ENV: &str = "BULKHEAD_CLICKHOUSE_SERVER";
/// How long the server may take to answer `/ping` (18.16 takes about a
/// second here).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `clickhouse-server`; stopped (SIGTERM, then SIGKILL) and its
/// files removed on `Drop`, which never panics.
#[derive(Debug)]
pub struct ClickHouse {
    child: Child,
    http: SocketAddr,
    /// The password user, if one was asked for.
    user: Option<(String, String)>,
    /// Configuration, users, data and logs; removed after the server stops.
    dir: TempDir,
}

impl ClickHouse {
    /// A server whose only user is `default`, without a password, from
    /// loopback.
    #[must_use]
    pub fn start() -> Self {
        Self::launch(None, &[])
    }

    /// A server that also listens on `also` (addresses of the test's own
    /// veth pairs: the root side of a namespace standing in for another
    /// host) and lets the default user in from `also`'s /24s too.
    #[must_use]
    pub fn start_also_on(also: &[IpAddr]) -> Self {
        Self::launch(None, also)
    }

    /// A server with user `user` and `password` besides `default` (which
    /// [`Self::query`] uses).
    #[must_use]
    pub fn start_with_user(user: &str, password: &str) -> Self {
        Self::launch(Some((user.to_owned(), password.to_owned())), &[])
    }

    fn launch(user: Option<(String, String)>, also: &[IpAddr]) -> Self {
        let bin = server_binary();
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-clickhouse-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a temporary directory: {e}"));
        let base = free_port_block(IpAddr::V4(Ipv4Addr::LOCALHOST), 2);
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, base));
        let config = dir.path().join("config.xml");
        write(&config, &config_xml(dir.path(), base, also));
        write(
            &dir.path().join("users.xml"),
            &users_xml(user.as_ref(), also),
        );
        let log = dir.path().join("stdout.log");
        let out = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let child = spawn_server(&bin, &config, dir.path(), out, err);
        // The guard owns the child from here: a panic below stops it.
        let mut server = Self {
            child,
            http,
            user,
            dir,
        };
        server.wait_ready(&bin);
        server
    }

    /// `bulkhead fleet init` against this server (the binary under test,
    /// no config): the fleet's database and tables. Panics with its
    /// output if it fails.
    pub fn fleet_init(&self) {
        let out = crate::daemon::bulkhead(&[
            "fleet",
            "init",
            "--clickhouse",
            &self.url(),
            "--config",
            "/dev/null",
        ]);
        assert!(
            out.status.success(),
            "bulkhead fleet init: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (SIGTERM, then SIGKILL), keeping its data, config
    /// and port: an outage, until [`Self::start_again`].
    pub fn stop(&mut self) {
        let _ = terminate(&mut self.child, STOP_TIMEOUT);
    }

    /// Starts the stopped server again on the same port and data.
    pub fn start_again(&mut self) {
        let bin = server_binary();
        let log = self.dir.path().join("stdout.log");
        let out = fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share {}: {e}", log.display()));
        let config = self.dir.path().join("config.xml");
        self.child = spawn_server(&bin, &config, self.dir.path(), out, err);
        self.wait_ready(&bin);
    }

    /// Polls `/ping` until it answers `Ok.`; panics with the server's log
    /// if it exits or does not answer in time.
    fn wait_ready(&mut self, bin: &Path) {
        let Err(problem) = wait_http_ready(
            &mut self.child,
            self.http,
            "/ping",
            READY_TIMEOUT,
            |status, body| status == 200 && body.trim() == "Ok.",
        ) else {
            return;
        };
        panic!(
            "{} on {}: {problem}; its log:\n{}",
            bin.display(),
            self.http,
            self.log()
        );
    }

    /// `http://127.0.0.1:PORT`, its HTTP interface.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.http
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The user and password of [`Self::start_with_user`].
    #[must_use]
    pub fn user(&self) -> Option<(&str, &str)> {
        self.user.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Runs `sql` as `default` and returns the answer (`TabSeparated`
    /// unless the SQL says otherwise); panics with the server's message if
    /// it fails.
    #[must_use]
    pub fn query(&self, sql: &str) -> String {
        self.try_query(sql)
            .unwrap_or_else(|(status, message)| panic!("{sql}\nfailed: HTTP {status}: {message}"))
    }

    /// Runs `sql` as `default`: the answer, or the HTTP status and
    /// the server's message.
    ///
    /// # Errors
    /// A status other than 200.
    pub fn try_query(&self, sql: &str) -> Result<String, (u16, String)> {
        self.try_query_as(sql, "", false)
    }

    /// [`Self::try_query`] under the query id `id` ("": the server picks
    /// one; the server keeps ids unique among each user's running
    /// queries), as `default` or, with `as_user`, as the user of
    /// [`Self::start_with_user`].
    ///
    /// # Errors
    /// A status other than 200.
    pub fn try_query_as(
        &self,
        sql: &str,
        id: &str,
        as_user: bool,
    ) -> Result<String, (u16, String)> {
        assert!(
            id.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)),
            "test bug: query id {id:?} needs URL encoding"
        );
        let login = match (as_user, self.user()) {
            (false, _) => String::new(),
            (true, Some((user, password))) => {
                format!("X-ClickHouse-User: {user}\r\nX-ClickHouse-Key: {password}\r\n")
            }
            (true, None) => panic!("test bug: this server has no user of its own"),
        };
        let request = format!(
            "POST /?query_id={id} HTTP/1.0\r\nHost: {}\r\n{login}Content-Length: {}\r\n\r\n{sql}",
            self.http,
            sql.len()
        );
        let (status, head, body) = http_request(self.http, &request);
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(&body)
        } else {
            body
        };
        if status == 200 {
            Ok(body)
        } else {
            Err((status, body.trim().to_owned()))
        }
    }

    /// The server's `version()`.
    #[must_use]
    pub fn version(&self) -> String {
        self.query("SELECT version()").trim().to_owned()
    }

    /// What the server wrote to its log so far.
    #[must_use]
    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in ["stdout.log", "server.err.log"] {
            let path = self.dir.path().join(name);
            let text = fs::read_to_string(&path).unwrap_or_default();
            let _ = writeln!(out, "== {}\n{text}", path.display());
        }
        out
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        stop_server(&mut self.child, "clickhouse-server", STOP_TIMEOUT);
    }
}

fn spawn_server(bin: &Path, config: &Path, dir: &Path, out: fs::File, err: fs::File) -> Child {
    let mut cmd = Command::new(bin);
    cmd.arg(format!("--config-file={}", config.display()))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// The server binary (see [`crate::require::server_binary`]).
fn server_binary() -> PathBuf {
    crate::require::server_binary(SERVER_ENV, "clickhouse-server", "/usr/sbin")
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The server's configuration: loopback only, its own ports and
/// directories, UTC.
fn config_xml(dir: &Path, base: u16, also: &[IpAddr]) -> String {
    let d = xml_escape(&dir.display().to_string());
    let tcp = base + 1;
    let also: String = also.iter().fold(String::new(), |mut out, a| {
        let _ = write!(out, "\n    <listen_host>{a}</listen_host>");
        out
    });
    format!(
        r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{d}/server.log</log>
        <errorlog>{d}/server.err.log</errorlog>
    </logger>
    <listen_host>127.0.0.1</listen_host>{also}
    <http_port>{base}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>{d}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>268435456</mark_cache_size>
    <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
"#
    )
}

/// `default` without a password, and `user` with one; both from loopback
/// (and from `also`'s /24s).
fn users_xml(user: Option<&(String, String)>, also: &[IpAddr]) -> String {
    let networks: String = also.iter().fold(String::new(), |mut out, a| {
        let _ = match a {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                write!(out, "<ip>{}.{}.{}.0/24</ip>", o[0], o[1], o[2])
            }
            IpAddr::V6(v6) => write!(out, "<ip>{v6}/64</ip>"),
        };
        out
    });
    let entry = |name: &str, password: &str| {
        format!(
            "        <{name}>\n            <password>{}</password>\n            <networks>\
             <ip>127.0.0.1</ip><ip>::1</ip>{networks}</networks>\n            <profile>default</profile>\n            \
             <quota>default</quota>\n        </{name}>\n",
            xml_escape(password)
        )
    };
    let mut users = entry("default", "");
    if let Some((name, password)) = user {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "test bug: user name {name:?} is not a plain XML element name"
        );
        users.push_str(&entry(name, password));
    }
    format!(
        "<?xml version=\"1.0\"?>\n<yandex>\n    <profiles><default></default></profiles>\n    \
         <quotas><default></default></quotas>\n    <users>\n{users}    </users>\n</yandex>\n"
    )
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
