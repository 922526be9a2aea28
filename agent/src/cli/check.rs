//! `bulkhead check`: validate policy files without loading anything, as the
//! agent would load them: the same reading (no links followed), the same
//! owner and mode checks and the same validation and compilation
//! (`reload::load`), so what passes the check is what the agent accepts.

use std::process::ExitCode;

use super::{
    args::{CheckArgs, CheckFormat},
    check_report::Report,
};
use crate::{
    config::Config,
    reload::{self, PolicySource},
};

pub fn check(args: &CheckArgs) -> ExitCode {
    let allow_insecure = args.allow_insecure_policy_files;
    let result = if args.files.is_empty() {
        let dir = match &args.policy_dir {
            Some(dir) => dir.clone(),
            None => match Config::load(args.config.as_deref()) {
                Ok(c) => c.policy_dir,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        reload::load(&PolicySource {
            dir,
            allow_insecure,
        })
    } else {
        reload::load_files(&args.files, allow_insecure)
    };
    let report = Report::new(&result);
    let out = match args.format {
        CheckFormat::Text => report.text(),
        CheckFormat::Json => report.json(),
        CheckFormat::Github => report.github(),
    };
    print!("{}", out.stdout);
    eprint!("{}", out.stderr);
    if report.valid() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
