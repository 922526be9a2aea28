//! A temporary policy directory, as `bulkhead run|check --policy-dir` reads.

use std::{
    fmt::{self, Display},
    fs,
    marker::PhantomData,
    path::{Path, PathBuf},
};

use tempfile::TempDir;

use crate::cgroup::CgroupGuard;

/// A temporary directory of policy files, removed on `Drop`.
#[derive(Debug)]
pub struct PolicyDir {
    dir: TempDir,
}

impl PolicyDir {
    /// An empty policy directory.
    #[must_use]
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-test-policies-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary policy directory: {e}"));
        Self { dir }
    }

    /// A directory holding `files` (name, contents).
    #[must_use]
    pub fn with(files: &[(&str, &str)]) -> Self {
        let dir = Self::new();
        for (name, contents) in files {
            dir.write(name, contents);
        }
        dir
    }

    /// Writes `contents` to `name` in the directory and returns its path.
    #[expect(
        clippy::must_use_candidate,
        reason = "called for its effect; the result is a convenience"
    )]
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write policy {}: {e}", path.display()));
        path
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the whole directory, as `mv new-policies policies` does: a
    /// sibling directory is filled with `files`, the old one renamed away
    /// (and removed), the new one renamed to this path.
    pub fn replace_whole(&self, files: &[(&str, &str)]) {
        let path = self.dir.path();
        let sibling = |suffix: &str| {
            let mut name = path.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        let (new, old) = (sibling(".new"), sibling(".old"));
        fs::create_dir(&new).unwrap_or_else(|e| panic!("cannot create {}: {e}", new.display()));
        for (name, contents) in files {
            let file = new.join(name);
            fs::write(&file, contents)
                .unwrap_or_else(|e| panic!("cannot write policy {}: {e}", file.display()));
        }
        fs::rename(path, &old)
            .unwrap_or_else(|e| panic!("cannot move {} away: {e}", path.display()));
        fs::rename(&new, path)
            .unwrap_or_else(|e| panic!("cannot move {} into place: {e}", new.display()));
        fs::remove_dir_all(&old).unwrap_or_else(|e| panic!("cannot remove {}: {e}", old.display()));
    }
}

impl Default for PolicyDir {
    fn default() -> Self {
        Self::new()
    }
}

/// One `[[egress]]` rule, rendered as TOML by `Display`.
///
/// ```
/// use integration_tests::policy::Egress;
/// let rule = Egress::to(["127.0.0.1", "2001:db8::/64"]).ports([5432.to_string(), "8000-8100".into()]).protocol("tcp");
/// assert_eq!(
///     rule.to_string(),
///     "[[egress]]\nto = [\"127.0.0.1\", \"2001:db8::/64\"]\nports = [5432, \"8000-8100\"]\nprotocol = \"tcp\"\n"
/// );
/// let qualified = Egress::to(["127.0.0.1"]).exe(["/usr/sbin/nginx"]).uid([33]);
/// assert_eq!(
///     qualified.to_string(),
///     "[[egress]]\nto = [\"127.0.0.1\"]\nexe = [\"/usr/sbin/nginx\"]\nuid = [33]\n"
/// );
/// ```
pub type Egress = Rule<Out>;

/// One `[[ingress]]` rule (who may connect or send to the service), rendered
/// as TOML by `Display`.
///
/// ```
/// use integration_tests::policy::Ingress;
/// let rule = Ingress::from(["198.51.100.2", "2001:db8::/64"]).ports([8080]).protocol("tcp");
/// assert_eq!(
///     rule.to_string(),
///     "[[ingress]]\nfrom = [\"198.51.100.2\", \"2001:db8::/64\"]\nports = [8080]\nprotocol = \"tcp\"\n"
/// );
/// ```
pub type Ingress = Rule<In>;

/// Which table a [`Rule`] is, and what its peers are called.
pub trait Table {
    const TABLE: &'static str;
    const PEERS: &'static str;
}

/// `[[egress]]`: destinations, `to`.
#[derive(Debug, Clone)]
pub struct Out;
impl Table for Out {
    const TABLE: &'static str = "egress";
    const PEERS: &'static str = "to";
}

/// `[[ingress]]`: sources, `from`.
#[derive(Debug, Clone)]
pub struct In;
impl Table for In {
    const TABLE: &'static str = "ingress";
    const PEERS: &'static str = "from";
}

/// A rule of table `T`: peers (addresses or CIDRs), optional ports and
/// protocol.
#[derive(Debug, Clone)]
pub struct Rule<T> {
    peers: Vec<String>,
    ports: Option<Vec<String>>,
    protocol: Option<String>,
    exe: Option<Vec<String>>,
    uid: Option<Vec<u32>>,
    table: PhantomData<T>,
}

