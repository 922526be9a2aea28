//! Reading the policy directory for (re)loading: permissions, validation,
//! compilation, content hashes, and the audit record of what changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use sha2::{Digest, Sha256};

use crate::{
    events::{ChangeRecord, EventType, FileChange, FlowEvent, ServiceChange},
    kernel::{self, CompiledPolicy},
    policy::{self, PolicyError, PolicyErrors, PolicySet, PortRange, Service},
};

/// Where policies come from, and whether insecure permissions are tolerated.
#[derive(Debug, Clone)]
pub struct PolicySource {
    pub dir: PathBuf,
    /// Accept files or a directory that are not root-owned or are group- or
    /// world-writable (`--allow-insecure-policy-files`; loudly logged).
    pub allow_insecure: bool,
}

/// A validated, compiled policy set and the files it came from.
pub struct Loaded {
    pub set: PolicySet,
    pub compiled: CompiledPolicy,
    pub snapshot: Snapshot,
    /// Permission problems tolerated because of `allow_insecure`.
    pub warnings: Vec<PolicyError>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub files: BTreeMap<PathBuf, FileInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub sha256: String,
    pub uid: u32,
    pub mode: u32,
}

/// Reload outcomes, for metrics and `bulkhead status`.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub success: AtomicU64,
    pub failure: AtomicU64,
    /// Why the last reload was refused; `None` while the last load or
    /// reload was applied.
    pub last_error: Mutex<Option<String>>,
    /// Unix time of the last policy applied: the load at start, or a reload.
    pub last_success_unix: AtomicU64,
}

impl ReloadStats {
    pub fn record(&self, result: &Result<(), String>) {
        let mut last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                self.success.fetch_add(1, Ordering::Relaxed);
                self.record_load();
                *last = None;
            }
            Err(e) => {
                self.failure.fetch_add(1, Ordering::Relaxed);
                *last = Some(e.clone());
            }
        }
    }

    /// The policy loaded at start is in force (not counted as a reload).
    pub fn record_load(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_success_unix.store(now, Ordering::Relaxed);
    }

    /// Whether the last load or reload was applied (the Prometheus
    /// convention's `last_reload_successful`).
    pub fn last_successful(&self) -> bool {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }
}

/// Why a reload was refused; either way the policy in force is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Problems in the policy files, each at `FILE:LINE:COL` (`:0:0` for
    /// a whole file: its owner or mode, a read error).
    Policy(PolicyErrors),
    /// A valid policy the kernel could not be switched to.
    Apply(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Policy(errors) => errors.fmt(f),
            Self::Apply(e) => f.write_str(e),
        }
    }
}

/// Reads, checks and compiles the policy directory: every problem, each
/// located; nothing is applied here. `bulkhead check` calls it too, so
/// what passes the check is what the agent loads.
pub fn load(source: &PolicySource) -> Result<Loaded, PolicyErrors> {
    let mut problems = Vec::new();
    // Each file is read once: what is checked and enforced is exactly what
    // was hashed into the audit record.
    let (snapshot, texts) = snapshot(&source.dir, &mut problems)?;
    checked(snapshot, texts, problems, source.allow_insecure)
}

/// As [`load`], for exactly these files (`bulkhead check FILE...`): each
/// read and judged as the agent reads and judges the files of its policy
/// directory.
pub fn load_files(files: &[PathBuf], allow_insecure: bool) -> Result<Loaded, PolicyErrors> {
    let mut problems = Vec::new();
    let mut snapshot = Snapshot::default();
    let mut texts = Vec::new();
    for path in files {
        texts.push(read_file(path, &mut snapshot, &mut problems));
    }
    checked(snapshot, texts, problems, allow_insecure)
}

/// Validates and compiles what was read; permission `problems` are errors
/// unless `allow_insecure` makes them warnings.
fn checked(
    snapshot: Snapshot,
    texts: Vec<policy::FileText>,
    mut problems: Vec<PolicyError>,
    allow_insecure: bool,
) -> Result<Loaded, PolicyErrors> {
    let mut warnings = Vec::new();
    if allow_insecure {
        warnings = std::mem::take(&mut problems);
    }
    let mut errors = problems;
    match policy::load_texts(texts) {
        Err(e) => errors.extend(e.0),
        Ok(set) => match kernel::compile(&set) {
            Err(e) => errors.extend(e.0),
            Ok(compiled) if errors.is_empty() => {
                return Ok(Loaded {
                    set,
                    compiled,
                    snapshot,
                    warnings,
                })
            }
            Ok(_) => {}
        },
    }
    Err(PolicyErrors(errors))
}

