//! Reading the fleet back: three queries (latest policy snapshot per
//! instance, listeners, flow sums) into a [`Fleet`]. The SQL keeps to what
//! ClickHouse 18.16 (Debian's) and current releases share; results come as
//! JSONEachRow, where old releases quote 64-bit integers.

use std::net::IpAddr;

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};

use super::model::{Fleet, Flow, Instance, Listener, Rule};

/// Rows stamped further in the future than this (seconds) are left out:
/// a clock far ahead, or a forged row, must not win `argMax` or make every
/// real listener look stale.
const FUTURE: u32 = 300;

/// The SQL of each query, for `database` (an identifier the config has
/// validated).
pub fn instances_sql(database: &str) -> String {
    format!(
        "SELECT service, host, argMax(mode, applied_at) AS mode, \
         argMax(file, applied_at) AS file, argMax(rules, applied_at) AS rules \
         FROM {database}.policies WHERE applied_at <= now() + {FUTURE} \
         GROUP BY service, host FORMAT JSONEachRow"
    )
}

pub fn listeners_sql(database: &str) -> String {
    format!(
        "SELECT host, service, addr, port, protocol, \
         toUInt32(min(first_seen)) AS first, toUInt32(max(last_seen)) AS last \
         FROM {database}.endpoints WHERE kind = 'listener' AND last_seen <= now() + {FUTURE} \
         GROUP BY host, service, addr, port, protocol FORMAT JSONEachRow"
    )
}

/// Per hour, so that a destination whose owner changed (an address that
/// moved between hosts) is resolved against the right one. The name is
/// the latest non-empty `dst_name` of the hour, as the host graph keeps
/// the latest a decision carried: a flow's calls after its name expired
/// stay under it. (A tuple in `argMax` is newer than 18.16: the key is a
/// number, named rows above the rest, then by time.)
pub fn flows_sql(database: &str) -> String {
    format!(
        "SELECT host, service, remote_addr, remote_port, protocol, \
         sumIf(calls, verdict = 'allow') AS allowed, \
         sumIf(calls, verdict = 'audit') AS audited, \
         sumIf(calls, verdict = 'deny') AS denied, \
         sum(bytes_sent) AS sent, sum(bytes_received) AS received, \
         toUInt32(min(first_seen)) AS first, toUInt32(max(last_seen)) AS last, \
         argMax(dst_name, toUInt64(dst_name != '') * 4294967296 + toUInt32(last_seen)) AS name, \
         argMax(rule, toUInt64(dst_name != '' AND verdict = 'allow') * 4294967296 \
         + toUInt32(last_seen)) AS name_rule \
         FROM {database}.flows WHERE direction = 'egress' AND last_seen <= now() + {FUTURE} \
         GROUP BY host, service, remote_addr, remote_port, protocol, toStartOfHour(first_seen) \
         FORMAT JSONEachRow"
    )
}

/// Every service instance any table names, with the mode of its latest
/// policy snapshot ('' without one) and when it was last seen: the latest
/// of its snapshots' `applied_at`, its flows' and its endpoints'
/// `last_seen`. Old releases want the same types on each side of
/// `UNION ALL`: hence the conversions.
pub fn services_sql(database: &str) -> String {
    format!(
        "SELECT service, host, max(mode) AS mode, max(seen) AS last \
         FROM (\
         SELECT service, host, argMax(mode, applied_at) AS mode, \
         toUInt32(max(applied_at)) AS seen FROM {database}.policies GROUP BY service, host \
         UNION ALL SELECT service, host, toString('') AS mode, \
         toUInt32(max(last_seen)) AS seen FROM {database}.flows GROUP BY service, host \
         UNION ALL SELECT service, host, toString('') AS mode, \
         toUInt32(max(last_seen)) AS seen FROM {database}.endpoints GROUP BY service, host\
         ) WHERE service != '' GROUP BY service, host ORDER BY service, host \
         FORMAT JSONEachRow"
    )
}

/// One service instance, as `fleet services` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceInstance {
    pub service: String,
    pub host: String,
    /// The latest policy snapshot's mode; None: no snapshot (a service
    /// seen only in flows or as a listener's owner).
    pub mode: Option<String>,
    /// Unix seconds.
    pub last_seen: u64,
}

#[derive(Deserialize)]
struct ServiceSeenRow {
    service: String,
    host: String,
    mode: String,
    #[serde(deserialize_with = "number")]
    last: u64,
}

/// Parses [`services_sql`]'s answer, sorted by service, then host.
///
/// # Errors
/// A row that is not one, named by its line.
pub fn parse_services(text: &str) -> Result<Vec<ServiceInstance>> {
    let mut out: Vec<ServiceInstance> = rows::<ServiceSeenRow>("services", text)?
        .into_iter()
        .map(|r| ServiceInstance {
            service: r.service,
            host: r.host,
            mode: (!r.mode.is_empty()).then_some(r.mode),
            last_seen: r.last,
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.host).cmp(&(&b.service, &b.host)));
    Ok(out)
}

