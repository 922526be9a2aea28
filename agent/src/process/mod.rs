//! Process identity (issue: which program made a connection): the
//! executable file of each process, as the kernel's tracepoints keep it
//! (`agent_common::process`), and what the agent adds around it:
//!
//! - `exe_file`: a file's identity as the kernel sees it (device, inode),
//!   from a path, symlinks resolved;
//! - `offsets`: where the tracepoints find it, from the kernel's BTF;
//! - `scan`: the processes that were there before the agent;
//! - `names`: the path to show in a decision for an identity;
//! - `shebang`: a script's interpreter (what an exec of a script runs).

pub mod exe_file;
pub mod names;
pub mod offsets;
pub mod scan;
pub mod shebang;

pub use exe_file::ExeFile;
pub use names::ExeNames;
