use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("this bulkhead carries no eBPF programs: it was built with AYA_BUILD_SKIP set (for linting); build it again without")]
    NoPrograms,
    #[error("program {0} is missing from the eBPF object (build mismatch)")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object (build mismatch)")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Capacity(String),
    /// A service cgroup's SERVICES entry could not be written.
    #[error("{0}")]
    Services(String),
    #[error("{cause}; putting the policy in force back also failed ({undo}): the self-check repairs what is left")]
    Rollback {
        cause: Box<KernelError>,
        undo: Box<KernelError>,
    },
    #[error("{0} failed by test fault injection")]
    Injected(&'static str),
    #[error("cannot pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
}
