//! `fleet blast-radius` at the scale: 10,000 service instances
//! (`s0`..`s9999` on 100 hosts, a policy snapshot and a listener each) and
//! 100,000 flow rows, made server-side with `INSERT ... SELECT ... FROM
//! numbers(N)` (SQL that ClickHouse 18.16.1 runs), then the release
//! binary's `fleet blast-radius` and `fleet graph` timed end to end.
//!
//! Instance `s{i}` may reach `s{2i+1}` and `s{2i+2}` on port 8080, so `s0`
//! reaches all 9,999 others, 13 hops deep; each instance has 10 flow rows
//! to the next instances in turn (99,991 distinct edges).

use std::{
    fs,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use super::{median, server::Server};
use crate::util::secs;

pub const INSTANCES: u64 = 10_000;
pub const HOSTS: u64 = 100;
pub const FLOWS_EACH: u64 = 10;
/// The database of the scale fleet (the ingest measurement uses the
/// default one).
const DATABASE: &str = "bench_scale";
/// The commands timed, as `bulkhead fleet` arguments.
pub const COMMANDS: [&[&str]; 3] = [
    &["blast-radius", "s0", "--json"],
    &["blast-radius", "s0"],
    &["graph", "--format", "dot"],
];

pub struct Blast {
    /// Seconds to make the 120,000 rows server-side.
    pub insert_s: f64,
    /// Per command of [`COMMANDS`]: every round's seconds, sorted.
    pub times: Vec<Vec<f64>>,
    pub lateral_size: u64,
    pub graph_edges: usize,
}

impl Blast {
    pub fn median(&self, command: usize) -> f64 {
        median(&self.times[command])
    }
}

pub fn measure(server: &Server, bin: &Path, work: &Path, rounds: usize) -> Result<Blast> {
    let config = work.join("scale.toml");
    fs::write(&config, format!("[fleet]\ndatabase = \"{DATABASE}\"\n"))
        .with_context(|| format!("write {}", config.display()))?;
    server.fleet(bin, &config, &["init"])?;
    let now = now()?;
    let started = Instant::now();
    for sql in inserts(now) {
        server.query(&sql)?;
    }
    let insert_s = secs(started);
    let flows = server.number(&format!("SELECT count() FROM {DATABASE}.flows"))?;
    ensure!(
        flows == INSTANCES * FLOWS_EACH,
        "the scale fleet has {flows} flow rows, not {}",
        INSTANCES * FLOWS_EACH
    );
    eprintln!("xtask bench-fleet: made the scale fleet in {insert_s:.2} s");

    let mut times = vec![Vec::new(); COMMANDS.len()];
    let (mut lateral_size, mut graph_edges) = (0, 0);
    for round in 0..rounds {
        for (k, args) in COMMANDS.iter().enumerate() {
            let started = Instant::now();
            let out = server.fleet(bin, &config, args)?;
            let took = started.elapsed();
            times[k].push(took.as_secs_f64());
            let text = String::from_utf8_lossy(&out.stdout);
            if args.contains(&"--json") {
                lateral_size = lateral(&text)?;
                ensure!(
                    lateral_size == INSTANCES - 1,
                    "blast-radius s0 --json: lateral size {lateral_size}, not {}",
                    INSTANCES - 1
                );
            }
            if args[0] == "graph" {
                graph_edges = text.lines().filter(|l| l.contains(" -> ")).count();
            }
            eprintln!(
                "xtask bench-fleet: round {}: `bulkhead fleet {}` {}",
                round + 1,
                args.join(" "),
                fmt_s(took)
            );
        }
    }
    for t in &mut times {
        t.sort_by(f64::total_cmp);
    }
    Ok(Blast {
        insert_s,
        times,
        lateral_size,
        graph_edges,
    })
}

fn fmt_s(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// `lateral.size` of a `blast-radius --json` answer.
fn lateral(json: &str) -> Result<u64> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("blast-radius --json printed invalid JSON")?;
    v.get("lateral")
        .and_then(|l| l.get("size"))
        .and_then(serde_json::Value::as_u64)
        .context("blast-radius --json: no lateral.size")
}

fn now() -> Result<u32> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_secs();
    u32::try_from(secs).context("the clock is past 2106")
}