/// A number as JSON gives it: a number, or a string (64-bit integers on
/// old releases).
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u64),
        Text(String),
    }
    match N::deserialize(d)? {
        N::Num(n) => Ok(n),
        N::Text(t) => t.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize)]
struct InstanceRow {
    service: String,
    host: String,
    mode: String,
    file: String,
    rules: String,
}

#[derive(Deserialize)]
struct ListenerRow {
    host: String,
    service: String,
    addr: IpAddr,
    #[serde(deserialize_with = "number")]
    port: u64,
    protocol: String,
    #[serde(deserialize_with = "number")]
    first: u64,
    #[serde(deserialize_with = "number")]
    last: u64,
}

#[derive(Deserialize)]
struct FlowRow {
    host: String,
    service: String,
    remote_addr: IpAddr,
    #[serde(deserialize_with = "number")]
    remote_port: u64,
    protocol: String,
    #[serde(deserialize_with = "number")]
    allowed: u64,
    #[serde(deserialize_with = "number")]
    audited: u64,
    #[serde(deserialize_with = "number")]
    denied: u64,
    #[serde(deserialize_with = "number")]
    sent: u64,
    #[serde(deserialize_with = "number")]
    received: u64,
    #[serde(deserialize_with = "number")]
    first: u64,
    #[serde(deserialize_with = "number")]
    last: u64,
    /// `dst_name`, "" when none.
    #[serde(default)]
    name: String,
    /// The rule of the latest allowed named call (see [`flows_sql`]).
    #[serde(default)]
    name_rule: String,
}

/// One JSON object per line; an error names the query and the line.
fn rows<T: DeserializeOwned>(what: &str, text: &str) -> Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("the {what} query's row {}: {l}", i + 1))
        })
        .collect()
}

fn port(what: &str, p: u64) -> Result<u16> {
    u16::try_from(p).with_context(|| format!("{what}: port {p} out of range"))
}