/// Reads the directory's policy files (`*.toml` directly in it), in name
/// order, with their hashes and permissions; permission problems go to
/// `problems`, read errors to the texts (the policy loader reports them).
fn snapshot(
    dir: &Path,
    problems: &mut Vec<PolicyError>,
) -> Result<(Snapshot, Vec<policy::FileText>), PolicyErrors> {
    let unreadable = |e: std::io::Error| {
        PolicyErrors(vec![whole(
            dir,
            format!("cannot read policy directory: {e}"),
        )])
    };
    // The directory is checked as opened (a link to it is followed: the
    // files in it are what is refused as links).
    let meta = fs::File::open(dir)
        .and_then(|d| d.metadata())
        .map_err(unreadable)?;
    check_owner(dir, meta.uid(), meta.mode(), problems);
    let entries = fs::read_dir(dir).map_err(unreadable)?;
    let mut snapshot = Snapshot::default();
    let mut texts = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        // Not followed: a link named *.toml is opened (and refused as one).
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if is_dir || path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        texts.push(read_file(&path, &mut snapshot, problems));
    }
    texts.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((snapshot, texts))
}

/// Reads one policy file, not following a link, noting its hash and
/// permissions in `snapshot` and its permission problems in `problems`;
/// a read error goes into the text (the policy loader reports it).
fn read_file(
    path: &Path,
    snapshot: &mut Snapshot,
    problems: &mut Vec<PolicyError>,
) -> policy::FileText {
    // Checked and read through one descriptor: the file judged is the
    // file read, whatever happens to the name meanwhile.
    let (file, meta) = match crate::state_file::open_nofollow(path) {
        Ok(opened) => opened,
        Err(e) => return (path.to_path_buf(), Err(e)),
    };
    check_owner(path, meta.uid(), meta.mode(), problems);
    let bytes = match crate::state_file::read_all(file, &meta) {
        Ok(bytes) => bytes,
        Err(e) => return (path.to_path_buf(), Err(e)),
    };
    snapshot.files.insert(
        path.to_path_buf(),
        FileInfo {
            sha256: hex(&Sha256::digest(&bytes)),
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        },
    );
    let text = String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        )
    });
    (path.to_path_buf(), text)
}

/// A problem with a file or directory as a whole (`PATH:0:0: ...`).
fn whole(path: &Path, message: String) -> PolicyError {
    PolicyError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message,
    }
}