/// SQL: the address of instance `t` (198.18.0.0/15, 250 a /24).
fn addr(t: &str) -> String {
    format!("concat('198.18.', toString(intDiv({t}, 250)), '.', toString({t} % 250 + 1))")
}

/// The three inserts: policy snapshots applied 10 minutes before `now`,
/// listeners seen until 30 s before, flows until a minute before.
fn inserts(now: u32) -> [String; 3] {
    let (n, hosts, each) = (INSTANCES, HOSTS, FLOWS_EACH);
    let who = |i: &str| {
        format!(
            "concat('h', toString({i} % {hosts})), concat('host', toString({i} % {hosts})), \
             concat('s', toString({i}))"
        )
    };
    let at = |back: u32| format!("toDateTime({})", now - back);
    let day = |back: u32| format!("toDate(toDateTime({}))", now - back);
    // Each allowed target as a rule of the policy snapshot's JSON (the
    // shape `rules` has, docs/fleet.md "What each agent sends").
    let rule = format!(
        "concat('{{\"rule\":\"s', toString(number), '.toml#egress[', toString(k), ']\",\"to\":[\"', \
         {}, '/32\"],\"ports\":[[8080,8080]],\"protocol\":\"tcp\",\"description\":null}}')",
        addr("(2 * number + 1 + k)")
    );
    let policies = format!(
        "INSERT INTO {DATABASE}.policies (host, host_id, service, mode, file, file_sha256, rules, \
         applied_at, date, batch_id, row) \
         SELECT {}, 'enforce', concat('/etc/bulkhead/policies/s', toString(number), '.toml'), \
         '{}', concat('[', arrayStringConcat(arrayMap(k -> {rule}, \
         arrayFilter(k -> 2 * number + 1 + k < {n}, [0, 1])), ','), ']'), \
         {}, {}, 'scale-policies', toUInt32(number) FROM numbers({n})",
        who("number"),
        "0".repeat(64),
        at(600),
        day(600),
    );
    let endpoints = format!(
        "INSERT INTO {DATABASE}.endpoints (host, host_id, service, kind, protocol, addr, port, \
         first_seen, last_seen, date, batch_id, row) \
         SELECT {}, 'listener', 'tcp', {}, toUInt16(8080), {}, {}, {}, 'scale-endpoints', \
         toUInt32(number) FROM numbers({n})",
        who("number"),
        addr("number"),
        at(3600),
        at(30),
        day(30),
    );
    // Row j is instance i = j / 10's call to instance j + 1 (the one after
    // when that is i itself), modulo n.
    let flows = format!(
        "INSERT INTO {DATABASE}.flows (host, host_id, service, direction, protocol, local_addr, \
         local_port, remote_addr, remote_port, verdict, rule, calls, bytes_sent, bytes_received, \
         first_seen, last_seen, date, batch_id, row) \
         SELECT {}, 'egress', 'tcp', '198.51.100.99', toUInt16(40000), {}, toUInt16(8080), \
         'allow', concat('s', toString(i), '.toml#egress[0]'), toUInt64(1), toUInt64(100), \
         toUInt64(1000), {}, {}, {}, 'scale-flows', toUInt32(j) \
         FROM (SELECT number AS j, intDiv(number, {each}) AS i, \
         if((number + 1) % {n} = intDiv(number, {each}), (number + 2) % {n}, (number + 1) % {n}) AS t \
         FROM numbers({}))",
        who("i"),
        addr("t"),
        at(300),
        at(60),
        day(60),
        n * each,
    );
    [policies, endpoints, flows]
}
