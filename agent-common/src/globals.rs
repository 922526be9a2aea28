//! Globals of the kernel programs that the daemon sets at load time
//! (`EbpfLoader::override_global`), by symbol name. They live in `.rodata`
//! and the programs read them with volatile loads, so the value the loader
//! wrote is the one seen.
//!
//! As with map names, the kernel side spells each name once more (a
//! `#[unsafe(no_mangle)] static` is named by its identifier); the daemon's
//! test of the embedded object (`kernel::loader::contract`) checks that
//! every one exists with the size of its type here.

/// u8: when 0, the programs never call aya-log.
pub const BPF_LOG: &str = "BPF_LOG";
/// u8: also emit events (never enforce) for tasks outside every managed
/// service.
pub const OBSERVE_UNMANAGED: &str = "OBSERVE_UNMANAGED";
/// u64: a UDP pinhole unused this long (ns) is closed.
pub const UDP_REPLY_IDLE_NS: &str = "UDP_REPLY_IDLE_NS";
/// u32: how many UDP pinholes one service may hold.
pub const UDP_PEERS_MAX: &str = "UDP_PEERS_MAX";
/// u64: the event ring's size over `crate::WAKE_FRACTION`: the pending
/// bytes past which a record wakes the reader.
pub const EVENTS_WAKE_MARK: &str = "EVENTS_WAKE_MARK";

/// [u32; `crate::PROCESS_OFFSETS_LEN`]: where the process-identity
/// tracepoints find the executable (`crate::process`); zeros turn it off.
pub const PROCESS_OFFSETS: &str = "PROCESS_OFFSETS";

/// Every global, with the size of its value in bytes.
pub const ALL: [(&str, usize); 6] = [
    (BPF_LOG, core::mem::size_of::<u8>()),
    (OBSERVE_UNMANAGED, core::mem::size_of::<u8>()),
    (UDP_REPLY_IDLE_NS, core::mem::size_of::<u64>()),
    (UDP_PEERS_MAX, core::mem::size_of::<u32>()),
    (EVENTS_WAKE_MARK, core::mem::size_of::<u64>()),
    (
        PROCESS_OFFSETS,
        core::mem::size_of::<[u32; crate::PROCESS_OFFSETS_LEN]>(),
    ),
];