impl<T> Rule<T> {
    fn peers<P: Display>(peers: impl IntoIterator<Item = P>) -> Self {
        Self {
            peers: peers.into_iter().map(|p| p.to_string()).collect(),
            ports: None,
            protocol: None,
            exe: None,
            uid: None,
            table: PhantomData,
        }
    }

    /// Only these (local, for ingress) ports: a number (`5432`) or a range
    /// (`"8000-8100"`).
    #[must_use]
    pub fn ports<P: Display>(self, ports: impl IntoIterator<Item = P>) -> Self {
        Self {
            ports: Some(ports.into_iter().map(|p| p.to_string()).collect()),
            ..self
        }
    }

    /// Only this protocol: `tcp`, `udp` or `any`.
    #[must_use]
    pub fn protocol(self, protocol: &str) -> Self {
        Self {
            protocol: Some(protocol.to_owned()),
            ..self
        }
    }
}

impl<T> Rule<T> {
    /// Only calls from processes running one of these executables.
    #[must_use]
    pub fn exe<P: AsRef<Path>>(self, exe: impl IntoIterator<Item = P>) -> Self {
        Self {
            exe: Some(
                exe.into_iter()
                    .map(|p| p.as_ref().to_string_lossy().into_owned())
                    .collect(),
            ),
            ..self
        }
    }

    /// Only calls from processes of these users.
    #[must_use]
    pub fn uid(self, uid: impl IntoIterator<Item = u32>) -> Self {
        Self {
            uid: Some(uid.into_iter().collect()),
            ..self
        }
    }
}

impl Egress {
    /// A rule allowing `to` (addresses or CIDRs), all ports, any protocol.
    #[must_use]
    pub fn to<P: Display>(to: impl IntoIterator<Item = P>) -> Self {
        Self::peers(to)
    }
}

impl Ingress {
    /// A rule allowing peers in `from` (addresses or CIDRs) to every local
    /// port, any protocol.
    #[must_use]
    pub fn from<P: Display>(from: impl IntoIterator<Item = P>) -> Self {
        Self::peers(from)
    }
}

impl<T: Table> Display for Rule<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "[[{}]]\n{} = {}",
            T::TABLE,
            T::PEERS,
            toml_strings(&self.peers)
        )?;
        if let Some(ports) = &self.ports {
            writeln!(f, "ports = {}", toml_ports(ports))?;
        }
        if let Some(protocol) = &self.protocol {
            writeln!(f, "protocol = {protocol:?}")?;
        }
        if let Some(exe) = &self.exe {
            writeln!(f, "exe = {}", toml_strings(exe))?;
        }
        if let Some(uid) = &self.uid {
            let uid: Vec<String> = uid.iter().map(ToString::to_string).collect();
            writeln!(f, "uid = [{}]", uid.join(", "))?;
        }
        Ok(())
    }
}

/// `["a", "b"]`.
fn toml_strings(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// `[5432, "8000-8100"]`: a plain number is a TOML integer, a range a string.
fn toml_ports(ports: &[String]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| {
            if p.contains('-') {
                format!("{p:?}")
            } else {
                p.clone()
            }
        })
        .collect();
    format!("[{}]", ports.join(", "))
}

/// A service policy for test cgroup `cgroup`: `mode` is `enforce` or `audit`.
#[must_use]
pub fn service_policy(cgroup: &CgroupGuard, mode: &str, rules: &[Egress]) -> String {
    let mut text = format!("cgroup = {:?}\nmode = {mode:?}\n", cgroup.policy_path());
    for rule in rules {
        text.push('\n');
        text.push_str(&rule.to_string());
    }
    text
}

/// An enforcing policy for `svc` allowing TCP and UDP to `ip`, on `ports`
/// only.
#[must_use]
pub fn allowing(svc: &CgroupGuard, ip: &str, ports: &[u16]) -> String {
    service_policy(
        svc,
        "enforce",
        &[Egress::to([ip]).ports(ports.iter().copied())],
    )
}

/// [`service_policy`] with no egress rules, followed by `tables` (rules of
/// either table, `[bind]`, `[sockets]`: anything that renders as TOML).
#[must_use]
pub fn policy_with(cgroup: &CgroupGuard, mode: &str, tables: &[&dyn Display]) -> String {
    let mut text = service_policy(cgroup, mode, &[]);
    for table in tables {
        text.push('\n');
        text.push_str(&table.to_string());
    }
    text
}

/// A policy for the systemd unit `unit` (of user `user`'s manager when
/// given) in `mode`, with these egress rules.
#[must_use]
pub fn unit_policy(unit: &str, user: Option<u32>, mode: &str, rules: &[Egress]) -> String {
    let user = user
        .map(|uid| format!("user = {uid}\n"))
        .unwrap_or_default();
    let mut text = format!("unit = {unit:?}\nmode = {mode:?}\n{user}");
    for rule in rules {
        text.push('\n');
        text.push_str(&rule.to_string());
    }
    text
}
