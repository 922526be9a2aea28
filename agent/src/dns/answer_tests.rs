//! Queries and answers built with the `domain` crate's composer (the
//! integration suite, tests/dns_proxy.rs, feeds a real server's bytes).

use std::{net::Ipv4Addr, str::FromStr};

use domain::{
    base::{iana::Rcode, Message, MessageBuilder, Name, Rtype},
    rdata::{Aaaa, Cname, A},
};

use super::*;

fn name(text: &str) -> Name<Vec<u8>> {
    Name::from_str(text).unwrap_or_else(|e| panic!("test bug: {text}: {e}"))
}

fn dns(text: &str) -> DnsName {
    DnsName(
        text.trim_end_matches('.')
            .split('.')
            .map(|l| l.as_bytes().to_vec().into_boxed_slice())
            .collect(),
    )
}

fn query(id: u16, qname: &str, qtype: Rtype) -> Vec<u8> {
    let mut b = MessageBuilder::new_vec();
    b.header_mut().set_id(id);
    b.header_mut().set_rd(true);
    let mut q = b.question();
    q.push((name(qname), qtype)).expect("push question");
    q.finish()
}

/// An answer to `query` with `records` (owner, ttl, data) in the answer
/// section.
enum Rec {
    A(&'static str, u32, [u8; 4]),
    Aaaa(&'static str, u32, &'static str),
    Cname(&'static str, u32, &'static str),
}

fn answer(query: &[u8], records: &[Rec], truncated: bool) -> Vec<u8> {
    let q = Message::from_octets(query).expect("query parses");
    let mut a = MessageBuilder::new_vec()
        .start_answer(&q, Rcode::NOERROR)
        .expect("start answer");
    a.header_mut().set_tc(truncated);
    for r in records {
        match r {
            Rec::A(owner, ttl, ip) => a.push((name(owner), *ttl, A::new(Ipv4Addr::from(*ip)))),
            Rec::Aaaa(owner, ttl, ip) => a.push((
                name(owner),
                *ttl,
                Aaaa::new(ip.parse().expect("test bug: IPv6")),
            )),
            Rec::Cname(owner, ttl, target) => a.push((name(owner), *ttl, Cname::new(name(target)))),
        }
        .expect("push record");
    }
    a.finish()
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test bug: address")
}

#[test]
fn a_query_gives_its_id_lower_cased_name_and_type() {
    let q = query(0x1234, "API.Example.com.", Rtype::AAAA);
    let parsed = parse_query(&q).expect("query parses");
    assert_eq!(parsed.id, 0x1234);
    assert_eq!(parsed.name, dns("api.example.com"));
    assert_eq!(parsed.name.to_string(), "api.example.com");
    assert_eq!(parsed.qtype, Rtype::AAAA.to_int());
}

#[test]
fn what_is_not_a_single_question_query_is_refused() {
    assert_eq!(parse_query(&[0; 5]), Err(AnswerError::Short(5)));
    let q = query(1, "a.example.com", Rtype::A);
    let a = answer(&q, &[], false);
    assert_eq!(parse_query(&a), Err(AnswerError::NotAQuery(0)));
    let mut none = MessageBuilder::new_vec();
    none.header_mut().set_id(3);
    assert_eq!(
        parse_query(&none.finish()),
        Err(AnswerError::QuestionCount(0))
    );
    // A header promising a question that is not there.
    let mut cut = q.clone();
    cut.truncate(14);
    assert!(matches!(parse_query(&cut), Err(AnswerError::Malformed(_))));
}

#[test]
fn addresses_for_the_question_are_read_with_their_ttls() {
    let q = query(7, "api.example.com", Rtype::A);
    let a = answer(
        &q,
        &[
            Rec::A("api.example.com", 30, [198, 51, 100, 1]),
            Rec::A("API.EXAMPLE.COM", 5, [198, 51, 100, 2]),
            Rec::Aaaa("api.example.com", 60, "2001:db8::1"),
        ],
        false,
    );
    let got = inspect(&q, &a).expect("inspect");
    assert_eq!(got.rcode, 0);
    assert!(!got.truncated);
    assert_eq!(got.off_chain, 0);
    let want = vec![
        AnswerAddress {
            addr: ip("198.51.100.1"),
            ttl: 30,
            chain: vec![dns("api.example.com")],
        },
        AnswerAddress {
            addr: ip("198.51.100.2"),
            ttl: 5,
            chain: vec![dns("api.example.com")],
        },
        AnswerAddress {
            addr: ip("2001:db8::1"),
            ttl: 60,
            chain: vec![dns("api.example.com")],
        },
    ];
    assert_eq!(got.addresses, want);
}

#[test]
fn a_cname_chain_is_followed_and_its_smallest_ttl_kept() {
    let q = query(8, "www.example.com", Rtype::A);
    // Out of order on purpose: the chain is followed by name, not position.
    let a = answer(
        &q,
        &[
            Rec::A("edge.cdn.example.net", 300, [203, 0, 113, 9]),
            Rec::Cname("lb.example.com", 20, "edge.cdn.example.net"),
            Rec::Cname("www.example.com", 3600, "lb.example.com"),
        ],
        false,
    );
    let got = inspect(&q, &a).expect("inspect");
    assert_eq!(
        got.addresses,
        vec![AnswerAddress {
            addr: ip("203.0.113.9"),
            ttl: 20,
            chain: vec![
                dns("www.example.com"),
                dns("lb.example.com"),
                dns("edge.cdn.example.net")
            ],
        }]
    );
}

#[test]
fn records_off_the_questions_chain_teach_nothing() {
    let q = query(9, "x.evil.example", Rtype::A);
    let a = answer(
        &q,
        &[
            Rec::A("x.evil.example", 60, [198, 51, 100, 66]),
            Rec::A("api.example.com", 60, [198, 51, 100, 67]),
            Rec::Cname("other.example.com", 60, "x.evil.example"),
        ],
        false,
    );
    let got = inspect(&q, &a).expect("inspect");
    assert_eq!(got.addresses.len(), 1);
    assert_eq!(got.addresses[0].addr, ip("198.51.100.66"));
    assert_eq!(got.off_chain, 2);
}

#[test]
fn a_cname_loop_or_an_overlong_chain_is_refused() {
    let q = query(10, "a.example.com", Rtype::A);
    let a = answer(
        &q,
        &[
            Rec::Cname("a.example.com", 60, "b.example.com"),
            Rec::Cname("b.example.com", 60, "a.example.com"),
        ],
        false,
    );
    assert_eq!(inspect(&q, &a), Err(AnswerError::ChainTooLong));

    let names: Vec<&'static str> = (0..=MAX_CHAIN + 1)
        .map(|i| &*Box::leak(format!("n{i}.example.com").into_boxed_str()))
        .collect();
    let q = query(11, names[0], Rtype::A);
    let mut chain: Vec<Rec> = names
        .windows(2)
        .map(|w| Rec::Cname(w[0], 60, w[1]))
        .collect();
    chain.push(Rec::A(names[MAX_CHAIN + 1], 60, [198, 51, 100, 5]));
    assert_eq!(
        inspect(&q, &answer(&q, &chain, false)),
        Err(AnswerError::ChainTooLong)
    );
    // Exactly MAX_CHAIN CNAMEs is accepted.
    let mut chain: Vec<Rec> = names[..=MAX_CHAIN]
        .windows(2)
        .map(|w| Rec::Cname(w[0], 60, w[1]))
        .collect();
    chain.push(Rec::A(names[MAX_CHAIN], 60, [198, 51, 100, 5]));
    let got = inspect(&q, &answer(&q, &chain, false)).expect("inspect");
    assert_eq!(got.addresses[0].chain.len(), MAX_CHAIN + 1);
}

#[test]
fn an_answer_to_another_query_is_refused() {
    let q = query(12, "api.example.com", Rtype::A);
    let other_id = answer(&query(13, "api.example.com", Rtype::A), &[], false);
    assert_eq!(inspect(&q, &other_id), Err(AnswerError::NotTheAnswer));
    let other_name = answer(&query(12, "www.example.com", Rtype::A), &[], false);
    assert_eq!(inspect(&q, &other_name), Err(AnswerError::NotTheAnswer));
    let other_type = answer(&query(12, "api.example.com", Rtype::AAAA), &[], false);
    assert_eq!(inspect(&q, &other_type), Err(AnswerError::NotTheAnswer));
    // The query itself is not an answer (QR clear).
    assert_eq!(inspect(&q, &q), Err(AnswerError::NotTheAnswer));
}

#[test]
fn the_truncation_flag_is_reported() {
    let q = query(14, "big.example.com", Rtype::A);
    let a = answer(
        &q,
        &[Rec::A("big.example.com", 60, [198, 51, 100, 1])],
        true,
    );
    assert!(inspect(&q, &a).expect("inspect").truncated);
}

#[test]
fn an_error_reply_echoes_id_and_question() {
    let q = query(0xbeef, "api.example.com", Rtype::A);
    let reply = error_reply(&q, Rcode::SERVFAIL).expect("reply");
    let got = inspect(&q, &reply).expect("it answers the query");
    assert_eq!(got.rcode, Rcode::SERVFAIL.to_int());
    assert!(got.addresses.is_empty());
    assert_eq!(error_reply(&[1, 2, 3], Rcode::FORMERR), None);
}

#[test]
fn names_are_written_with_escapes_for_odd_bytes() {
    let n = DnsName(vec![
        b"a.b".to_vec().into_boxed_slice(),
        b"example".to_vec().into_boxed_slice(),
    ]);
    assert_eq!(n.to_string(), "a\\046b.example");
    assert_eq!(DnsName(Vec::new()).to_string(), ".");
}

/// An answer with a CNAME, addresses of both kinds, an authority record
/// and an EDNS OPT record in the additional section.
fn rich_answer(query: &[u8], a_count: u8) -> Vec<u8> {
    use domain::rdata::Ns;
    let q = Message::from_octets(query).expect("query parses");
    let mut a = MessageBuilder::new_vec()
        .start_answer(&q, Rcode::NOERROR)
        .expect("start answer");
    a.header_mut().set_ra(true);
    a.header_mut().set_ad(true);
    a.push((
        name("www.example.com"),
        30,
        Cname::new(name("cdn.example.net")),
    ))
    .expect("cname");
    for i in 0..a_count {
        a.push((
            name("cdn.example.net"),
            40,
            A::new(Ipv4Addr::new(198, 51, 100, i)),
        ))
        .expect("a");
    }
    a.push((
        name("cdn.example.net"),
        40,
        Aaaa::new("2001:db8::1".parse().expect("v6")),
    ))
    .expect("aaaa");
    let mut auth = a.authority();
    auth.push((name("example.net"), 300, Ns::new(name("ns.example.net"))))
        .expect("ns");
    let mut add = auth.additional();
    add.opt(|opt| {
        opt.set_udp_payload_size(1232);
        Ok(())
    })
    .expect("opt");
    add.finish()
}

#[test]
fn trimming_takes_out_exactly_the_addresses_asked_and_keeps_the_rest_of_the_message() {
    let q = query(0x4242, "www.example.com", Rtype::A);
    let reply = rich_answer(&q, 10);
    let drop = |owner: &DnsName, addr: IpAddr| {
        *owner == dns("cdn.example.net") && matches!(addr, IpAddr::V4(v4) if v4.octets()[3] < 7)
    };
    let trimmed = without_addresses(&reply, drop).expect("trims");

    let before = Message::from_octets(reply.as_slice()).expect("parses");
    let after = Message::from_octets(trimmed.as_slice()).expect("the trimmed answer parses");
    assert_eq!(after.header(), before.header(), "ID, flags and rcode kept");
    assert!(after.is_answer(&Message::from_octets(q.as_slice()).expect("q")));
    let counts = after.header_counts();
    assert_eq!(counts.qdcount(), 1);
    // CNAME + 3 A (198.51.100.7, .8, .9) + AAAA.
    assert_eq!(counts.ancount(), 5);
    assert_eq!(counts.nscount(), 1);
    assert_eq!(counts.arcount(), 1, "the OPT record stays");
    assert!(after.opt().is_some_and(|o| o.udp_payload_size() == 1232));

    let read = inspect(&q, &trimmed).expect("the trimmed answer reads");
    let addrs: Vec<IpAddr> = read.addresses.iter().map(|a| a.addr).collect();
    assert_eq!(
        addrs,
        [
            ip("198.51.100.7"),
            ip("198.51.100.8"),
            ip("198.51.100.9"),
            ip("2001:db8::1")
        ]
    );
    assert!(read
        .addresses
        .iter()
        .all(|a| a.chain == [dns("www.example.com"), dns("cdn.example.net")] && a.ttl == 30));
    assert!(
        trimmed.len() < reply.len(),
        "names compressed again: {} bytes, was {}",
        trimmed.len(),
        reply.len()
    );
}

#[test]
fn trimming_nothing_gives_the_same_records() {
    let q = query(7, "www.example.com", Rtype::A);
    let reply = rich_answer(&q, 3);
    let same = without_addresses(&reply, |_, _| false).expect("rewrites");
    assert_eq!(
        inspect(&q, &same).expect("reads"),
        inspect(&q, &reply).expect("reads")
    );
    assert_eq!(
        Message::from_octets(same.as_slice())
            .expect("parses")
            .header_counts()
            .ancount(),
        5
    );
}

#[test]
fn trimming_garbage_is_an_error_not_a_panic() {
    assert!(without_addresses(&[0; 5], |_, _| true).is_err());
    let q = query(9, "www.example.com", Rtype::A);
    let mut reply = rich_answer(&q, 3);
    reply.truncate(reply.len() - 5);
    assert!(without_addresses(&reply, |_, _| true).is_err());
}
