//! The fleet bench's section of BENCHMARKS.md and the sizing table of
//! docs/fleet.md, each between markers of its own, so that the rest of
//! either file stays as it is (and `cargo xtask bench`, which rewrites
//! BENCHMARKS.md, keeps this section: see [`section`]).

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{ensure, Context, Result};

use super::{
    blast::{self, Blast},
    export_cpu::{self, ExportCpu},
    ingest::{self, Ingest},
    storage::{self, Storage},
};
use crate::bench::report::Facts as Machine;

/// The goals.
const INGEST_GOAL_ROWS: u64 = 1_000_000;
const INGEST_GOAL_S: f64 = 60.0;
const BLAST_GOAL_S: f64 = 2.0;
const CPU_GOAL: f64 = 0.02;

pub struct Facts {
    pub machine: Machine,
    pub version: String,
    pub blast: Blast,
    pub ingest: Ingest,
    pub storage: Storage,
    pub cpu: ExportCpu,
    pub took_s: f64,
}

/// `1234567` as `1,234,567`.
fn n(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate or count with a fraction, rounded, as [`n`] writes it.
fn nf(v: f64) -> String {
    if v.is_finite() && v >= 0.0 {
        n(v.round() as u64)
    } else {
        format!("{v}")
    }
}

fn yes(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// Seconds the ingest would take for the goal's 1,000,000 rows at the
/// measured rate.
fn ingest_goal_s(i: &Ingest) -> f64 {
    INGEST_GOAL_ROWS as f64 / i.rate().max(1e-9)
}

fn ingest_met(i: &Ingest) -> bool {
    i.rows >= INGEST_GOAL_ROWS && i.stored == i.rows && i.lost == 0 && i.seconds <= INGEST_GOAL_S
}

fn blast_worst(b: &Blast) -> f64 {
    b.median(0).max(b.median(1))
}

pub fn benchmarks(f: &Facts) -> String {
    let (b, i, s, c, m) = (&f.blast, &f.ingest, &f.storage, &f.cpu, &f.machine);
    let mut out = String::new();
    let _ = write!(
        out,
        "## Fleet mode at scale\n\n\
         Reproduce: `cargo xtask bench-fleet` (as root, nothing else loading BPF programs; writes this section and the \
         sizing table of docs/fleet.md; `--help` lists the knobs). Run {date}, commit {commit}; kernel {kernel}, \
         {cores} × {cpu}, {mem} RAM (a shared VM, whose other work shows in the figures: load average before \
         the run {load}, after {load_after}); ClickHouse {ver} \
         (Debian's package) on loopback, started by the integration harness (tests/src/clickhouse.rs) with its \
         own config and data; the release build of bulkhead. The whole bench took {took:.0} s.\n\n\
         | goal (issue #18, \"Scale\") | measured | |\n|---|---|---|\n\
         | ingest 1,000,000 flow rows from three agents in at most 60 s | {rows} rows in {secs:.2} s ({rate} rows/s) | {im} |\n\
         | `fleet blast-radius` over 10,000 instances and 100,000 edges in at most 2 s | {bj:.3} s (`--json`), {bt:.3} s (text), medians | {bm} |\n\
         | the agent's export CPU at 1,000 flows/s at most 2% of one core | +{ce:.2}% (the whole agent with fleet mode on less off, medians) | {cm} |\n\n",
        date = m.date,
        commit = m.commit,
        kernel = m.kernel,
        cores = m.cores,
        cpu = m.cpu,
        mem = m.memory,
        load = m.load_before,
        load_after = m.load_after,
        ver = f.version,
        took = f.took_s,
        rows = n(i.stored),
        secs = i.seconds,
        rate = nf(i.rate()),
        im = yes(ingest_met(i)),
        bj = b.median(0),
        bt = b.median(1),
        bm = yes(blast_worst(b) <= BLAST_GOAL_S),
        ce = c.export_cost() * 100.0,
        cm = yes(c.export_cost() <= CPU_GOAL),
    );

    let _ = write!(
        out,
        "### `fleet blast-radius` at 10,000 instances\n\n\
         {n} instances `s0`..`s9999` on {hosts} hosts, each with a policy snapshot and a listener, and \
         {flows} flow rows ({each} per instance), made server-side with `INSERT ... SELECT ... FROM numbers(N)` \
         in {ins:.2} s; `s{{i}}` may reach `s{{2i+1}}` and `s{{2i+2}}` on port 8080, so `s0`'s lateral reach is \
         every other instance (checked: `lateral.size` = {size}). Each command runs the release binary end to end \
         (connect, three queries reading the tables whole, parse, compute, print), {r} round(s):\n\n\
         | command | median | fastest | slowest |\n|---|---:|---:|---:|\n",
        n = n(blast::INSTANCES),
        hosts = blast::HOSTS,
        flows = n(blast::INSTANCES * blast::FLOWS_EACH),
        each = blast::FLOWS_EACH,
        ins = b.insert_s,
        size = n(b.lateral_size),
        r = b.times[0].len(),
    );
    for (k, args) in blast::COMMANDS.iter().enumerate() {
        let t = &b.times[k];
        let _ = writeln!(
            out,
            "| `bulkhead fleet {}` | {:.3} s | {:.3} s | {:.3} s |",
            args.join(" "),
            b.median(k),
            t.first().copied().unwrap_or(f64::NAN),
            t.last().copied().unwrap_or(f64::NAN),
        );
    }
    let _ = write!(
        out,
        "\n(`fleet graph --format dot` drew {} edges.)\n\n",
        n(b.graph_edges as u64)
    );

    let _ = write!(
        out,
        "### Ingest: three agents draining a backlog\n\n\
         Three agents (`bulkhead run`, hosts {hosts}, each with its own pins, state, metrics port and one \
         service cgroup) export to a ClickHouse that is stopped: each service makes {each} UDP connect()s to \
         allowed loopback destinations at {rate}/s, a new destination per call, so each call is one `flows` row \
         (`[flows] interval_secs = 1`, `[fleet] batch_interval_secs = {bi}`, `queue_rows = {qr}`, \
         `spool_bytes` raised to {sb} MiB so that the backlog fits). The services took {fill:.1} s. When no \
         agent's queue changed for 3 s, the backlog was {q} rows in memory and {sbytes:.1} MiB in {sf} spool \
         files. Then ClickHouse starts again and the bench times from its first answer to `SELECT count() FROM \
         bulkhead.flows` reaching the rows queued (polled every 100 ms): each agent retries every batch interval, \
         then sends its spool oldest first, one batch (at most 10,000 rows) at a time: the batch whose attempt \
         failed through the retry path (`insert_once`), the others whole.\n\n\
         - **{stored} of {made} rows stored in {secs:.2} s: {rr} rows/s** ({g:.1} s for 1,000,000 at that rate); \
         lost or dropped per the agents' `bulkhead_fleet_rows_total`: {lost}.\n\n",
        hosts = ingest::HOSTS.join(", "),
        each = n(i.rows / ingest::HOSTS.len() as u64),
        rate = n(ingest::RATE),
        bi = ingest::BATCH_INTERVAL_SECS,
        qr = ingest::QUEUE_ROWS,
        sb = ingest::SPOOL_BYTES >> 20,
        fill = i.fill_s,
        q = n(i.queued_rows),
        sbytes = i.spool_bytes as f64 / (1u64 << 20) as f64,
        sf = i.spool_files,
        stored = n(i.stored),
        made = n(i.rows),
        secs = i.seconds,
        rr = nf(i.rate()),
        g = ingest_goal_s(i),
        lost = i.lost,
    );

    let _ = write!(
        out,
        "### Storage\n\n\
         `system.parts` of `bulkhead.flows` (active parts) after the ingest: {rows} rows, {ib:.1} MiB in {ip} \
         parts as inserted ({ibr:.1} bytes a row), **{mb:.1} MiB after `OPTIMIZE TABLE ... FINAL` merged them: \
         {bpr:.1} bytes a row**. Every row here has a destination of its own, spread at random over 4 million \
         addresses and 1,024 ports (the columns that vary most), while `calls` is 1 and the byte counts 0 \
         in every row (UDP); a real fleet repeats its peers every batch and varies the counts, so take it as \
         a reference for sizing (docs/fleet.md, \"Scale\"), not a bound.\n\n",
        rows = n(s.rows),
        ib = s.inserted_bytes as f64 / (1u64 << 20) as f64,
        ip = s.inserted_parts,
        ibr = s.inserted_bytes_per_row(),
        mb = s.merged_bytes as f64 / (1u64 << 20) as f64,
        bpr = s.bytes_per_row(),
    );

    let _ = write!(
        out,
        "### Export CPU at 1,000 flow rows per second\n\n\
         One agent, ClickHouse up; its service cycles through {d} loopback destinations at {rate} UDP \
         connect()s per second (each destination once every {cyc} s), `[flows] interval_secs = 1` and \
         `[fleet] batch_interval_secs = {bi}`: every batch sums each destination once, {d} rows per {bi} s = \
         1,000 flow rows per second. After a {w} s warm-up, CPU (utime + stime from /proc) over {win} s: the \
         whole agent with `[fleet] enabled` and, under the same load, without it, and the exporter thread \
         `{thread}` (`/proc/PID/task/TID/stat`); rounds alternate on, off; medians. Fleet mode's cost is the \
         difference: the rows are collected by a tap on the event reader's thread, batched and sent on the \
         exporter's.\n\n\
         - Fleet mode: **+{diff:.2}% of one core**: the whole agent {on:.2}% with it, {off:.2}% without \
         ({ratio:.2}×).\n\
         - Of it, the exporter thread: {e:.2}% ({rows} flow rows stored per second: a batch's \
         window runs a little over 5 s, and still holds each destination once).\n\n\
         | round | agent, fleet on | exporter thread | rows/s stored | agent, fleet off |\n|---:|---:|---:|---:|---:|\n",
        d = n(export_cpu::DESTINATIONS),
        rate = n(export_cpu::RATE),
        cyc = export_cpu::DESTINATIONS / export_cpu::RATE,
        bi = export_cpu::BATCH_INTERVAL_SECS,
        w = export_cpu::WARMUP.as_secs(),
        win = c.window_s,
        thread = super::agent::EXPORTER_THREAD,
        e = c.exporter() * 100.0,
        rows = nf(c.rows_per_s()),
        on = c.agent_on() * 100.0,
        off = c.agent_off() * 100.0,
        ratio = c.agent_on() / c.agent_off().max(1e-9),
        diff = (c.agent_on() - c.agent_off()) * 100.0,
    );
    for (k, (on, off)) in c.on.iter().zip(&c.off).enumerate() {
        let _ = writeln!(
            out,
            "| {} | {:.2}% | {:.2}% | {} | {:.2}% |",
            k + 1,
            on.agent * 100.0,
            on.exporter.unwrap_or(f64::NAN) * 100.0,
            nf(on.rows_per_s.unwrap_or(f64::NAN)),
            off.agent * 100.0,
        );
    }
    out.push('\n');
    out
}

/// The sizing table of docs/fleet.md, from the measured figures.
pub fn sizing(f: &Facts) -> String {
    let bpr = f.storage.bytes_per_row();
    let per_1000 = 1000.0 * storage::SECONDS_PER_DAY;
    let mut out = String::new();
    let _ = write!(
        out,
        "Measured by `cargo xtask bench-fleet` on {date} (commit {commit}, ClickHouse {ver} on this \
         project's 2-core test machine; BENCHMARKS.md, \"Fleet mode at scale\", has the method):\n\n\
         - ingest: {rate} flow rows/s (three agents draining 1,000,000 queued rows into one server \
         on the same two cores);\n\
         - storage: {bpr:.1} bytes a flow row on disk after merging (every row a new destination at random);\n\
         - export: fleet mode added {cpu:.2}% of one core to the agent at 1,000 flow rows/s.\n\n\
         So **1,000 flow rows per second** are {rows:.1} million rows and {gib:.2} GiB a day \
         ({gib30:.1} GiB for the 30 days of `fleet prune --older-than 30d`). A host sends a row per service, \
         destination and verdict each `batch_interval_secs` it saw traffic: with {rph:.0} rows/s per host \
         (for example 50 distinct service–destination pairs at the default 5 s batches):\n\n\
         | hosts | flow rows/s | rows/day | storage/day | 30 days | share of one server's measured ingest |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        date = f.machine.date,
        commit = f.machine.commit,
        ver = f.version,
        rate = nf(f.ingest.rate()),
        cpu = f.cpu.export_cost() * 100.0,
        rows = per_1000 / 1e6,
        gib = per_1000 * bpr / GIB,
        gib30 = 30.0 * per_1000 * bpr / GIB,
        rph = storage::ROWS_PER_HOST,
    );
    for s in storage::sizes(bpr, f.ingest.rate()) {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} M | {:.2} GiB | {:.1} GiB | {:.1}% |",
            n(s.hosts),
            nf(s.rows_per_s),
            s.rows_per_day / 1e6,
            s.bytes_per_day / GIB,
            30.0 * s.bytes_per_day / GIB,
            s.ingest_share * 100.0,
        );
    }
    out.push_str(
        "\nPast 100%, one server like this one does not keep up: it needs more cores, or shards (which \
         `fleet init`'s plain `MergeTree` tables do not set up); each agent exports its own rows either way. \
         The fleet commands read the tables whole (\"Scale\"), so their time grows with the rows kept: \
         prune to what the graph needs.\n",
    );
    out
}

