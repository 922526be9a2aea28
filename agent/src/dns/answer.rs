//! Reading a client's query and its resolver's answer (wire format by the
//! `domain` crate): the question, whether the answer is the one for this
//! query, its truncation flag, and the addresses it gives for the
//! question's name.
//!
//! Only addresses on the CNAME chain that starts at the question's name
//! count: `q CNAME a`, `a CNAME b`, `b A 198.51.100.7` teaches
//! 198.51.100.7 for `q`. Records for any other owner in the same answer are
//! ignored (counted in [`Inspected::off_chain`]): a resolver passes on what
//! a zone's server sent, and a server for `evil.example` must not be able
//! to teach an address "for" `api.example.com` by adding a record to its
//! own answer.

use std::{collections::HashMap, fmt, net::IpAddr};

use domain::{
    base::{
        iana::Class, message_builder::StaticCompressor, Message, MessageBuilder, ParsedName, Rtype,
    },
    rdata::{Aaaa, AllRecordData, Cname, A},
};

/// Longest CNAME chain followed (what resolvers allow is of this order;
/// longer chains in one answer are refused as a loop or abuse).
pub const MAX_CHAIN: usize = 16;

/// A name as labels, lower-cased, leftmost first, without the root.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(Vec<Box<[u8]>>);

impl DnsName {
    #[must_use]
    pub fn labels(&self) -> &[Box<[u8]>] {
        &self.0
    }

    /// A name from presentation text without escapes
    /// (`"api.example.com."`); `None` for an empty label or a label longer
    /// than 63 bytes.
    #[must_use]
    pub fn from_ascii(text: &str) -> Option<Self> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() {
            return Some(Self(Vec::new()));
        }
        text.split('.')
            .map(|l| {
                (1..=63)
                    .contains(&l.len())
                    .then(|| l.to_ascii_lowercase().into_bytes().into_boxed_slice())
            })
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }

    /// A name as [`fmt::Display`] writes it (`\DDD` escapes included),
    /// read back from a state file; `None` if it is not that form.
    #[must_use]
    pub fn from_presentation(text: &str) -> Option<Self> {
        if text == "." {
            return Some(Self(Vec::new()));
        }
        text.split('.')
            .map(|label| {
                let mut out = Vec::with_capacity(label.len());
                let mut bytes = label.bytes();
                while let Some(b) = bytes.next() {
                    if b == b'\\' {
                        let digits: Vec<u8> = bytes.by_ref().take(3).collect();
                        if digits.len() != 3 || !digits.iter().all(u8::is_ascii_digit) {
                            return None;
                        }
                        out.push(std::str::from_utf8(&digits).ok()?.parse::<u8>().ok()?);
                    } else {
                        out.push(b.to_ascii_lowercase());
                    }
                }
                (1..=63)
                    .contains(&out.len())
                    .then(|| out.into_boxed_slice())
            })
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }

    fn from_parsed<O: AsRef<[u8]>>(name: &ParsedName<O>) -> Self {
        Self(
            name.iter()
                .map(|label| label.as_slice().to_ascii_lowercase().into_boxed_slice())
                .filter(|label| !label.is_empty())
                .collect(),
        )
    }
}

impl fmt::Display for DnsName {
    /// Presentation form without the trailing dot; bytes outside letters,
    /// digits, '-' and '_' are written `\DDD` (RFC 1035 5.1), so a label
    /// holding a dot cannot be mistaken for two.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, label) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            for &b in label.iter() {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                    write!(f, "{}", char::from(b))?;
                } else {
                    write!(f, "\\{b:03}")?;
                }
            }
        }
        Ok(())
    }
}

/// What the proxy needs of a client's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    pub name: DnsName,
    pub qtype: u16,
}

/// Why a query or an answer was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("shorter than a DNS header ({0} bytes)")]
    Short(usize),
    #[error("not a query (QR set or opcode {0} is not QUERY)")]
    NotAQuery(u8),
    #[error("{0} questions; a query has exactly one")]
    QuestionCount(u16),
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("not the answer to this query (ID, QR or question differs)")]
    NotTheAnswer,
    #[error("CNAME chain longer than {MAX_CHAIN} or looping")]
    ChainTooLong,
}

fn malformed(e: impl fmt::Display) -> AnswerError {
    AnswerError::Malformed(e.to_string())
}

