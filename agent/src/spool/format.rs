//! A spooled batch's file: a header, then the body as it was pushed.
//!
//! All integers little-endian:
//!
//! ```text
//! 0   magic        8 bytes  "BHSPOOL\n"
//! 8   version      u16      1
//! 10  table_len    u16
//! 12  id_len       u16
//! 14  rows         u32
//! 18  body_len     u64
//! 26  body_crc     u32      CRC-32 of the body
//! 30  table        table_len bytes (UTF-8)
//!     batch_id     id_len bytes (UTF-8)
//!     header_crc   u32      CRC-32 of every byte before it
//!     body         body_len bytes
//! ```
//!
//! The header has a checksum of its own so that a file whose body is damaged
//! can still be named by table and rows (they are counted as dropped); the
//! file's length must be exactly the header's plus `body_len`, so a
//! truncated file (or one with bytes appended) is refused before any
//! checksum is computed.

use bytes::Bytes;

use super::batch::Batch;

pub const MAGIC: [u8; 8] = *b"BHSPOOL\n";
pub const VERSION: u16 = 1;
/// The header up to the table name.
const FIXED: usize = 30;
const CRC: usize = 4;

/// What a damaged file's header says, when its own checksum holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub table: String,
    pub batch_id: String,
    pub rows: u32,
    pub body_len: u64,
    body_crc: u32,
    /// Bytes before the body.
    len: usize,
}

/// Why a file is not a good spooled batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("{len} bytes, shorter than a spool file's header")]
    ShortHeader { len: usize },
    #[error("not a spool file (its first bytes are not the spool's magic)")]
    BadMagic,
    #[error("format version {0}, this agent reads version {VERSION}")]
    Version(u16),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("table name or batch id is not UTF-8")]
    NotUtf8,
    #[error("{actual} bytes where the header says {expected} (truncated or appended to)")]
    WrongLength { actual: u64, expected: u64 },
    #[error("body checksum mismatch")]
    BodyChecksum,
}

/// A file that did not decode: the problem, and its header when that much
/// could be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub problem: Problem,
    pub header: Option<Header>,
}

/// The file's length for `batch`.
#[must_use]
pub fn encoded_len(batch: &Batch) -> u64 {
    header_len(batch) as u64 + batch.body.len() as u64
}

fn header_len(batch: &Batch) -> usize {
    FIXED + batch.table.len() + batch.batch_id.len() + CRC
}

/// The header for `batch` (the body follows it unchanged). The table name
/// and batch id must have passed [`Batch::check`] (their lengths fit u16).
#[must_use]
pub fn encode_header(batch: &Batch) -> Vec<u8> {
    let mut h = Vec::with_capacity(header_len(batch));
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&len_u16(batch.table.len()).to_le_bytes());
    h.extend_from_slice(&len_u16(batch.batch_id.len()).to_le_bytes());
    h.extend_from_slice(&batch.rows.to_le_bytes());
    h.extend_from_slice(&(batch.body.len() as u64).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(&batch.body).to_le_bytes());
    h.extend_from_slice(batch.table.as_bytes());
    h.extend_from_slice(batch.batch_id.as_bytes());
    let crc = crc32fast::hash(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

fn len_u16(n: usize) -> u16 {
    // Batch::check bounds both names far below u16::MAX.
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Reads and checks the header at the start of `bytes` (a whole file).
///
/// # Errors
/// Too short, wrong magic or version, a header checksum mismatch, names
/// that are not UTF-8.
pub fn decode_header(bytes: &[u8]) -> Result<Header, Problem> {
    let short = Problem::ShortHeader { len: bytes.len() };
    let fixed = bytes.get(..FIXED).ok_or_else(|| short.clone())?;
    if fixed[..8] != MAGIC {
        return Err(Problem::BadMagic);
    }
    let u16_at = |i: usize| u16::from_le_bytes([fixed[i], fixed[i + 1]]);
    let version = u16_at(8);
    if version != VERSION {
        return Err(Problem::Version(version));
    }
    let table_len = usize::from(u16_at(10));
    let id_len = usize::from(u16_at(12));
    let rows = u32::from_le_bytes([fixed[14], fixed[15], fixed[16], fixed[17]]);
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&fixed[18..26]);
    let body_len = u64::from_le_bytes(body_len);
    let body_crc = u32::from_le_bytes([fixed[26], fixed[27], fixed[28], fixed[29]]);
    let names_end = FIXED + table_len + id_len;
    let len = names_end + CRC;
    let header = bytes.get(..len).ok_or(short)?;
    let stored = u32::from_le_bytes([
        header[names_end],
        header[names_end + 1],
        header[names_end + 2],
        header[names_end + 3],
    ]);
    if crc32fast::hash(&header[..names_end]) != stored {
        return Err(Problem::HeaderChecksum);
    }
    let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| Problem::NotUtf8);
    Ok(Header {
        table: text(&header[FIXED..FIXED + table_len])?,
        batch_id: text(&header[FIXED + table_len..names_end])?,
        rows,
        body_len,
        body_crc,
        len,
    })
}