const GIB: f64 = (1u64 << 30) as f64;

/// Fails the run when a figure is not what was asked for (a measurement
/// that missed a goal is reported, not an error).
pub fn verdict(f: &Facts) -> Result<()> {
    let i = &f.ingest;
    // Rows lost before they were queued miss the goal; rows queued and
    // then not stored, or stored twice, are a delivery bug.
    ensure!(
        i.stored + i.lost == i.rows,
        "ingest: {} rows stored and {} lost or dropped of the {} made",
        i.stored,
        i.lost,
        i.rows
    );
    Ok(())
}

fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- {name}:begin -->"),
        format!("<!-- {name}:end -->"),
    )
}

/// The marked section `name` of a text, markers included (for `cargo
/// xtask bench`, which rewrites BENCHMARKS.md but keeps it).
pub fn section(text: &str, name: &str) -> Option<String> {
    let (begin, end) = markers(name);
    let b = text.find(&begin)?;
    let e = text[b..].find(&end)? + b + end.len();
    Some(format!("\n{}\n", &text[b..e]))
}

/// Replaces the marked section `name` of the file at `path` with `text`
/// (appends it when there is none), leaving the rest as it is.
pub fn write_marked(path: &Path, name: &str, text: &str) -> Result<()> {
    let (begin, end) = markers(name);
    let old = fs::read_to_string(path).unwrap_or_default();
    let section = format!("{begin}\n{text}{end}\n");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            let rest = old[e + end.len()..].trim_start_matches('\n');
            let gap = if rest.is_empty() { "" } else { "\n" };
            format!("{}{section}{gap}{rest}", &old[..b])
        }
        _ => format!("{}\n\n{section}", old.trim_end()),
    };
    fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marked_section_is_replaced_in_place_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("doc.md");
        fs::write(
            &path,
            "# Top\n\n<!-- x:begin -->\nold\n<!-- x:end -->\n\n## After\n",
        )
        .expect("write");
        write_marked(&path, "x", "new\n").expect("write_marked");
        let text = fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            "# Top\n\n<!-- x:begin -->\nnew\n<!-- x:end -->\n\n## After\n"
        );
        assert_eq!(
            section(&text, "x").as_deref(),
            Some("\n<!-- x:begin -->\nnew\n<!-- x:end -->\n")
        );
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(n(0), "0");
        assert_eq!(n(999), "999");
        assert_eq!(n(1000), "1,000");
        assert_eq!(n(1_000_002), "1,000,002");
        assert_eq!(nf(57_604.6), "57,605");
    }

    #[test]
    fn a_missing_section_is_appended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("doc.md");
        fs::write(&path, "# Top\n").expect("write");
        write_marked(&path, "x", "new\n").expect("write_marked");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "# Top\n\n<!-- x:begin -->\nnew\n<!-- x:end -->\n"
        );
    }
}
