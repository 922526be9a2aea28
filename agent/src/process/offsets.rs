//! Where the process-identity tracepoints find a task's executable: byte
//! offsets of `task_struct.mm`, `mm_struct.exe_file`, `file.f_inode`,
//! `inode.i_ino`, `inode.i_generation`, `inode.i_sb`, `super_block.s_dev`,
//! `task_struct.signal` and `signal_struct.live`, read from the running kernel's BTF (they
//! change with every kernel build), and of the three tracepoint fields the
//! programs read, from their format files. The kernel crate cannot use
//! CO-RE relocations, so the agent does the relocation here and hands the
//! numbers over in the `PROCESS_OFFSETS` global.

use std::path::Path;

use agent_common::{
    OFF_EXEC_FILENAME, OFF_FILE_INODE, OFF_INODE_GEN, OFF_INODE_INO, OFF_INODE_SB, OFF_MM_EXE_FILE,
    OFF_NEWTASK_CLONE_FLAGS, OFF_NEWTASK_PID, OFF_SB_DEV, OFF_SIGNAL_LIVE, OFF_TASK_MM,
    OFF_TASK_SIGNAL, PROCESS_OFFSETS_LEN,
};
use btf_rs::{Btf, Type};

/// The offsets, or why process identity is off on this host.
pub fn find(btf_path: &Path, tracefs: &Path) -> Result<[u32; PROCESS_OFFSETS_LEN], String> {
    // Read whole, then parsed from memory: `Btf::from_file` asks the file
    // its position as it goes (42,566 lseek calls per start on this
    // host's kernel), seconds of every agent start under emulation.
    let btf = std::fs::read(btf_path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| Btf::from_bytes(&bytes).map_err(|e| e.to_string()))
        .map_err(|e| {
            format!(
                "cannot read the kernel's BTF at {}: {e}",
                btf_path.display()
            )
        })?;
    let mut out = [0u32; PROCESS_OFFSETS_LEN];
    for (index, strukt, member) in [
        (OFF_TASK_MM, "task_struct", "mm"),
        (OFF_TASK_SIGNAL, "task_struct", "signal"),
        (OFF_MM_EXE_FILE, "mm_struct", "exe_file"),
        (OFF_FILE_INODE, "file", "f_inode"),
        (OFF_INODE_INO, "inode", "i_ino"),
        (OFF_INODE_SB, "inode", "i_sb"),
        (OFF_INODE_GEN, "inode", "i_generation"),
        (OFF_SB_DEV, "super_block", "s_dev"),
        (OFF_SIGNAL_LIVE, "signal_struct", "live"),
    ] {
        out[index] = member_offset(&btf, strukt, member)
            .ok_or_else(|| format!("the kernel's BTF has no {strukt}.{member}"))?;
    }
    let events = tracefs.join("events");
    let exec = events.join("sched/sched_process_exec/format");
    out[OFF_EXEC_FILENAME] = field_offset(&exec, "filename")?;
    let newtask = events.join("task/task_newtask/format");
    out[OFF_NEWTASK_PID] = field_offset(&newtask, "pid")?;
    out[OFF_NEWTASK_CLONE_FLAGS] = field_offset(&newtask, "clone_flags")?;
    Ok(out)
}

/// The byte offset of `member` in struct `name`, looking through the
/// anonymous structs and unions the kernel nests fields in.
fn member_offset(btf: &Btf, name: &str, member: &str) -> Option<u32> {
    let types = btf.resolve_types_by_name(name).ok()?;
    types.iter().find_map(|t| match t {
        Type::Struct(s) => find_in(btf, s, member, 0),
        _ => None,
    })
}

fn find_in(btf: &Btf, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<u32> {
    for m in &s.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            // A bit field is no pointer or integer the programs can read.
            return (m.bitfield_size().unwrap_or(0) == 0 && bits.is_multiple_of(8))
                .then_some(bits / 8);
        }
        if name.is_empty() {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some(found) = find_in(btf, &inner, member, bits) {
                    return Some(found);
                }
            }
        }
    }
    None
}

/// The `offset:` of field `field` in a tracepoint's format file.
fn field_offset(format: &Path, field: &str) -> Result<u32, String> {
    let text = std::fs::read_to_string(format)
        .map_err(|e| format!("cannot read {}: {e}", format.display()))?;
    parse_field_offset(&text, field)
        .ok_or_else(|| format!("{} has no field {field}", format.display()))
}

fn parse_field_offset(text: &str, field: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let ident = decl.split_whitespace().last()?;
        let ident = ident.split('[').next()?;
        if ident != field {
            return None;
        }
        line.split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_files_field_offset() {
        let exec = "name: sched_process_exec\nID: 311\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_field_offset(exec, "filename"), Some(8));
        assert_eq!(parse_field_offset(exec, "pid"), Some(12));
        assert_eq!(parse_field_offset(exec, "child_pid"), None);
        // 6.1's, where clone_flags is an unsigned long.
        let newtask = "\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\tfield:unsigned long clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:short oom_score_adj;\toffset:40;\tsize:2;\tsigned:1;\n";
        assert_eq!(parse_field_offset(newtask, "pid"), Some(8));
        assert_eq!(parse_field_offset(newtask, "comm"), Some(12));
        assert_eq!(parse_field_offset(newtask, "clone_flags"), Some(32));
    }

    /// This host's own kernel: every offset is found (needs its BTF,
    /// which every kernel bulkhead supports has).
    #[test]
    fn this_kernels_structures_are_found() {
        let btf = Path::new("/sys/kernel/btf/vmlinux");
        if !btf.exists() {
            panic!("no kernel BTF at {}", btf.display());
        }
        let btf = Btf::from_file(btf).expect("BTF");
        for (s, m) in [
            ("task_struct", "mm"),
            ("mm_struct", "exe_file"),
            ("inode", "i_ino"),
            ("inode", "i_generation"),
            ("signal_struct", "live"),
        ] {
            let off = member_offset(&btf, s, m).unwrap_or_else(|| panic!("{s}.{m}"));
            assert!(off > 0, "{s}.{m} at {off}");
        }
        assert_eq!(member_offset(&btf, "task_struct", "no_such_field"), None);
    }
}
