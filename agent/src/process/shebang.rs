//! Scripts: exec'ing a script runs its interpreter, so the kernel's
//! identity of the process is the interpreter's file while the name the
//! exec asked for is the script's. Following the `#!` line (and the
//! interpreters' own, as the kernel does up to four levels) finds the
//! interpreter's path for that identity.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use super::ExeFile;

/// How deep interpreters may nest (the kernel's `BINPRM_MAX_RECURSION`).
const MAX_DEPTH: usize = 4;
/// The kernel reads at most this much of a `#!` line (`BINPRM_BUF_SIZE`).
const LINE_MAX: usize = 256;
/// Where `#!/usr/bin/env NAME` is looked for: the agent does not know the
/// script's `PATH`, so the usual directories, in the usual order.
const SEARCH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The real path of the interpreter that runs `script` and is the file
/// `exe`; None when `script` is no script or its interpreter is another
/// file (a script replaced since, an interpreter found elsewhere on the
/// script's own `PATH`).
#[must_use]
pub fn interpreter(script: &Path, exe: ExeFile) -> Option<PathBuf> {
    let mut current = script.to_path_buf();
    for _ in 0..MAX_DEPTH {
        let next = std::fs::canonicalize(interpreter_of(&current)?).ok()?;
        if ExeFile::of(&next).is_ok_and(|f| f.same_file(&exe)) {
            return Some(next);
        }
        current = next;
    }
    None
}

/// The interpreter a script's `#!` line names (for `env NAME`, NAME
/// found in [`SEARCH`]).
fn interpreter_of(script: &Path) -> Option<PathBuf> {
    let mut head = [0u8; LINE_MAX];
    let mut file = std::fs::File::open(script).ok()?;
    let n = file.read(&mut head).ok()?;
    let line = head[..n].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    let program = PathBuf::from(words.next()?);
    if program.file_name().is_some_and(|n| n == "env") {
        let name = words.find(|w| !w.starts_with('-'))?;
        return SEARCH
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file());
    }
    Some(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn a_script_is_named_by_its_interpreter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sh = std::fs::canonicalize("/bin/sh").expect("sh");
        let sh_file = ExeFile::of(&sh).expect("stat");
        let direct = script(dir.path(), "a", "#!/bin/sh -e\necho\n");
        assert_eq!(interpreter(&direct, sh_file), Some(sh.clone()));
        let by_env = script(dir.path(), "b", "#!/usr/bin/env -S sh\necho\n");
        assert_eq!(interpreter(&by_env, sh_file), Some(sh.clone()));
        // Nested: a script whose interpreter is the first script.
        let nested = script(dir.path(), "c", &format!("#!{}\n", direct.display()));
        assert_eq!(interpreter(&nested, sh_file), Some(sh));
    }

    #[test]
    fn another_file_or_no_script_is_no_interpreter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = ExeFile::of(Path::new("/proc/self/exe")).expect("own exe");
        let sh_script = script(dir.path(), "a", "#!/bin/sh\n");
        assert_eq!(interpreter(&sh_script, me), None);
        let plain = script(dir.path(), "b", "echo\n");
        assert_eq!(interpreter(&plain, me), None);
        let looping = dir.path().join("c");
        std::fs::write(&looping, format!("#!{}\n", looping.display())).expect("write");
        assert_eq!(interpreter(&looping, me), None);
    }
}