/// Decodes a whole file into its batch.
///
/// # Errors
/// The file is damaged: [`Damage`] says how, with the header when its
/// checksum held.
pub fn decode(bytes: Bytes) -> Result<Batch, Damage> {
    let header = decode_header(&bytes).map_err(|problem| Damage {
        problem,
        header: None,
    })?;
    let expected = header.len as u64 + header.body_len;
    if bytes.len() as u64 != expected {
        return Err(Damage {
            problem: Problem::WrongLength {
                actual: bytes.len() as u64,
                expected,
            },
            header: Some(header),
        });
    }
    let body = bytes.slice(header.len..);
    if crc32fast::hash(&body) != header.body_crc {
        return Err(Damage {
            problem: Problem::BodyChecksum,
            header: Some(header),
        });
    }
    Ok(Batch {
        table: header.table,
        batch_id: header.batch_id,
        rows: header.rows,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            table: "flows".into(),
            batch_id: "host-1:7:1700000000".into(),
            rows: 2,
            body: Bytes::from_static(b"{\"a\":1}\n{\"a\":2}\n"),
        }
    }

    fn file(b: &Batch) -> Vec<u8> {
        let mut f = encode_header(b);
        f.extend_from_slice(&b.body);
        f
    }

    #[test]
    fn a_batch_round_trips() {
        let b = batch();
        let f = file(&b);
        assert_eq!(f.len() as u64, encoded_len(&b));
        assert_eq!(decode(Bytes::from(f)), Ok(b));
    }

    #[test]
    fn an_empty_body_round_trips() {
        let b = Batch {
            rows: 0,
            body: Bytes::new(),
            ..batch()
        };
        assert_eq!(decode(Bytes::from(file(&b))), Ok(b));
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let b = batch();
        let good = file(&b);
        let problem = |f: Vec<u8>| decode(Bytes::from(f)).expect_err("damaged").problem;

        assert_eq!(
            problem(good[..10].to_vec()),
            Problem::ShortHeader { len: 10 }
        );
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(problem(magic), Problem::BadMagic);
        let mut version = good.clone();
        version[8] = 2;
        assert_eq!(problem(version), Problem::Version(2));
        let mut rows = good.clone();
        rows[14] ^= 1;
        assert_eq!(problem(rows), Problem::HeaderChecksum);
        let cut = good.len() - 3;
        assert_eq!(
            problem(good[..cut].to_vec()),
            Problem::WrongLength {
                actual: cut as u64,
                expected: good.len() as u64
            }
        );
        let mut body = good.clone();
        let last = body.len() - 1;
        body[last] ^= 0xff;
        let damage = decode(Bytes::from(body)).expect_err("damaged body");
        assert_eq!(damage.problem, Problem::BodyChecksum);
        let header = damage.header.expect("the header holds");
        assert_eq!((header.table.as_str(), header.rows), ("flows", 2));
    }
}