/// Reads a client's query: exactly one question, opcode QUERY.
///
/// # Errors
/// What makes it unusable; the proxy answers FORMERR (or nothing, when
/// there is not even a header to answer).
pub fn parse_query(bytes: &[u8]) -> Result<Query, AnswerError> {
    let msg = Message::from_octets(bytes).map_err(|_| AnswerError::Short(bytes.len()))?;
    let header = msg.header();
    if header.qr() || header.opcode().to_int() != 0 {
        return Err(AnswerError::NotAQuery(header.opcode().to_int()));
    }
    let count = msg.header_counts().qdcount();
    if count != 1 {
        return Err(AnswerError::QuestionCount(count));
    }
    let question = msg.sole_question().map_err(malformed)?;
    Ok(Query {
        id: header.id(),
        name: DnsName::from_parsed(question.qname()),
        qtype: question.qtype().to_int(),
    })
}

/// One address an answer gives for the question's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerAddress {
    pub addr: IpAddr,
    /// The smallest TTL on the way: the address record's and every CNAME's
    /// before it (the mapping is only as fresh as its stalest link).
    pub ttl: u32,
    /// The question's name first, then each CNAME target, the address
    /// record's owner last.
    pub chain: Vec<DnsName>,
}

/// What an answer says, once it is known to answer the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub rcode: u8,
    /// TC: the answer did not fit (UDP); the client retries over TCP.
    pub truncated: bool,
    pub addresses: Vec<AnswerAddress>,
    /// A, AAAA and CNAME records ignored because their owner is not on the
    /// question's chain.
    pub off_chain: usize,
}

/// Checks that `reply` answers `query` (ID, QR, question) and reads its
/// addresses for the question's name.
///
/// # Errors
/// A reply that is malformed, answers something else, or chains CNAMEs
/// past [`MAX_CHAIN`]. Nothing is learnt from it; the proxy still decides
/// what the client gets.
pub fn inspect(query: &[u8], reply: &[u8]) -> Result<Inspected, AnswerError> {
    let query_msg = Message::from_octets(query).map_err(|_| AnswerError::Short(query.len()))?;
    let msg = Message::from_octets(reply).map_err(|_| AnswerError::Short(reply.len()))?;
    if !msg.is_answer(&query_msg) {
        return Err(AnswerError::NotTheAnswer);
    }
    let qname = DnsName::from_parsed(msg.sole_question().map_err(malformed)?.qname());

    // Owner -> (target, ttl) for CNAMEs; owner -> [(addr, ttl)] for A/AAAA.
    let mut cnames: HashMap<DnsName, (DnsName, u32)> = HashMap::new();
    let mut addrs: HashMap<DnsName, Vec<(IpAddr, u32)>> = HashMap::new();
    for record in msg.answer().map_err(malformed)? {
        let record = record.map_err(malformed)?;
        if record.class() != Class::IN {
            continue;
        }
        let owner = DnsName::from_parsed(&record.owner());
        let ttl = record.ttl().as_secs();
        match record.rtype() {
            Rtype::CNAME => {
                if let Some(r) = record.to_record::<Cname<_>>().map_err(malformed)? {
                    let target = DnsName::from_parsed(r.data().cname());
                    // Two CNAMEs for one owner is a broken answer: keep the
                    // first, as a resolver would.
                    cnames.entry(owner).or_insert((target, ttl));
                }
            }
            Rtype::A => {
                if let Some(r) = record.to_record::<A>().map_err(malformed)? {
                    addrs
                        .entry(owner)
                        .or_default()
                        .push((IpAddr::V4(r.data().addr()), ttl));
                }
            }
            Rtype::AAAA => {
                if let Some(r) = record.to_record::<Aaaa>().map_err(malformed)? {
                    addrs
                        .entry(owner)
                        .or_default()
                        .push((IpAddr::V6(r.data().addr()), ttl));
                }
            }
            _ => {}
        }
    }

    // Walk the chain from the question's name; (name, smallest ttl so far).
    let mut chain = vec![qname];
    let mut chain_ttl = vec![u32::MAX];
    while let Some((target, ttl)) = chain.last().and_then(|n| cnames.get(n)) {
        if chain.len() > MAX_CHAIN || chain.contains(target) {
            return Err(AnswerError::ChainTooLong);
        }
        let so_far = chain_ttl.last().copied().unwrap_or(u32::MAX).min(*ttl);
        chain.push(target.clone());
        chain_ttl.push(so_far);
    }

    let mut addresses = Vec::new();
    for (i, name) in chain.iter().enumerate() {
        for &(addr, ttl) in addrs.get(name).map(Vec::as_slice).unwrap_or_default() {
            addresses.push(AnswerAddress {
                addr,
                ttl: ttl.min(chain_ttl[i]),
                chain: chain[..=i].to_vec(),
            });
        }
    }
    let on_chain_cnames = chain.len() - 1;
    let on_chain_addrs: usize = chain
        .iter()
        .filter_map(|n| addrs.get(n))
        .map(Vec::len)
        .sum();
    let all: usize = cnames.len() + addrs.values().map(Vec::len).sum::<usize>();
    let header = msg.header();
    Ok(Inspected {
        rcode: header.rcode().to_int(),
        truncated: header.tc(),
        addresses,
        off_chain: all - on_chain_cnames - on_chain_addrs,
    })
}

