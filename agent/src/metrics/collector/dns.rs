//! The DNS proxy of name rules (crate::dns, docs/dns-names.md): lookups
//! by service and result, learnt addresses, evictions, added latency.
//! Nothing is reported while the proxy does not run (no service has had
//! name rules since the agent started).

use std::fmt;

use prometheus_client::{
    encoding::DescriptorEncoder,
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use super::{counters, gauges, one};
use crate::dns::serve::Observed;

pub fn encode(enc: &mut DescriptorEncoder, dns: &Observed) -> fmt::Result {
    counters(
        enc,
        "bulkhead_dns_lookups",
        "DNS queries the proxy of name rules handled, by the service it routed them to (empty: none known: refused, or dropped or ignored before routing) and result: answered (passed on, learnt from), truncated (a UDP answer with TC passed on, nothing learnt), refused (no service known for the client), servfail_timeout, servfail_error (the resolver did not answer in time / failed), servfail_stalled (the sweep of learnt addresses stalled: not forwarded, nothing learnt), formerr (not one question), ignored (no DNS header: no reply), dropped (over the in-flight limit).",
        dns.lookups.iter().map(|(service, outcome, n)| {
            ([("service", &**service), ("result", outcome.label())], *n)
        }),
    )?;
    gauges(
        enc,
        "bulkhead_dns_learnt_addresses",
        "Addresses a service's lookups taught and that are allowed now (entries of the kernel's LEARNT_V4 and LEARNT maps: one per service and address, whatever the names), by service with name rules.",
        None,
        dns.learnt
            .iter()
            .map(|(service, n)| ([("service", &**service)], *n)),
    )?;
    counters(
        enc,
        "bulkhead_dns_learnt_evictions",
        "Learnt addresses let go or kept out by a cap, by service (every service with name rules) and reason: per_name_cap (the oldest address of a name that held [dns] max_per_name, evicted for a new one: it is denied now), full ([dns] max_learnt held: the new address was not learnt, so it is denied; nothing is evicted for it), per_name_in_use (the name held [dns] max_per_name addresses of the family, all given by the same answer or by one in the last 2 s: the new address was not learnt and was left out of the answer, so no client is given it).",
        [
            ("per_name_cap", &dns.evicted_per_name),
            ("full", &dns.refused_full),
            ("per_name_in_use", &dns.left_out_per_name),
        ]
        .into_iter()
        .flat_map(|(reason, counts)| {
            counts
                .iter()
                .map(move |(service, n)| ([("service", &**service), ("reason", reason)], *n))
        }),
    )?;
    one(
        enc,
        "bulkhead_dns_learnt_expired",
        "Learnt addresses dropped by the sweep because their TTL (at least [dns] min_ttl_secs) ran out.",
        None,
        &ConstCounter::new(dns.expired),
    )?;
    one(
        enc,
        "bulkhead_dns_learn_errors",
        "Addresses not learnt because the kernel's LEARNT_V4 or LEARNT map refused the write (logged): denied.",
        None,
        &ConstCounter::new(dns.map_errors),
    )?;
    one(
        enc,
        "bulkhead_dns_sweep_age",
        "Seconds since the sweep of learnt addresses last completed with no expired address left in the kernel maps (it runs each second). The kernel allows a learnt address until the sweep removes it at its expiry, so a growing age means expired addresses stay allowed; past 10 s the proxy learns nothing (lookups get SERVFAIL) and withholds its heartbeat (logged), and 30 s later the kernel stops redirecting lookups: new names fail closed.",
        Some(&Unit::Seconds),
        &ConstGauge::new(dns.sweep_age_seconds),
    )?;
    one(
        enc,
        "bulkhead_dns_proxy_added",
        "Time each answered lookup spent in the DNS proxy, the resolver's own round trip (query sent, or TCP handshake started, to answer) not counted: what the proxy adds to a lookup.",
        Some(&Unit::Seconds),
        &dns.added_seconds,
    )
}