/// Parses the three queries' answers into the fleet.
pub fn parse(instances: &str, listeners: &str, flows: &str) -> Result<Fleet> {
    let instances = rows::<InstanceRow>("instances", instances)?
        .into_iter()
        .map(|r| {
            let rules: Vec<Rule> = serde_json::from_str(&r.rules).with_context(|| {
                format!("the policy snapshot of {}@{}: its rules", r.service, r.host)
            })?;
            Ok(Instance {
                service: r.service,
                host: r.host,
                mode: r.mode,
                file: r.file,
                rules,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let listeners = rows::<ListenerRow>("listeners", listeners)?
        .into_iter()
        .map(|r| {
            Ok(Listener {
                port: port("listeners", r.port)?,
                host: r.host,
                service: r.service,
                addr: r.addr,
                protocol: r.protocol,
                first_seen: r.first,
                last_seen: r.last,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let flows = rows::<FlowRow>("flows", flows)?
        .into_iter()
        .map(|r| {
            Ok(Flow {
                remote_port: port("flows", r.remote_port)?,
                host: r.host,
                service: r.service,
                remote_addr: r.remote_addr,
                protocol: r.protocol,
                allowed: r.allowed,
                audited: r.audited,
                denied: r.denied,
                bytes_sent: r.sent,
                bytes_received: r.received,
                first_seen: r.first,
                last_seen: r.last,
                dst_name: r.name,
                name_rule: r.name_rule,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Fleet::new(instances, listeners, flows))
}

/// Runs the three queries with `query` (SQL in, response body out).
pub fn load(database: &str, mut query: impl FnMut(&str) -> Result<String>) -> Result<Fleet> {
    let instances = query(&instances_sql(database)).context("read the policy snapshots")?;
    let listeners = query(&listeners_sql(database)).context("read the listeners")?;
    let flows = query(&flows_sql(database)).context("read the flows")?;
    parse(&instances, &listeners, &flows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_as_old_and_new_releases_print_them() {
        let instances = r#"{"service":"web","host":"h1","mode":"enforce","file":"/etc/bulkhead/policies/web.toml","rules":"[{\"rule\":\"web.toml#egress[0]\",\"to\":[\"198.51.100.0/24\"],\"ports\":[[8080,8080]],\"protocol\":\"tcp\"}]"}"#;
        let listeners = r#"{"host":"h2","service":"api","addr":"198.51.100.20","port":8080,"protocol":"tcp","first":1000,"last":"9000"}"#;
        let flows = r#"{"host":"h1","service":"web","remote_addr":"198.51.100.20","remote_port":8080,"protocol":"tcp","allowed":"7","audited":"0","denied":"1","sent":"10","received":"20","first":2000,"last":2010}"#;
        let fleet = parse(instances, listeners, flows).expect("valid rows");
        let b = fleet.blast_radius("web").expect("web");
        assert_eq!(b.reached[0].to, "api@h2");
        assert_eq!((b.reached[0].calls, b.reached[0].denied), (7, 1));
        assert_eq!(b.allows[0].services, ["api@h2"]);
    }

    #[test]
    fn the_flows_name_is_read_and_rows_without_one_have_none() {
        assert!(
            flows_sql("bulkhead").contains(
                "argMax(dst_name, toUInt64(dst_name != '') * 4294967296 + toUInt32(last_seen)) AS name"
            ),
            "{}",
            flows_sql("bulkhead")
        );
        let instances = r#"{"service":"web","host":"h1","mode":"enforce","file":"f","rules":"[{\"rule\":\"web.toml#egress[0]\",\"to\":[],\"names\":[\"api.example.test\"],\"ports\":[[443,443]],\"protocol\":\"tcp\"}]"}"#;
        let flows = "{\"host\":\"h1\",\"service\":\"web\",\"remote_addr\":\"203.0.113.5\",\"remote_port\":443,\"protocol\":\"tcp\",\"allowed\":\"2\",\"audited\":\"0\",\"denied\":\"0\",\"sent\":\"0\",\"received\":\"0\",\"first\":2000,\"last\":2010,\"name\":\"api.example.test\"}\n\
                     {\"host\":\"h1\",\"service\":\"web\",\"remote_addr\":\"203.0.113.9\",\"remote_port\":443,\"protocol\":\"tcp\",\"allowed\":\"1\",\"audited\":\"0\",\"denied\":\"0\",\"sent\":\"0\",\"received\":\"0\",\"first\":2000,\"last\":2010}\n";
        let fleet = parse(instances, "", flows).expect("valid rows");
        let b = fleet.blast_radius("web").expect("web");
        let to: Vec<&str> = b.reached.iter().map(|r| r.to.as_str()).collect();
        assert_eq!(to, ["203.0.113.9:443/tcp", "api.example.test:443/tcp"]);
        assert_eq!(b.reached[1].rule.as_deref(), Some("web.toml#egress[0]"));
        assert_eq!(b.reached[0].rule, None);
    }

    /// Allowed through a CNAME: web asked for www.example.test, whose
    /// answer led to a name its rule allows. The row's `name_rule` (the
    /// agent's decision) credits the destination to that rule.
    #[test]
    fn a_flow_allowed_through_a_cname_is_credited_to_the_rule_its_decisions_name() {
        assert!(
            flows_sql("bulkhead").contains("AS name_rule"),
            "{}",
            flows_sql("bulkhead")
        );
        let instances = r#"{"service":"web","host":"h1","mode":"enforce","file":"f","rules":"[{\"rule\":\"web.toml#egress[0]\",\"to\":[],\"names\":[\"*.cdn.example.test\"],\"ports\":[[443,443]],\"protocol\":\"tcp\"}]"}"#;
        let flows = "{\"host\":\"h1\",\"service\":\"web\",\"remote_addr\":\"203.0.113.5\",\"remote_port\":443,\"protocol\":\"tcp\",\"allowed\":\"2\",\"audited\":\"0\",\"denied\":\"0\",\"sent\":\"0\",\"received\":\"0\",\"first\":2000,\"last\":2010,\"name\":\"www.example.test\",\"name_rule\":\"web.toml#egress[0]\"}\n";
        let fleet = parse(instances, "", flows).expect("valid rows");
        let b = fleet.blast_radius("web").expect("web");
        assert_eq!(b.reached[0].to, "www.example.test:443/tcp");
        assert_eq!(b.reached[0].rule.as_deref(), Some("web.toml#egress[0]"));
        let used: Vec<(&str, bool)> = b.allows.iter().map(|a| (a.to.as_str(), a.used)).collect();
        assert_eq!(used, [("*.cdn.example.test", true)]);
    }

    #[test]
    fn services_without_a_snapshot_have_no_mode() {
        let text = "{\"service\":\"web\",\"host\":\"h1\",\"mode\":\"enforce\",\"last\":\"2000\"}\n\
                    {\"service\":\"api\",\"host\":\"h2\",\"mode\":\"\",\"last\":1000}\n";
        let services = parse_services(text).expect("valid rows");
        assert_eq!(
            services,
            [
                ServiceInstance {
                    service: "api".to_string(),
                    host: "h2".to_string(),
                    mode: None,
                    last_seen: 1000
                },
                ServiceInstance {
                    service: "web".to_string(),
                    host: "h1".to_string(),
                    mode: Some("enforce".to_string()),
                    last_seen: 2000
                }
            ]
        );
    }

    #[test]
    fn a_bad_row_names_the_query_and_the_row() {
        let Err(err) = parse("", "{\"host\":\"h2\"}\n", "") else {
            panic!("an incomplete row was accepted");
        };
        assert!(
            format!("{err:#}").contains("the listeners query's row 1"),
            "{err:#}"
        );
        let Err(err) = parse(
            r#"{"service":"web","host":"h1","mode":"enforce","file":"f","rules":"nope"}"#,
            "",
            "",
        ) else {
            panic!("bad rules were accepted");
        };
        assert!(
            format!("{err:#}").contains("policy snapshot of web@h1"),
            "{err:#}"
        );
    }
}
