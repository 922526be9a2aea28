//! The table of processes' executables (`PROCESSES`) at start, filled
//! once the tracepoints run, from the most trusted source there is:
//!
//! - a take-over: the previous agent's pinned table, which its pinned
//!   tracepoints kept current while no agent ran. `/proc/PID/exe` is not
//!   read for them: a process can change what it says (`prctl(PR_SET_MM)`)
//!   from any process sharing its memory map, one in a user namespace of
//!   its own included, so a table built from `/proc` trusts it.
//! - a cold start (no previous pins, or a table this agent cannot read):
//!   `/proc`, through `process::scan` (processes of user namespaces other
//!   than the agent's left unknown). docs/threat-model.md says what this
//!   trusts.
//!
//! Either way entries are written with `BPF_NOEXIST`: what the tracepoints
//! wrote meanwhile is newer and stays.

use std::path::Path;

use agent_common::{maps as names, ExeId, EXE_NAME_MAX};
use aya::{
    maps::{HashMap, Map, MapData},
    Ebpf,
};

use super::map_access::map_mut;
use crate::process::ExeFile;

/// BPF_NOEXIST.
const NOEXIST: u64 = 1;

/// Copies the previous agent's `PROCESSES` from its pins under `previous`
/// into ours. Returns how many processes; None when its table cannot be
/// read (then the caller scans `/proc`).
pub fn carry_over(ebpf: &mut Ebpf, previous: &Path) -> Option<usize> {
    let maps = previous.join("maps");
    let old: HashMap<MapData, u32, ExeId> = open_lru(&maps.join(names::PROCESSES))?;
    let entries: Vec<(u32, ExeId)> = old.iter().filter_map(Result::ok).collect();
    let mut ours: HashMap<&mut MapData, u32, ExeId> = map_mut(ebpf, names::PROCESSES).ok()?;
    let mut carried = 0;
    for (tgid, exe) in entries {
        // An agent before generations wrote none: the inode the process
        // runs is the one its exec recorded (device and inode as recorded,
        // not as /proc says), so its generation is that inode's.
        let exe = if exe.gen == 0 {
            with_generation(tgid, exe)
        } else {
            exe
        };
        if is_process(tgid) && ours.insert(tgid, exe, NOEXIST).is_ok() {
            carried += 1;
        }
    }
    Some(carried)
}

/// Copies the names the previous agent's exec tracepoint kept
/// (`EXE_NAMES`), for the processes it saw exec, into ours.
pub fn carry_names(ebpf: &mut Ebpf, previous: &Path) {
    let path = previous.join("maps").join(names::EXE_NAMES);
    let Some(old) = open_lru::<ExeId, [u8; EXE_NAME_MAX]>(&path) else {
        return;
    };
    let Ok(mut ours) =
        map_mut::<HashMap<&mut MapData, ExeId, [u8; EXE_NAME_MAX]>>(ebpf, names::EXE_NAMES)
    else {
        return;
    };
    for (exe, name) in old.iter().filter_map(Result::ok) {
        let _ = ours.insert(exe, name, NOEXIST);
    }
}

fn open_lru<K: aya::Pod, V: aya::Pod>(path: &Path) -> Option<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(path).ok()?;
    HashMap::try_from(Map::LruHashMap(data)).ok()
}

/// `exe` with the generation of the file process `tgid` runs, if that file
/// has `exe`'s device and inode.
fn with_generation(tgid: u32, exe: ExeId) -> ExeId {
    match ExeFile::of(Path::new(&format!("/proc/{tgid}/exe"))) {
        Ok(f) if f.dev == exe.dev && f.ino == exe.ino => ExeId {
            gen: f.gen.unwrap_or(0),
            ..exe
        },
        _ => exe,
    }
}

/// Whether `id` is a live process (a thread group leader): an agent before
/// this one kept an entry per thread too.
fn is_process(id: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{id}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .is_some_and(|t| t.trim() == id.to_string())
    })
}
