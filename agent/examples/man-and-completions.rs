//! Writes `bulkhead`'s man page and shell completions, generated from the
//! command line's clap definitions, into a directory:
//!
//! - `man/bulkhead.1` and one page per subcommand, `man/bulkhead-run.1`
//!   and so on, which `bulkhead.1` refers to (roff; the install and the
//!   package gzip them),
//! - `completions/bulkhead.bash`, `completions/_bulkhead` (zsh),
//!   `completions/bulkhead.fish`.
//!
//! `cargo run -p agent --example man-and-completions -- DIR`; `cargo xtask
//! install` and `cargo xtask package` run it, so the files always match the
//! binary they ship with.

use std::{fs, path::PathBuf, process::ExitCode};

use clap::CommandFactory as _;
use clap_complete::Shell;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: man-and-completions DIR");
        return ExitCode::from(2);
    };
    match write_all(&PathBuf::from(dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("man-and-completions: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_all(dir: &std::path::Path) -> std::io::Result<()> {
    let completions = dir.join("completions");
    let man = dir.join("man");
    for sub in [&completions, &man] {
        // A page of a subcommand since removed must not linger.
        if sub.exists() {
            fs::remove_dir_all(sub).map_err(|e| with_path(e, sub, "cannot empty"))?;
        }
        fs::create_dir_all(sub).map_err(|e| with_path(e, sub, "cannot create"))?;
    }

    let cmd = bulkhead::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man).map_err(|e| with_path(e, &man, "cannot write"))?;

    for (shell, name) in [
        (Shell::Bash, "bulkhead.bash"),
        (Shell::Zsh, "_bulkhead"),
        (Shell::Fish, "bulkhead.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "bulkhead", &mut text);
        let path = completions.join(name);
        fs::write(&path, text).map_err(|e| with_path(e, &path, "cannot write"))?;
    }
    Ok(())
}

fn with_path(e: std::io::Error, path: &std::path::Path, what: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}