/// Policy files decide who may talk to whom: only root may write them.
fn check_owner(path: &Path, uid: u32, mode: u32, problems: &mut Vec<PolicyError>) {
    if uid != 0 {
        problems.push(whole(
            path,
            format!("owned by uid {uid}, not root: refused (anyone who can write policies controls the network)"),
        ));
    }
    if mode & 0o022 != 0 {
        problems.push(whole(
            path,
            format!(
                "mode {:04o} is group- or world-writable: refused (chmod go-w)",
                mode & 0o7777
            ),
        ));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of `dir` as they are now, permissions not judged (for the
/// record of a refused reload).
pub fn current_snapshot(dir: &Path) -> Snapshot {
    snapshot(dir, &mut Vec::new())
        .map(|(s, _)| s)
        .unwrap_or_default()
}

/// The audit record of a change from `before` to `after` (None: refused;
/// then `refused_files` are the files as they were when refused).
pub fn change_record(
    action: &str,
    trigger: &str,
    before: (&Snapshot, &PolicySet),
    after: Option<(&Snapshot, &PolicySet)>,
    refused_files: Option<&Snapshot>,
    error: Option<String>,
) -> ChangeRecord {
    let (old_snap, old_set) = before;
    let empty_snap = Snapshot::default();
    let empty_set = PolicySet::default();
    let (new_snap, new_set) = after.unwrap_or((refused_files.unwrap_or(&empty_snap), &empty_set));
    let mut files = Vec::new();
    let paths: BTreeSet<&PathBuf> = old_snap.files.keys().chain(new_snap.files.keys()).collect();
    for path in paths {
        let (b, a) = (old_snap.files.get(path), new_snap.files.get(path));
        if b == a {
            continue;
        }
        files.push(FileChange {
            path: path.display().to_string(),
            sha256_before: b.map(|f| f.sha256.clone()),
            sha256_after: a.map(|f| f.sha256.clone()),
            owner_uid: a.or(b).map(|f| f.uid),
            mode: a.or(b).map(|f| format!("{:04o}", f.mode)),
        });
    }
    let services = if after.is_some() {
        service_changes(old_set, new_set)
    } else {
        Vec::new()
    };
    ChangeRecord {
        action: action.to_string(),
        result: if after.is_some() {
            "applied"
        } else {
            "refused"
        }
        .to_string(),
        trigger: trigger.to_string(),
        files,
        services,
        error,
    }
}

/// Rules added and removed per service, as readable one-line rules.
pub fn service_changes(old: &PolicySet, new: &PolicySet) -> Vec<ServiceChange> {
    let rules = |set: &PolicySet| -> BTreeMap<String, BTreeSet<String>> {
        set.services
            .iter()
            .map(|s| (s.name.clone(), describe(s)))
            .collect()
    };
    let (old, new) = (rules(old), rules(new));
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let none = BTreeSet::new();
    names
        .into_iter()
        .filter_map(|name| {
            let (o, n) = (
                old.get(name).unwrap_or(&none),
                new.get(name).unwrap_or(&none),
            );
            let added: Vec<String> = n.difference(o).cloned().collect();
            let removed: Vec<String> = o.difference(n).cloned().collect();
            (!added.is_empty() || !removed.is_empty()).then(|| ServiceChange {
                service: name.clone(),
                added,
                removed,
            })
        })
        .collect()
}

fn describe(s: &Service) -> BTreeSet<String> {
    let ports = |p: &[PortRange]| -> String {
        p.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let nets = |n: &[ipnetwork::IpNetwork]| -> String {
        n.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut out = BTreeSet::new();
    out.insert(format!("service {} mode={}", s.selector, s.mode));
    for r in &s.egress {
        out.insert(format!(
            "egress to={} ports={} protocol={}",
            nets(&r.to),
            ports(&r.ports),
            r.protocol
        ));
    }
    if let Some(ingress) = &s.ingress {
        out.insert("ingress default-deny".to_string());
        for r in ingress {
            out.insert(format!(
                "ingress from={} ports={} protocol={}",
                nets(&r.from),
                ports(&r.ports),
                r.protocol
            ));
        }
    }
    if let Some(b) = &s.bind {
        out.insert(format!(
            "bind ports=[{}] protocol={}",
            ports(&b.ports),
            b.protocol
        ));
    }
    out.insert(format!(
        "sockets raw={} packet={}",
        s.sockets.raw, s.sockets.packet
    ));
    out
}

/// The decision-log event for a change record.
pub fn audit_event(change: ChangeRecord) -> FlowEvent {
    FlowEvent {
        change: Some(change),
        ..FlowEvent::from_agent(EventType::PolicyChange, "control")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn source(dir: &Path) -> PolicySource {
        PolicySource {
            dir: dir.to_path_buf(),
            allow_insecure: false,
        }
    }

    #[test]
    fn world_writable_files_are_refused_unless_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.toml");
        fs::write(&f, "cgroup = \"/a\"\nmode = \"audit\"\n").expect("write");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).expect("chmod");
        let err = load(&source(dir.path()))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("mode 0666 is group- or world-writable"),
            "{err}"
        );
        let ok = load(&PolicySource {
            allow_insecure: true,
            ..source(dir.path())
        })
        .expect("allowed with the override");
        assert_eq!(ok.warnings.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_text_is_refused_by_name_with_the_others_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("a.toml"), b"cgroup = \"/a\"\xff\n").expect("write");
        fs::write(
            dir.path().join("b.toml"),
            "cgroup = \"/b\"\nmode = \"loud\"\n",
        )
        .expect("write");
        let err = load(&source(dir.path()))
            .err()
            .expect("refused")
            .to_string();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        assert!(
            err.contains(&format!("{}:", a.display())) && err.contains("not UTF-8 text"),
            "{err}"
        );
        assert!(err.contains(&format!("{}:2:", b.display())), "{err}");
    }

    #[test]
    fn a_symlinked_policy_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let real = elsewhere.path().join("a.toml");
        fs::write(&real, "cgroup = \"/a\"\nmode = \"audit\"\n").expect("write");
        std::os::unix::fs::symlink(&real, dir.path().join("a.toml")).expect("symlink");
        let err = load(&source(dir.path()))
            .err()
            .expect("refused")
            .to_string();
        let link = dir.path().join("a.toml");
        assert!(
            err.contains(&format!("{}:", link.display())) && err.contains("is a symbolic link"),
            "{err}"
        );
    }

    #[test]
    fn the_record_hashes_exactly_the_bytes_that_were_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.toml");
        let text = "cgroup = \"/a\"\nmode = \"audit\"\n";
        fs::write(&f, text).expect("write");
        let loaded = load(&source(dir.path())).expect("valid");
        assert_eq!(
            loaded.snapshot.files[&f].sha256,
            hex(&Sha256::digest(text.as_bytes()))
        );
        assert_eq!(loaded.set.services[0].name, "a");
    }

    #[test]
    fn the_record_names_changed_files_and_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("a.toml");
        fs::write(&f, "cgroup = \"/a\"\nmode = \"audit\"\n").expect("write");
        let before = load(&source(dir.path())).expect("valid");
        fs::write(&f, "cgroup = \"/a\"\nmode = \"audit\"\n[[egress]]\nto = [\"192.0.2.1\"]\nports = [53]\nprotocol = \"udp\"\n").expect("write");
        let after = load(&source(dir.path())).expect("valid");
        let rec = change_record(
            "reload",
            "sighup",
            (&before.snapshot, &before.set),
            Some((&after.snapshot, &after.set)),
            None,
            None,
        );
        assert_eq!(rec.result, "applied");
        assert_eq!(rec.files.len(), 1);
        assert_ne!(rec.files[0].sha256_before, rec.files[0].sha256_after);
        assert_eq!(rec.services.len(), 1);
        assert_eq!(
            rec.services[0].added,
            ["egress to=192.0.2.1/32 ports=53 protocol=udp"]
        );
        assert!(rec.services[0].removed.is_empty());
    }
}
