//! `exe` rules across upgrades: a package manager replaces a binary by
//! renaming a new file over its path, which gives the path a new identity
//! (device, inode) that no `EXE_RULES` entry names. Every rescan stats
//! each `exe` path of the policy in force; a path that names a new file
//! gets an entry with the same rules as the file it named at load, so the
//! upgraded service keeps its access with no reload, provided only root
//! could have put the new file there (the file and every directory on
//! the way root's, not writable by group or others; else it is refused
//! and logged). The old file keeps
//! its entry too (a process still running it is the same program) until
//! the next reload, which resolves every path afresh.
//!
//! Every file with an entry is held open ([`HeldFiles`]): an open file
//! keeps its inode, so while the agent runs the old binary's inode number
//! cannot go to a new file, which would otherwise have the old file's
//! device and inode. The inode's generation, part of the identity where
//! the filesystem reports one, covers the time the agent does not run.

use std::collections::{HashMap as StdHashMap, HashSet};

use agent_common::{maps as names, ExeRule, ExeRuleKey};
use aya::{
    maps::{HashMap, MapData},
    Ebpf,
};

use super::{
    compile::{exe_rule, exe_rule_key, CompiledPolicy},
    map_access::{map_err, map_mut},
    KernelError,
};
use crate::process::ExeFile;

/// A path of an `exe` rule that now names another file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    pub path: std::path::PathBuf,
    pub was: ExeFile,
    pub now: ExeFile,
    /// Why the new file was not given the rules: a user other than root
    /// could have put it there.
    pub refused: Option<String>,
}

/// Open descriptors of the files `EXE_RULES` has entries for, by identity.
#[derive(Debug, Default)]
pub struct HeldFiles(StdHashMap<ExeFile, std::fs::File>);

impl HeldFiles {
    /// Holds the file each `exe` path of `policy` named when it was
    /// compiled (if the path still names it: else the file it names now is
    /// followed and held then), and lets go of every other.
    pub fn hold_policy(&mut self, policy: &CompiledPolicy) {
        let mut next = StdHashMap::new();
        for p in &policy.exe_paths {
            if next.contains_key(&p.file) {
                continue;
            }
            if let Some(f) = self.0.remove(&p.file) {
                next.insert(p.file, f);
            } else if let Ok((now, f)) = ExeFile::open(&p.path) {
                if now.same_file(&p.file) {
                    next.insert(p.file, f);
                }
            }
        }
        self.0 = next;
    }
}

/// Adds the entries for the paths of `live` that name a new file since
/// load, and holds those files; `done` holds what earlier calls added
/// (emptied at each switch).
pub fn follow(
    ebpf: &mut Ebpf,
    live: &CompiledPolicy,
    done: &mut HashSet<(u32, ExeFile)>,
    held: &mut HeldFiles,
) -> Result<Vec<Followed>, KernelError> {
    let moved: Vec<(&super::compile::ExePath, ExeFile, std::fs::File)> = live
        .exe_paths
        .iter()
        .filter_map(|p| {
            let (now, f) = ExeFile::open(&p.path).ok()?;
            (!now.same_file(&p.file) && !done.contains(&(p.service_id, now))).then_some((p, now, f))
        })
        .collect();
    if moved.is_empty() {
        return Ok(Vec::new());
    }
    let mut map: HashMap<&mut MapData, ExeRuleKey, ExeRule> = map_mut(ebpf, names::EXE_RULES)?;
    let mut out = Vec::new();
    for (p, now, opened) in moved {
        // Only a file only root could have put there takes the rules over.
        let refused = std::fs::canonicalize(&p.path)
            .map_err(|e| e.to_string())
            .and_then(|real| {
                crate::process::exe_file::writable_by_others(&p.path, &real).map_or(Ok(()), Err)
            })
            .err();
        if let Some(why) = refused {
            done.insert((p.service_id, now));
            out.push(Followed {
                path: p.path.clone(),
                was: p.file,
                now,
                refused: Some(why),
            });
            continue;
        }
        let key = |f: ExeFile| exe_rule_key(f, p.service_id);
        let Some(mask) = map
            .get(&key(p.file), 0)
            .ok()
            .and_then(|r| r.mask_for(&p.file.to_kernel()))
        else {
            continue; // not in force (yet): the next reload resolves it
        };
        // Another path may already give the new file rules of its own (an
        // entry of another generation was a file whose inode this reuses).
        let theirs = map
            .get(&key(now), 0)
            .ok()
            .and_then(|r| r.mask_for(&now.to_kernel()))
            .unwrap_or(0);
        held.0.entry(now).or_insert(opened);
        map.insert(key(now), exe_rule(now, mask | theirs), 0)
            .map_err(map_err(names::EXE_RULES))?;
        done.insert((p.service_id, now));
        out.push(Followed {
            path: p.path.clone(),
            was: p.file,
            now,
            refused: None,
        });
    }
    Ok(out)
}