/// `reply` without the A and AAAA records of its answer section for which
/// `drop(owner, address)` says so; everything else (header flags and ID,
/// question, CNAMEs, other records, authority, additional with its EDNS
/// OPT record) is kept, the section counts follow, and names are
/// compressed again. The proxy uses it to give a client only the
/// addresses it learnt (an answer over the cap would otherwise offer
/// addresses already evicted: connects to them are denied).
///
/// # Errors
/// A message that cannot be read or written again; the caller passes the
/// reply on unchanged.
pub fn without_addresses(
    reply: &[u8],
    drop: impl Fn(&DnsName, IpAddr) -> bool,
) -> Result<Vec<u8>, AnswerError> {
    let msg = Message::from_octets(reply).map_err(|_| AnswerError::Short(reply.len()))?;
    let mut builder =
        MessageBuilder::from_target(StaticCompressor::new(Vec::new())).map_err(malformed)?;
    *builder.header_mut() = msg.header();
    let mut question = builder.question();
    for q in msg.question() {
        question.push(q.map_err(malformed)?).map_err(malformed)?;
    }
    let mut answer = question.answer();
    for record in msg.answer().map_err(malformed)? {
        let record = record.map_err(malformed)?;
        let addr = match record.rtype() {
            Rtype::A => record
                .to_record::<A>()
                .map_err(malformed)?
                .map(|r| IpAddr::V4(r.data().addr())),
            Rtype::AAAA => record
                .to_record::<Aaaa>()
                .map_err(malformed)?
                .map(|r| IpAddr::V6(r.data().addr())),
            _ => None,
        };
        if let Some(addr) = addr {
            if record.class() == Class::IN && drop(&DnsName::from_parsed(&record.owner()), addr) {
                continue;
            }
        }
        let whole = record
            .to_record::<AllRecordData<_, _>>()
            .map_err(malformed)?
            .ok_or_else(|| malformed("a record that cannot be read"))?;
        answer.push(whole).map_err(malformed)?;
    }
    let mut authority = answer.authority();
    for record in msg.authority().map_err(malformed)? {
        let whole = record
            .map_err(malformed)?
            .to_record::<AllRecordData<_, _>>()
            .map_err(malformed)?
            .ok_or_else(|| malformed("a record that cannot be read"))?;
        authority.push(whole).map_err(malformed)?;
    }
    let mut additional = authority.additional();
    for record in msg.additional().map_err(malformed)? {
        let whole = record
            .map_err(malformed)?
            .to_record::<AllRecordData<_, _>>()
            .map_err(malformed)?
            .ok_or_else(|| malformed("a record that cannot be read"))?;
        additional.push(whole).map_err(malformed)?;
    }
    Ok(additional.finish().into_target())
}

/// Whether `reply` is the answer to `query` (ID, QR and question): what a
/// forwarder checks before taking a datagram as the upstream's answer.
#[must_use]
pub fn answers(query: &[u8], reply: &[u8]) -> bool {
    match (Message::from_octets(query), Message::from_octets(reply)) {
        (Ok(q), Ok(r)) => r.is_answer(&q),
        _ => false,
    }
}

/// The error answer (`rcode`, e.g. SERVFAIL) to `query`, echoing its ID and
/// question; `None` when the query has not even a header to answer.
#[must_use]
pub fn error_reply(query: &[u8], rcode: domain::base::iana::Rcode) -> Option<Vec<u8>> {
    let msg = Message::from_octets(query).ok()?;
    Some(MessageBuilder::new_vec().start_error(&msg, rcode).finish())
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
