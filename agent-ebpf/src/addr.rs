//! Addresses as the maps and records hold them.

use agent_common::{FAMILY_V4, FAMILY_V6};

/// An address (a destination, a packet's end), in the byte order the maps
/// use (network order).
#[derive(Clone, Copy)]
pub enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// Writes `addr` into a 16-byte record field and its family code.
#[inline(always)]
pub fn set_addr(out: &mut [u8; 16], family: &mut u8, addr: Dest) {
    match addr {
        Dest::V4(a) => {
            *family = FAMILY_V4;
            out[..4].copy_from_slice(&a);
        }
        Dest::V6(a) => {
            *family = FAMILY_V6;
            *out = a;
        }
    }
}

/// `addr` as a 16-byte record field (an IPv4 address in its first 4
/// bytes, zeros after) and its family code, as one 128-bit value: a
/// `[0; 16]` written in part afterwards (`set_addr`) became a call to the
/// linker's memset, a byte-at-a-time loop, on the judge's every call.
#[inline(always)]
pub fn addr_field(addr: Dest) -> ([u8; 16], u8) {
    match addr {
        Dest::V4(a) => (u128::from(u32::from_le_bytes(a)).to_le_bytes(), FAMILY_V4),
        Dest::V6(a) => (a, FAMILY_V6),
    }
}

/// An IPv6 address from the four network-order words of a context field.
#[inline(always)]
pub fn v6_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
    addr
}
