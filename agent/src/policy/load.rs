//! Reading a policy directory or a list of files into a [`PolicySet`].

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use super::{
    error::{PolicyError, PolicyErrors},
    file::{self, RawPolicy},
    model::{PolicySet, Selector, Service},
    validate::{self, Checker},
};

/// Loads every `*.toml` file directly in `dir` (not in subdirectories, so a
/// `config/` folder beside the policies is left alone), in name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyErrors> {
    let entries = fs::read_dir(dir)
        .map_err(|e| whole_file(dir, format!("cannot read policy directory: {e}")))?;
    // As the daemon reads it (reload.rs): a link named *.toml is not
    // followed but refused, so `check` and `run` agree.
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    load_texts(
        files
            .into_iter()
            .map(|f| {
                let text = read_nofollow(&f);
                (f, text)
            })
            .collect(),
    )
}

fn read_nofollow(path: &Path) -> std::io::Result<String> {
    let (file, meta) = crate::state_file::open_nofollow(path)?;
    let bytes = crate::state_file::read_all(file, &meta)?;
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not UTF-8 text ({e})"),
        )
    })
}

/// Loads exactly these files. Every file is read and checked even when an
/// earlier one fails, so that one run reports every problem.
pub fn load_files(files: &[PathBuf]) -> Result<PolicySet, PolicyErrors> {
    load_texts(
        files
            .iter()
            .map(|f| (f.clone(), fs::read_to_string(f)))
            .collect(),
    )
}

/// A policy file's path and what reading it gave.
pub type FileText = (PathBuf, std::io::Result<String>);

/// Checks files already read (in the order given), so that what is checked
/// is exactly what the caller read, hashed and recorded.
pub fn load_texts(files: Vec<FileText>) -> Result<PolicySet, PolicyErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut services = Vec::new();
    for (path, read) in &files {
        let file = path.as_path();
        let text = match read {
            Ok(t) => t.as_str(),
            Err(e) => {
                errors.extend(whole_file(file, format!("cannot read file: {e}")).0);
                continue;
            }
        };
        let mut checker = Checker::new(file, text);
        for (span, message) in file::unknown_keys(text) {
            checker.error(span, message);
        }
        match toml::from_str::<RawPolicy>(text) {
            Ok(raw) => {
                if let Some(service) = validate::service(&mut checker, raw) {
                    services.push(service);
                }
            }
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                checker.error(span, format!("not a valid policy file: {}", e.message()));
            }
        }
        errors.append(&mut checker.errors);
        warnings.append(&mut checker.warnings);
    }

    // Across files: one file per service, one service per cgroup.
    let mut by_name: HashMap<&str, &Path> = HashMap::new();
    let mut by_cgroup: HashMap<String, (&str, &Path)> = HashMap::new();
    let mut cross = Vec::new();
    for s in &services {
        if let Some(first) = by_name.insert(&s.name, &s.file) {
            cross.push(whole_file_error(
                &s.file,
                format!(
                    "service {:?} is already defined in {}; each service has one policy file",
                    s.name,
                    first.display()
                ),
            ));
        }
        if let Some((other, first)) = by_cgroup.insert(s.selector.identity(), (&s.name, &s.file)) {
            cross.push(whole_file_error(
                &s.file,
                format!(
                    "{} is already managed by service {other:?} ({}); one cgroup belongs to one service",
                    s.selector,
                    first.display()
                ),
            ));
        }
    }
    errors.extend(cross);
    warnings.extend(shadowed_units(&services));

    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    services.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(PolicySet { services, warnings })
}

/// A `cgroup` path that is also a unit another policy names: the path is
/// closer, so that policy never gets the cgroup (`Closeness`).
fn shadowed_units(services: &[Service]) -> Vec<PolicyError> {
    let mut out = Vec::new();
    for s in services {
        let Selector::Cgroup(path) = &s.selector else {
            continue;
        };
        for other in services.iter().filter(|o| o.name != s.name) {
            if matches!(other.selector, Selector::Unit(_)) && other.selector.names(path).is_some() {
                out.push(whole_file_error(
                    &s.file,
                    format!(
                        "cgroup /{path} is also {} of service {:?} ({}); an exact path is closer, so this policy takes it from service {:?}",
                        other.selector,
                        other.name,
                        other.file.display(),
                        other.name
                    ),
                ));
            }
        }
    }
    out
}

fn whole_file_error(file: &Path, message: String) -> PolicyError {
    PolicyError {
        file: file.to_path_buf(),
        line: 1,
        column: 1,
        message,
    }
}

fn whole_file(file: &Path, message: String) -> PolicyErrors {
    PolicyErrors(vec![PolicyError {
        file: file.to_path_buf(),
        line: 0,
        column: 0,
        message,
    }])
}
