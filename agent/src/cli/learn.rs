//! `bulkhead learn`: write a policy allowing exactly what a service was
//! observed doing (checked after writing).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::Value;

use super::{args::LearnArgs, graph::answer};
use crate::{
    control::protocol::{LearnRequest, Request},
    graph,
};

pub fn learn(args: &LearnArgs) -> ExitCode {
    let req = Request::Learn(LearnRequest {
        service: args.service.clone(),
        since: args.since.map(graph::ago),
        enforce: args.enforce,
        exe: args.exe,
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
