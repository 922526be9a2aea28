//! Numbers of the kernel's ABI that the programs compare against (from
//! the uapi headers; aya-ebpf's bindings do not carry them). IP protocol
//! numbers are in `agent_common` (`PROTO_*`): the daemon reads them too.

/// `sk_type` of a socket.
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;
pub const SOCK_RAW: u32 = 3;

/// Address families (`bpf_sock_ops::family` is a u32, the LSM hook's
/// argument an int).
pub const AF_INET: u32 = 2;
pub const AF_PACKET: i32 = 17;

pub const EPERM: i32 = 1;
/// A full map's insert fails with -E2BIG.
pub const E2BIG: i32 = -7;

/// TCP states (`include/net/tcp_states.h`).
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_CLOSING: u32 = 11;

/// TCP header flags (byte 13 of the header).
pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
