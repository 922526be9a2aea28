//! `bulkhead graph`, `bulkhead blast-radius` and `bulkhead learn`: ask the
//! running daemon, print or write the answer.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::Value;

use super::{blast, export, view::View};
use crate::control::{
    admin::{ask, SocketArgs},
    protocol::{BlastRadiusRequest, GraphRequest, LearnRequest, Request},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Json,
    Dot,
    Mermaid,
}

#[derive(clap::Args, Debug)]
pub struct GraphArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    pub format: Format,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

#[derive(clap::Args, Debug)]
pub struct BlastRadiusArgs {
    /// The service.
    pub service: String,
    /// Only connections seen in this window count ("7d", "12h", "30m").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

#[derive(clap::Args, Debug)]
pub struct LearnArgs {
    /// The service.
    pub service: String,
    /// Learn only from connections seen in this window ("7d", "12h").
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Write the policy to FILE (checked after writing) instead of stdout.
    /// An existing FILE is kept unless --force; a symbolic link never
    /// followed.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace FILE if it exists (never through a symbolic link).
    #[arg(long, requires = "output")]
    pub force: bool,
    /// Write `mode = "enforce"` (default: "audit", to review first).
    #[arg(long)]
    pub enforce: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
    #[command(flatten)]
    pub offline: Offline,
}

/// Reading the saved graph instead of asking the daemon (it may be stopped).
#[derive(clap::Args, Debug)]
pub struct Offline {
    /// Do not ask the daemon: read the graph it saved in this state directory
    /// (`graph.json`, written every 30 s and when it stops).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// With --state-dir: the policy directory [default: the config's policy_dir].
    #[arg(long, value_name = "DIR", requires = "state_dir")]
    pub policy_dir: Option<PathBuf>,
}

/// The daemon's answer, or with `--state-dir` the same answer computed here
/// from the saved graph and the policy files.
fn answer(
    cmd: &str,
    socket: &SocketArgs,
    offline: &Offline,
    req: &Request,
) -> Result<Value, ExitCode> {
    let Some(state_dir) = &offline.state_dir else {
        return ask(cmd, socket, req);
    };
    let fail = |e: String| {
        eprintln!("bulkhead {cmd}: {e}");
        ExitCode::FAILURE
    };
    let path = state_dir.join(super::store::FILE);
    let bytes =
        std::fs::read(&path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    let graph =
        super::store::from_json(&bytes).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    let dir = match &offline.policy_dir {
        Some(d) => d.clone(),
        None => {
            crate::config::Config::load(socket.config.as_deref())
                .map_err(|e| fail(e.to_string()))?
                .policy_dir
        }
    };
    let set = crate::policy::load_dir(&dir).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        fail(format!("invalid policy in {}", dir.display()))
    })?;
    let shared = super::Shared::default();
    *shared.graph() = graph;
    match req {
        Request::BlastRadius(r) => super::requests::blast_radius(&shared, &set, r),
        Request::Learn(r) => super::requests::learn(&shared, &set, r),
        _ => Ok(super::requests::graph(&shared, &set)),
    }
    .map_err(fail)
}

pub fn graph(args: &GraphArgs) -> ExitCode {
    let req = Request::Graph(GraphRequest {});
    let result = match answer("graph", &args.socket, &args.offline, &req) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.format == Format::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let view: View = match serde_json::from_value(result) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bulkhead graph: the daemon's answer is not a graph: {e}");
            return ExitCode::FAILURE;
        }
    };
    print!(
        "{}",
        match args.format {
            Format::Dot => export::dot(&view),
            _ => export::mermaid(&view),
        }
    );
    ExitCode::SUCCESS
}

pub fn blast_radius(args: &BlastRadiusArgs) -> ExitCode {
    let req = Request::BlastRadius(BlastRadiusRequest {
        service: args.service.clone(),
        since: args.since.map(super::ago),
    });
    let result = match answer("blast-radius", &args.socket, &args.offline, &req) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.json {
        println!("{result}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<blast::BlastRadius>(result) {
        Ok(b) => {
            print!("{}", super::report::render(&b));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bulkhead blast-radius: unexpected answer from the daemon: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn learn(args: &LearnArgs) -> ExitCode {
    let req = Request::Learn(LearnRequest {
        service: args.service.clone(),
        since: args.since.map(super::ago),
        enforce: args.enforce,
    });
    let result = match answer("learn", &args.socket, &args.offline, &req) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let Some(text) = result.get("policy").and_then(Value::as_str) else {
        eprintln!("bulkhead learn: the daemon sent no policy");
        return ExitCode::FAILURE;
    };
    let Some(path) = &args.output else {
        print!("{text}");
        return ExitCode::SUCCESS;
    };
    if let Err(e) = write_policy(path, text, args.force) {
        eprintln!("bulkhead learn: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let rules = result.get("rules").and_then(Value::as_u64).unwrap_or(0);
    match crate::policy::load_files(std::slice::from_ref(path))
        .and_then(|set| crate::kernel::compile(&set).map(|_| set))
    {
        Ok(_) => {
            println!(
                "wrote {}: {rules} rule(s) learned for {}; it passes `bulkhead check`. Review it, then enforce.",
                path.display(),
                args.service
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!(
                "bulkhead learn: the learned policy {} does not pass `bulkhead check` (a bug: please report it)",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to `path` atomically (a hidden temporary file in the same
/// directory, then a rename), mode 0644 as policy files must be.
/// Writes the learned policy. Run as root, a link planted at FILE must not
/// redirect the write (O_NOFOLLOW), and an existing file is kept unless
/// `force` (O_EXCL); with `force` the file is replaced by a rename, which
/// replaces a name and never writes through one.
fn write_policy(path: &Path, text: &str, force: bool) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let flags = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "is a symbolic link: refused (links are not followed; name the file itself)",
            ))
        }
        Ok(_) if !force => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "exists: refused (--force replaces it)",
            ))
        }
        _ => {}
    }
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(flags)
            .open(p)
            .map_err(|e| match e.kind() {
                ErrorKind::AlreadyExists => Error::new(
                    ErrorKind::AlreadyExists,
                    "exists (or appeared meanwhile): refused (--force replaces it)",
                ),
                _ => e,
            })
    };
    if !force {
        let mut f = open(path)?;
        f.write_all(text.as_bytes())?;
        return f.sync_all();
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy".to_string());
    let tmp = dir.join(format!(".{name}.learn-tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_output_never_follows_a_link_nor_overwrites_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").expect("write");
        let link = dir.path().join("out.toml");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        for force in [false, true] {
            let err = write_policy(&link, "new", force).expect_err("a link");
            assert!(err.to_string().contains("is a symbolic link"), "{err}");
        }
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep");
        let err = write_policy(&victim, "new", false).expect_err("exists");
        assert!(err.to_string().contains("--force replaces it"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "keep");
        write_policy(&victim, "new", true).expect("forced");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "new");
        let fresh = dir.path().join("fresh.toml");
        write_policy(&fresh, "x", false).expect("new file");
        assert_eq!(std::fs::read_to_string(&fresh).expect("fresh"), "x");
    }
}
