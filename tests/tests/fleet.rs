//! Fleet mode's foundations against a real `clickhouse-server` (the
//! harness's `ClickHouse`, on loopback): `bulkhead fleet init` and `prune`
//! through the binary, inserts and retries through the agent's client.
//!
//! No BPF is needed; without `clickhouse-server` every test fails, saying
//! to run `cargo xtask setup`.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use bulkhead::fleet::{
    model::{FleetBlastRadius, Rule},
    rows::{parse_rows, select},
    schema, time, AnomalyRow, Client, Connection, EncodedBatch, EndpointRow, FlowRow,
    InsertOutcome, Password, PolicyRow, Row, Table,
};
use integration_tests::{
    bulkhead, eventually,
    http::{http_get, http_request},
    ClickHouse, Serving,
};
use tempfile::TempDir;

const USER: &str = "bulkhead";
const PASSWORD: &str = "fleet-test-password";
const DAY: u32 = 86_400;

fn block_on<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot start a runtime: {e}"))
        .block_on(work)
}

/// A server with the test user, its version printed (docs/fleet.md says
/// which releases were tested).
fn server() -> ClickHouse {
    let ch = ClickHouse::start_with_user(USER, PASSWORD);
    eprintln!("ClickHouse server version {} at {}", ch.version(), ch.url());
    ch
}

/// A config whose `[fleet]` section logs in as the test user with
/// `password` (in a file of mode 0600), in `dir`.
fn config(dir: &Path, password: &str) -> PathBuf {
    let pw = dir.join("clickhouse.password");
    fs::write(&pw, format!("{password}\n"))
        .unwrap_or_else(|e| panic!("write {}: {e}", pw.display()));
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", pw.display()));
    let path = dir.join("bulkhead.toml");
    let text = format!(
        "[fleet]\nuser = \"{USER}\"\npassword_file = \"{}\"\n",
        pw.display()
    );
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn tempdir() -> TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// `bulkhead fleet ARGS --clickhouse URL --config CONFIG`.
fn fleet(args: &[&str], url: &str, config: &Path) -> Output {
    let config = config.display().to_string();
    let mut all: Vec<&str> = vec!["fleet"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--clickhouse", url, "--config", &config]);
    bulkhead(&all)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts `out` succeeded and returns its stdout.
fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The agent's client, logged in as the test user.
fn client(ch: &ClickHouse) -> Client {
    Client::new(Connection {
        url: ch
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", ch.url())),
        database: "bulkhead".to_owned(),
        user: USER.to_owned(),
        password: Some(Password::new(PASSWORD.to_owned())),
        timeout: Duration::from_secs(10),
    })
    .unwrap_or_else(|e| panic!("client: {e}"))
}

fn init(client: &Client) {
    block_on(schema::init(client)).unwrap_or_else(|e| panic!("fleet init: {e}"));
}

/// Every row of `R`'s table, by batch and row.
fn read_back<R: Row>(ch: &ClickHouse) -> Vec<R> {
    let answer = ch.query(&select::<R>("bulkhead", "1"));
    parse_rows(&answer).unwrap_or_else(|e| panic!("rows of {}: {e}\n{answer}", R::TABLE))
}

fn flow(remote_port: u16, last_seen: u32) -> FlowRow {
    FlowRow {
        host: "h1".to_owned(),
        host_id: "0123456789abcdef0123456789abcdef".to_owned(),
        service: "web".to_owned(),
        direction: "egress".to_owned(),
        protocol: "tcp".to_owned(),
        local_addr: "198.51.100.1".to_owned(),
        local_port: 40_000,
        remote_addr: "198.51.100.2".to_owned(),
        remote_port,
        verdict: "allow".to_owned(),
        rule: "web.toml:7".to_owned(),
        calls: u64::MAX,
        bytes_sent: 1_000_000_007,
        bytes_received: 3,
        first_seen: last_seen - 10,
        last_seen,
        ..FlowRow::default()
    }
}

#[test]
fn init_creates_exactly_the_four_tables_and_running_it_again_changes_nothing() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let first = succeeded(&fleet(&["init"], &ch.url(), &config), "fleet init");
    assert_eq!(
        first,
        format!(
            "ClickHouse {} at {}/\ndatabase bulkhead: created\ntable bulkhead.flows: created\n\
             table bulkhead.endpoints: created\ntable bulkhead.policies: created\n\
             table bulkhead.anomalies: created\n",
            ch.version(),
            ch.url()
        )
    );
    let tables = "SELECT name, engine FROM system.tables WHERE database = 'bulkhead' ORDER BY name";
    assert_eq!(
        ch.query(tables),
        "anomalies\tMergeTree\nendpoints\tMergeTree\nflows\tMergeTree\npolicies\tMergeTree\n"
    );
    let again = succeeded(&fleet(&["init"], &ch.url(), &config), "fleet init again");
    assert_eq!(
        again,
        format!(
            "ClickHouse {} at {}/\ndatabase bulkhead: exists\ntable bulkhead.flows: exists\n\
             table bulkhead.endpoints: exists\ntable bulkhead.policies: exists\n\
             table bulkhead.anomalies: exists\n",
            ch.version(),
            ch.url()
        )
    );
    assert_eq!(
        ch.query(tables),
        "anomalies\tMergeTree\nendpoints\tMergeTree\nflows\tMergeTree\npolicies\tMergeTree\n"
    );
    // Every column as schema.rs declares it.
    let columns = ch.query(
        "SELECT table, name, type FROM system.columns WHERE database = 'bulkhead' \
         ORDER BY table, name",
    );
    let mut want: Vec<String> = Table::ALL
        .iter()
        .flat_map(|t| {
            t.schema()
                .columns
                .iter()
                .map(move |(name, ty)| format!("{}\t{name}\t{ty}", t.name()))
        })
        .collect();
    want.sort();
    assert_eq!(columns, want.join("\n") + "\n");
}

#[test]
fn init_refuses_a_table_with_other_columns() {
    let ch = server();
    assert_eq!(ch.query("CREATE DATABASE bulkhead"), "");
    assert_eq!(
        ch.query(
            "CREATE TABLE bulkhead.anomalies (at DateTime, date Date) \
             ENGINE = MergeTree() PARTITION BY date ORDER BY at",
        ),
        ""
    );
    let err = block_on(schema::init(&client(&ch))).expect_err("other columns");
    let message = err.to_string();
    assert!(
        message.starts_with(
            "table bulkhead.anomalies exists with other columns than bulkhead writes: \
             no column host (String); no column host_id (String);"
        ),
        "{message}"
    );
}

/// A `flows` table as the release before `dst_name` made it: the agent's
/// rows still go in (without their names), `fleet init` adds the column,
/// the old rows read it as "" and a named row then round-trips.
#[test]
fn init_adds_dst_name_to_an_older_flows_table_and_a_named_row_round_trips() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let client = client(&ch);
    assert_eq!(ch.query("CREATE DATABASE bulkhead"), "");
    let older =
        schema::create_table("bulkhead", Table::Flows).replace(",\n    dst_name String", "");
    assert!(!older.contains("dst_name"), "{older}");
    assert_eq!(ch.query(&older), "");
    let now = time::now();
    let named = |port| FlowRow {
        dst_name: "api.example.test".to_owned(),
        ..flow(port, now)
    };
    // Before init: stored, the name skipped (not refused as bad data).
    insert(&client, "old-1", &mut [flow(8080, now), named(443)]);
    assert_eq!(
        ch.query("SELECT remote_port FROM bulkhead.flows ORDER BY row"),
        "8080\n443\n"
    );

    let out = succeeded(&fleet(&["init"], &ch.url(), &config), "fleet init");
    assert!(
        out.ends_with(
            "table bulkhead.anomalies: created\ntable bulkhead.flows: column dst_name added\n"
        ),
        "{out}"
    );
    assert_eq!(
        ch.query(
            "SELECT type, default_kind, default_expression FROM system.columns \
             WHERE database = 'bulkhead' AND table = 'flows' AND name = 'dst_name'"
        ),
        "String\tDEFAULT\t\\'\\'\n"
    );
    let again = succeeded(&fleet(&["init"], &ch.url(), &config), "fleet init again");
    assert!(!again.contains("added"), "{again}");

    let mut rows = vec![named(443)];
    insert(&client, "new-1", &mut rows);
    let back = read_back::<FlowRow>(&ch);
    let stored: Vec<(&str, &str)> = back
        .iter()
        .map(|r| (r.batch_id.as_str(), r.dst_name.as_str()))
        .collect();
    assert_eq!(
        stored,
        [("new-1", "api.example.test"), ("old-1", ""), ("old-1", "")]
    );
    assert_eq!(back[0], rows[0]);
}

#[test]
fn rows_inserted_through_the_client_read_back_equal() {
    let ch = server();
    let client = client(&ch);
    init(&client);
    let now = time::now();
    let mut flows = vec![flow(8080, now), flow(5432, now - 3 * DAY)];
    let mut endpoints = vec![
        EndpointRow {
            host: "h2".to_owned(),
            host_id: "b".repeat(32),
            service: "api".to_owned(),
            kind: "listener".to_owned(),
            protocol: "tcp".to_owned(),
            addr: "2001:db8::2".to_owned(),
            port: 8080,
            first_seen: now - 60,
            last_seen: now,
            ..EndpointRow::default()
        },
        EndpointRow {
            host: "h2".to_owned(),
            host_id: "b".repeat(32),
            service: "api".to_owned(),
            kind: "address".to_owned(),
            addr: "198.51.100.2".to_owned(),
            first_seen: now - 60,
            last_seen: now,
            ..EndpointRow::default()
        },
    ];
    let mut policies = vec![PolicyRow {
        host: "h1".to_owned(),
        host_id: "a".repeat(32),
        service: "web".to_owned(),
        mode: "enforce".to_owned(),
        file: "/etc/bulkhead/policies/web.toml".to_owned(),
        file_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned(),
        rules: r#"[{"egress":"198.51.100.2/32","ports":[8080],"note":"it's \"quoted\"\n"}]"#
            .to_owned(),
        applied_at: now,
        ..PolicyRow::default()
    }];
    let mut anomalies = vec![AnomalyRow {
        host: "h1".to_owned(),
        host_id: "a".repeat(32),
        service: "web".to_owned(),
        kind: "fan_out".to_owned(),
        severity: "warning".to_owned(),
        detail: r#"{"hosts":51,"ports":[22,23]}"#.to_owned(),
        at: now,
        ..AnomalyRow::default()
    }];
    let batches = [
        EncodedBatch::encode("h1-flows-1", &mut flows),
        EncodedBatch::encode("h2-endpoints-1", &mut endpoints),
        EncodedBatch::encode("h1-policies-1", &mut policies),
        EncodedBatch::encode("h1-anomalies-1", &mut anomalies),
    ];
    for batch in batches {
        let batch = batch.unwrap_or_else(|e| panic!("encode: {e}"));
        block_on(client.insert_batch(&batch))
            .unwrap_or_else(|e| panic!("insert into {}: {e}", batch.table()));
    }
    assert_eq!(read_back::<FlowRow>(&ch), flows);
    assert_eq!(read_back::<EndpointRow>(&ch), endpoints);
    assert_eq!(read_back::<PolicyRow>(&ch), policies);
    assert_eq!(read_back::<AnomalyRow>(&ch), anomalies);
    // The partitions are the rows' UTC days.
    assert_eq!(
        ch.query("SELECT DISTINCT date FROM bulkhead.flows ORDER BY date"),
        format!("{}\n{}\n", time::day(now - 3 * DAY), time::day(now))
    );
}

#[test]
fn a_retried_batch_is_stored_once() {
    let ch = server();
    let client = client(&ch);
    init(&client);
    let now = time::now();
    let mut rows = vec![flow(1, now), flow(2, now), flow(3, now - DAY)];
    let batch = EncodedBatch::encode("h1-retry-1", &mut rows).unwrap_or_else(|e| panic!("{e}"));
    block_on(client.insert_batch(&batch)).unwrap_or_else(|e| panic!("insert: {e}"));
    // The answer was lost, say: the batch is sent again.
    let outcome = block_on(client.insert_once(&batch)).unwrap_or_else(|e| panic!("retry: {e}"));
    assert_eq!(
        outcome,
        InsertOutcome {
            inserted: 0,
            already_stored: 3
        }
    );
    assert_eq!(read_back::<FlowRow>(&ch), rows);

    // An attempt that stored part of a batch (one of its partitions): the
    // retry adds only the rest.
    let mut more = vec![flow(4, now), flow(5, now - DAY), flow(6, now)];
    let partial = EncodedBatch::encode("h1-retry-2", &mut more).unwrap_or_else(|e| panic!("{e}"));
    block_on(client.insert(Table::Flows, partial.only(|i| i == 1), partial.id()))
        .unwrap_or_else(|e| panic!("insert row 1: {e}"));
    let outcome = block_on(client.insert_once(&partial)).unwrap_or_else(|e| panic!("retry: {e}"));
    assert_eq!(
        outcome,
        InsertOutcome {
            inserted: 2,
            already_stored: 1
        }
    );
    // A batch never sent goes in whole.
    let mut fresh = vec![flow(7, now)];
    let fresh_batch =
        EncodedBatch::encode("h1-retry-3", &mut fresh).unwrap_or_else(|e| panic!("{e}"));
    let outcome =
        block_on(client.insert_once(&fresh_batch)).unwrap_or_else(|e| panic!("first: {e}"));
    assert_eq!(
        outcome,
        InsertOutcome {
            inserted: 1,
            already_stored: 0
        }
    );
    let all: Vec<FlowRow> = rows.into_iter().chain(more).chain(fresh).collect();
    assert_eq!(read_back::<FlowRow>(&ch), all);
    assert_eq!(ch.query("SELECT count() FROM bulkhead.flows"), "7\n");
}

/// The one race the stored-rows check cannot see alone: a retry sent while
/// the first attempt still runs on the server (it timed out here, not
/// there) and could store its rows after the check. The retry first ends
/// the query running under the batch's insert id (`KILL QUERY ... SYNC`),
/// then looks, then inserts what is missing: stored once.
#[test]
fn a_retry_ends_a_first_attempt_still_running_then_stores_once() {
    let ch = server();
    let client = client(&ch);
    init(&client);
    let mut rows = vec![flow(1, time::now())];
    let batch = EncodedBatch::encode("h1-race-1", &mut rows).unwrap_or_else(|e| panic!("{e}"));
    let first_attempt_id = "bulkhead-insert-flows-h1-race-1";
    std::thread::scope(|scope| {
        // A query of the same user holding the batch's insert id for three
        // seconds (the longest `sleep` ClickHouse runs) stands in for the
        // first attempt, still running.
        let running = scope.spawn(|| ch.try_query_as("SELECT sleep(3)", first_attempt_id, true));
        eventually(Duration::from_secs(2), Duration::from_millis(20), || {
            let sql = format!(
                "SELECT count() FROM system.processes WHERE query_id = '{first_attempt_id}'"
            );
            if ch.query(&sql) == "1\n" {
                Ok(())
            } else {
                Err(())
            }
        })
        .unwrap_or_else(|()| panic!("the stand-in first attempt never showed as running"));
        let outcome = block_on(client.insert_once(&batch)).unwrap_or_else(|e| panic!("retry: {e}"));
        assert_eq!(
            outcome,
            InsertOutcome {
                inserted: 1,
                already_stored: 0
            }
        );
        let ended = running
            .join()
            .unwrap_or_else(|_| panic!("the stand-in panicked"));
        assert!(
            ended.is_err(),
            "the stand-in first attempt ran to its end: {ended:?}"
        );
    });
    assert_eq!(read_back::<FlowRow>(&ch), rows);
    // Once more: everything is stored, nothing is added.
    let outcome = block_on(client.insert_once(&batch)).unwrap_or_else(|e| panic!("retry: {e}"));
    assert_eq!(outcome.inserted, 0);
    assert_eq!(ch.query("SELECT count() FROM bulkhead.flows"), "1\n");
}

#[test]
fn prune_drops_a_partition_of_40_days_ago_and_keeps_today() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let client = client(&ch);
    init(&client);
    let now = time::now();
    let (old, today) = (time::day(now - 40 * DAY), time::day(now));
    let mut rows = vec![flow(1, now - 40 * DAY), flow(2, now)];
    let batch = EncodedBatch::encode("h1-prune-1", &mut rows).unwrap_or_else(|e| panic!("{e}"));
    block_on(client.insert_batch(&batch)).unwrap_or_else(|e| panic!("insert: {e}"));
    let mut anomalies = vec![AnomalyRow {
        service: "web".to_owned(),
        at: now - 40 * DAY,
        ..AnomalyRow::default()
    }];
    let batch =
        EncodedBatch::encode("h1-prune-2", &mut anomalies).unwrap_or_else(|e| panic!("{e}"));
    block_on(client.insert_batch(&batch)).unwrap_or_else(|e| panic!("insert: {e}"));
    let parts = "SELECT DISTINCT table, partition_id FROM system.parts \
                 WHERE database = 'bulkhead' AND active ORDER BY table, partition_id";
    let id = |day: &str| day.replace('-', "");
    assert_eq!(
        ch.query(parts),
        format!(
            "anomalies\t{}\nflows\t{}\nflows\t{}\n",
            id(&old),
            id(&old),
            id(&today)
        )
    );

    let out = succeeded(
        &fleet(&["prune", "--older-than", "30d"], &ch.url(), &config),
        "fleet prune",
    );
    let cutoff = time::day(now - 30 * DAY);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with(&format!("dropped bulkhead.anomalies {old} (1 rows, ")),
        "{out}"
    );
    assert!(
        lines[1].starts_with(&format!("dropped bulkhead.flows {old} (1 rows, ")),
        "{out}"
    );
    assert_eq!(
        lines[2],
        format!("2 partitions before {cutoff} dropped, 1 kept")
    );
    assert_eq!(ch.query(parts), format!("flows\t{}\n", id(&today)));
    assert_eq!(read_back::<FlowRow>(&ch), vec![rows[1].clone()]);
    assert_eq!(read_back::<AnomalyRow>(&ch), Vec::<AnomalyRow>::new());

    // Nothing more to drop.
    let out = succeeded(
        &fleet(&["prune", "--older-than", "30d"], &ch.url(), &config),
        "fleet prune again",
    );
    assert_eq!(
        out,
        format!("0 partitions before {cutoff} dropped, 1 kept\n")
    );
}

#[test]
fn an_unreachable_url_is_named_in_the_error() {
    // A port nothing listens on: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("bind: {e}"))
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = fleet(&["init"], &url, Path::new("/dev/null"));
    assert!(!out.status.success(), "init succeeded against {url}");
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "bulkhead fleet init: cannot reach ClickHouse at {url}/: "
        )),
        "{err}"
    );
    assert!(err.contains("onnection refused"), "{err}");
}

#[test]
fn a_wrong_password_is_refused_with_clickhouses_message() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), "not-the-password");
    let out = fleet(&["init"], &ch.url(), &config);
    assert!(
        !out.status.success(),
        "init with a wrong password succeeded"
    );
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "bulkhead fleet init: ClickHouse at {}/ refused the credentials: HTTP ",
            ch.url()
        )),
        "{err}"
    );
    // ClickHouse's own words: 18.x names the problem, later releases say
    // only that authentication failed.
    assert!(
        err.contains(&format!("DB::Exception: Wrong password for user {USER}"))
            || err.contains("DB::Exception: bulkhead: Authentication failed"),
        "{err}"
    );
    assert!(
        err.trim_end()
            .ends_with("(check fleet.user and fleet.password_file)"),
        "{err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");
    // Nothing was created.
    assert_eq!(
        ch.query("SELECT count() FROM system.databases WHERE name = 'bulkhead'"),
        "0\n"
    );
}

#[test]
fn bad_command_line_values_are_refused_before_connecting() {
    let out = bulkhead(&["fleet", "prune", "--older-than", "30 parsecs"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("'--older-than <DURATION>'"), "{err}");
    assert!(err.contains("write it like 30d, 12w or 36h"), "{err}");
    let out = bulkhead(&[
        "fleet",
        "init",
        "--clickhouse",
        "https://ch.example:8443",
        "--config",
        "/dev/null",
    ]);
    assert!(!out.status.success());
    assert_eq!(
        text(&out.stderr),
        "bulkhead fleet init: ClickHouse URL \"https://ch.example:8443\": must start with \
         http:// (for TLS, put a local proxy in front)\n"
    );
}

// ---- Reading the fleet back: graph, blast radius, services, serve ----

/// Inserts `rows` as one batch, as an agent would.
fn insert<R: Row>(client: &Client, batch_id: &str, rows: &mut [R]) {
    let batch = EncodedBatch::encode(batch_id, rows).unwrap_or_else(|e| panic!("{batch_id}: {e}"));
    block_on(client.insert_batch(&batch))
        .unwrap_or_else(|e| panic!("insert {batch_id} into {}: {e}", batch.table()));
}

/// A policy snapshot of `service@host` applied at `at`, allowing TCP to
/// each `(network, port)`.
fn policy(service: &str, host: &str, allows: &[(&str, u16)], at: u32) -> PolicyRow {
    let rules: Vec<Rule> = allows
        .iter()
        .enumerate()
        .map(|(i, (net, port))| Rule {
            rule: format!("{service}.toml#egress[{i}]"),
            to: vec![net.parse().unwrap_or_else(|e| panic!("{net}: {e}"))],
            names: Vec::new(),
            ports: vec![(*port, *port)],
            protocol: "tcp".to_owned(),
            description: None,
        })
        .collect();
    PolicyRow {
        host: host.to_owned(),
        host_id: format!("{host:0>32}"),
        service: service.to_owned(),
        mode: "enforce".to_owned(),
        file: format!("/etc/bulkhead/policies/{service}.toml"),
        file_sha256: "0".repeat(64),
        rules: serde_json::to_string(&rules).unwrap_or_else(|e| panic!("rules: {e}")),
        applied_at: at,
        ..PolicyRow::default()
    }
}

/// `service@host` listening on `addr:port`/tcp from `first` to `last`.
fn listening(
    service: &str,
    host: &str,
    (addr, port): (&str, u16),
    (first, last): (u32, u32),
) -> EndpointRow {
    EndpointRow {
        host: host.to_owned(),
        host_id: format!("{host:0>32}"),
        service: service.to_owned(),
        kind: "listener".to_owned(),
        protocol: "tcp".to_owned(),
        addr: addr.to_owned(),
        port,
        first_seen: first,
        last_seen: last,
        ..EndpointRow::default()
    }
}

/// `calls` allowed TCP connections of `service@host` to `addr:port`.
fn egress(
    service: &str,
    host: &str,
    (addr, port): (&str, u16),
    calls: u64,
    (first, last): (u32, u32),
) -> FlowRow {
    FlowRow {
        host: host.to_owned(),
        host_id: format!("{host:0>32}"),
        service: service.to_owned(),
        direction: "egress".to_owned(),
        protocol: "tcp".to_owned(),
        local_addr: "198.51.100.99".to_owned(),
        local_port: 40_000,
        remote_addr: addr.to_owned(),
        remote_port: port,
        verdict: "allow".to_owned(),
        rule: format!("{service}.toml#egress[0]"),
        calls,
        bytes_sent: 100 * calls,
        bytes_received: 1000 * calls,
        first_seen: first,
        last_seen: last,
        ..FlowRow::default()
    }
}

const API: (&str, u16) = ("198.51.100.20", 8080);
const DB: (&str, u16) = ("198.51.100.30", 5432);

/// web@h1 → api@h2:8080 → db@h3:5432, and iso@h4 that nothing reaches and
/// that reaches nothing; as of `now`. Policies were applied 10 minutes
/// ago, listeners refreshed 30 s ago, flows ran until a minute ago.
fn chain(client: &Client, now: u32) {
    init(client);
    let mut policies = vec![
        policy("web", "h1", &[("198.51.100.20/32", 8080)], now - 600),
        policy("api", "h2", &[("198.51.100.30/32", 5432)], now - 600),
        policy("db", "h3", &[], now - 600),
        policy("iso", "h4", &[("203.0.113.0/24", 443)], now - 600),
    ];
    let mut listeners = vec![
        listening("api", "h2", API, (now - 3600, now - 30)),
        listening("db", "h3", DB, (now - 3600, now - 30)),
        listening("iso", "h4", ("198.51.100.40", 22), (now - 3600, now - 30)),
    ];
    let mut flows = vec![
        egress("web", "h1", API, 12, (now - 300, now - 60)),
        egress("api", "h2", DB, 5, (now - 300, now - 60)),
    ];
    insert(client, "chain-policies", &mut policies);
    insert(client, "chain-endpoints", &mut listeners);
    insert(client, "chain-flows", &mut flows);
}

/// A fleet command against `ch` (no config: the URL alone).
fn fleet_at(ch: &ClickHouse, config: &Path, args: &[&str]) -> Output {
    fleet(args, &ch.url(), config)
}

#[test]
fn fleet_blast_radius_of_web_is_exactly_api_at_h2_and_db_at_h3_with_their_paths() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let now = time::now();
    chain(&client(&ch), now);

    let out = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "web", "--json"]),
        "fleet blast-radius --json",
    );
    let b: FleetBlastRadius = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(b.instances, ["web@h1"]);
    let lateral: Vec<(&str, usize, &str)> = b
        .lateral
        .services
        .iter()
        .map(|h| (h.target.as_str(), h.hops, h.path.as_str()))
        .collect();
    assert_eq!(
        lateral,
        [
            ("api@h2", 1, "web@h1 → api@h2:8080"),
            ("db@h3", 2, "web@h1 → api@h2:8080 → db@h3:5432"),
        ]
    );
    assert_eq!(b.lateral.size, 2);
    assert!(
        b.lateral.destinations.is_empty(),
        "{:?}",
        b.lateral.destinations
    );
    assert_eq!(b.allows.len(), 1);
    assert_eq!(b.allows[0].services, ["api@h2"]);
    assert!(b.allows[0].used);
    assert!(b.unused.is_empty());
    let reached: Vec<(&str, &str, u64)> = b
        .reached
        .iter()
        .map(|r| (r.to.as_str(), r.dest.as_str(), r.calls))
        .collect();
    assert_eq!(reached, [("api@h2", "198.51.100.20:8080/tcp", 12)]);

    // The same instance named with its host.
    let one = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "web@h1", "--json"]),
        "web@h1",
    );
    let one: FleetBlastRadius = serde_json::from_str(&one).unwrap_or_else(|e| panic!("{e}: {one}"));
    assert_eq!((one.service.as_str(), &one.lateral), ("web@h1", &b.lateral));

    // As text: every hop of every path, and the reachable set's size.
    let report = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "web"]),
        "fleet blast-radius",
    );
    assert!(
        report.starts_with("blast radius of web across the fleet: 1 instance(s): web@h1\n"),
        "{report}"
    );
    assert!(
        report.contains(
            "   web@h1 web.toml#egress[0] 198.51.100.20/32 ports 8080 tcp  \
             (services listening there: api@h2)\n"
        ),
        "{report}"
    );
    assert!(
        report.contains("   web@h1 → api@h2 (198.51.100.20:8080/tcp): 12 connections, last "),
        "{report}"
    );
    assert!(
        report.ends_with(
            "4. lateral reach: 2 service instance(s), 0 destination(s)\n   \
             1 hop(s): web@h1 → api@h2:8080\n   \
             2 hop(s): web@h1 → api@h2:8080 → db@h3:5432\n"
        ),
        "{report}"
    );

    // The isolated service reaches no service; its allowance is unused.
    let iso = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "iso", "--json"]),
        "iso",
    );
    let iso: FleetBlastRadius = serde_json::from_str(&iso).unwrap_or_else(|e| panic!("{e}: {iso}"));
    assert_eq!(iso.lateral.size, 0);
    assert_eq!(iso.unused.len(), 1);
    assert!(iso.reached.is_empty());

    // An unknown service: exit 1, saying so.
    let out = fleet_at(&ch, &config, &["blast-radius", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "bulkhead fleet blast-radius: no instance of \"nope\" in the fleet \
         (no policy snapshot names it)\n"
    );
    assert!(out.stdout.is_empty());
}

/// web@h1's policy gains a name rule (egress[1]: `api.example.test`,
/// 443/tcp) and it reaches two addresses its lookup of the name gave.
fn named_flows(client: &Client, now: u32) {
    let mut web = policy("web", "h1", &[("198.51.100.20/32", 8080)], now - 300);
    web.rules = serde_json::to_string(&[
        Rule {
            rule: "web.toml#egress[0]".to_owned(),
            to: vec!["198.51.100.20/32".parse().unwrap_or_else(|e| panic!("{e}"))],
            names: Vec::new(),
            ports: vec![(8080, 8080)],
            protocol: "tcp".to_owned(),
            description: None,
        },
        Rule {
            rule: "web.toml#egress[1]".to_owned(),
            to: Vec::new(),
            names: vec!["api.example.test".to_owned()],
            ports: vec![(443, 443)],
            protocol: "tcp".to_owned(),
            description: None,
        },
    ])
    .unwrap_or_else(|e| panic!("rules: {e}"));
    let named = |addr, calls| FlowRow {
        dst_name: "api.example.test".to_owned(),
        rule: "web.toml#egress[1]".to_owned(),
        ..egress("web", "h1", (addr, 443), calls, (now - 300, now - 60))
    };
    insert(client, "named-policies", &mut [web]);
    insert(
        client,
        "named-flows",
        &mut [named("203.0.113.5", 2), named("203.0.113.6", 3)],
    );
}

/// `fleet graph`'s JSON draws both addresses under one `name:` node.
fn assert_drawn_under_the_name(json: &str) {
    let view: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let node = "name:api.example.test:443/tcp";
    assert!(
        view["nodes"]
            .as_array()
            .is_some_and(|ns| ns.iter().any(|n| n["id"] == node && n["kind"] == "name")),
        "{json}"
    );
    let mut under: Vec<(String, String)> = view["edges"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["to"] == node)
                .map(|e| (e["dest"].to_string(), e["dst_name"].to_string()))
                .collect()
        })
        .unwrap_or_default();
    under.sort();
    assert_eq!(
        under,
        [
            (
                "\"203.0.113.5:443/tcp\"".to_owned(),
                "\"api.example.test\"".to_owned()
            ),
            (
                "\"203.0.113.6:443/tcp\"".to_owned(),
                "\"api.example.test\"".to_owned()
            ),
        ],
        "{json}"
    );
}

/// What a test compares of a `Reached`: to, dest, addresses, calls, rule.
type ReachedRow<'a> = (&'a str, &'a str, Vec<&'a str>, u64, Option<&'a str>);

/// web@h1 gets a name rule and reaches two addresses its lookup of
/// `api.example.test` gave: the fleet's blast radius lists them under the
/// name, with the rule, and the graph draws them under one name node.
#[test]
fn fleet_blast_radius_and_graph_name_a_destination_reached_by_name() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let client = client(&ch);
    let now = time::now();
    chain(&client, now);
    named_flows(&client, now);

    let out = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "web", "--json"]),
        "fleet blast-radius --json",
    );
    let b: FleetBlastRadius = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let reached: Vec<ReachedRow<'_>> = b
        .reached
        .iter()
        .map(|r| {
            (
                r.to.as_str(),
                r.dest.as_str(),
                r.addresses.iter().map(String::as_str).collect(),
                r.calls,
                r.rule.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        reached,
        [
            (
                "api.example.test:443/tcp",
                "api.example.test:443/tcp",
                vec!["203.0.113.5", "203.0.113.6"],
                5,
                Some("web.toml#egress[1]")
            ),
            (
                "api@h2",
                "198.51.100.20:8080/tcp",
                Vec::new(),
                12,
                Some("web.toml#egress[0]")
            ),
        ]
    );
    let allows: Vec<(&str, bool)> = b.allows.iter().map(|a| (a.to.as_str(), a.used)).collect();
    assert_eq!(
        allows,
        [("198.51.100.20/32", true), ("api.example.test", true)]
    );
    let named_hop = b
        .lateral
        .destinations
        .iter()
        .find(|h| h.target == "api.example.test:443/tcp")
        .unwrap_or_else(|| panic!("no lateral destination by name: {out}"));
    assert_eq!(
        (named_hop.hops, named_hop.path.as_str()),
        (1, "web@h1 → api.example.test:443")
    );

    let report = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "web"]),
        "fleet blast-radius",
    );
    assert!(
        report.contains(
            "   web@h1 → api.example.test:443/tcp (203.0.113.5, 203.0.113.6): 5 connections, last "
        ),
        "{report}"
    );
    assert!(
        report.contains(
            "   web@h1 web.toml#egress[1] api.example.test ports 443 tcp  \
             (no service listening there)\n"
        ),
        "{report}"
    );

    assert_drawn_under_the_name(&succeeded(
        &fleet_at(&ch, &config, &["graph"]),
        "fleet graph",
    ));
}

#[test]
fn fleet_graph_draws_the_chain_across_hosts() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    chain(&client(&ch), time::now());

    let dot = succeeded(
        &fleet_at(&ch, &config, &["graph", "--format", "dot"]),
        "fleet graph --format dot",
    );
    assert!(dot.starts_with("digraph bulkhead {\n"), "{dot}");
    let edges: Vec<&str> = dot.lines().filter(|l| l.contains(" -> ")).collect();
    assert_eq!(edges.len(), 2, "{dot}");
    assert!(
        edges[0].starts_with("  \"service:api@h2\" -> \"service:db@h3\" [label="),
        "{dot}"
    );
    assert!(
        edges[1].starts_with("  \"service:web@h1\" -> \"service:api@h2\" [label="),
        "{dot}"
    );
    for node in ["web@h1", "api@h2", "db@h3", "iso@h4"] {
        assert!(
            dot.contains(&format!(
                "  \"service:{node}\" [label=\"{node}\", shape=box];\n"
            )),
            "{node}: {dot}"
        );
    }

    let json = succeeded(&fleet_at(&ch, &config, &["graph"]), "fleet graph");
    let view: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(view["schema"], "bulkhead.graph.v1");
    let edge = |from: &str| {
        view["edges"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["from"] == from))
            .unwrap_or_else(|| panic!("no edge from {from}: {json}"))
            .clone()
    };
    let web = edge("service:web@h1");
    assert_eq!(
        (
            &web["to"],
            &web["dest"],
            &web["connections"],
            &web["bytes_sent"]
        ),
        (
            &serde_json::json!("service:api@h2"),
            &serde_json::json!("198.51.100.20:8080/tcp"),
            &serde_json::json!(12),
            &serde_json::json!(1200)
        ),
        "{json}"
    );

    let mermaid = succeeded(
        &fleet_at(&ch, &config, &["graph", "--format", "mermaid"]),
        "mermaid",
    );
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("\"api@h2\""), "{mermaid}");
}

#[test]
fn fleet_services_lists_every_instance_with_its_host_mode_and_last_seen() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let now = time::now();
    chain(&client(&ch), now);

    let json = succeeded(
        &fleet_at(&ch, &config, &["services", "--json"]),
        "fleet services --json",
    );
    let services: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    // The latest of the policy snapshot (10 min ago), the flows (1 min)
    // and the listeners (30 s).
    let row = |service: &str, host: &str, last: u32| serde_json::json!({"service": service, "host": host, "mode": "enforce", "last_seen": last});
    assert_eq!(
        services,
        serde_json::json!([
            row("api", "h2", now - 30),
            row("db", "h3", now - 30),
            row("iso", "h4", now - 30),
            row("web", "h1", now - 60),
        ])
    );

    let table = succeeded(&fleet_at(&ch, &config, &["services"]), "fleet services");
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let firsts: Vec<&[&str]> = lines.iter().map(|l| &l[..3]).collect();
    assert_eq!(
        firsts,
        [
            &["SERVICE", "HOST", "MODE"][..],
            &["api", "h2", "enforce"],
            &["db", "h3", "enforce"],
            &["iso", "h4", "enforce"],
            &["web", "h1", "enforce"],
        ],
        "{table}"
    );

    // A service seen only as a listener's owner (no policy snapshot) is
    // listed too, without a mode.
    let mut unmanaged = vec![listening(
        "cache",
        "h3",
        ("198.51.100.31", 6379),
        (now - 90, now - 20),
    )];
    insert(&client(&ch), "services-endpoints", &mut unmanaged);
    let json = succeeded(
        &fleet_at(&ch, &config, &["services", "--json"]),
        "fleet services --json",
    );
    let services: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(
        services[1],
        serde_json::json!({"service": "cache", "host": "h3", "mode": null, "last_seen": now - 20}),
        "{json}"
    );
    let table = succeeded(&fleet_at(&ch, &config, &["services"]), "fleet services");
    let cache: Vec<&str> = table
        .lines()
        .nth(2)
        .map(|l| l.split_whitespace().take(3).collect())
        .unwrap_or_default();
    assert_eq!(cache, ["cache", "h3", "-"], "{table}");
}

/// The database's address listened on h3 until two hours ago, then on h4:
/// a flow four hours ago went to db@h3, one a minute ago to db@h4 (the
/// flows query keeps different hours apart).
#[test]
fn an_address_that_moved_between_hosts_resolves_by_time() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let client = client(&ch);
    init(&client);
    let now = time::now();
    let mut policies = vec![
        policy("api", "h2", &[("198.51.100.30/32", 5432)], now - 6 * 3600),
        policy("db", "h3", &[], now - 6 * 3600),
        policy("db", "h4", &[], now - 3600),
    ];
    let mut listeners = vec![
        listening("db", "h3", DB, (now - 6 * 3600, now - 2 * 3600)),
        listening("db", "h4", DB, (now - 3600, now - 30)),
    ];
    let mut flows = vec![
        egress("api", "h2", DB, 3, (now - 4 * 3600, now - 4 * 3600 + 60)),
        egress("api", "h2", DB, 5, (now - 300, now - 60)),
    ];
    insert(&client, "moved-policies", &mut policies);
    insert(&client, "moved-endpoints", &mut listeners);
    insert(&client, "moved-flows", &mut flows);

    let out = succeeded(
        &fleet_at(&ch, &config, &["blast-radius", "api", "--json"]),
        "api",
    );
    let b: FleetBlastRadius = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let reached: Vec<(&str, u64)> = b.reached.iter().map(|r| (r.to.as_str(), r.calls)).collect();
    assert_eq!(reached, [("db@h3", 3), ("db@h4", 5)], "{out}");
    // What the policy lets it reach now: the address's current owner.
    assert_eq!(b.allows[0].services, ["db@h4"], "{out}");
    let paths: Vec<&str> = b.lateral.services.iter().map(|h| h.path.as_str()).collect();
    assert_eq!(paths, ["api@h2 → db@h4:5432"], "{out}");
    // And the graph draws each flow to the host that had the address then.
    let dot = succeeded(
        &fleet_at(&ch, &config, &["graph", "--format", "dot"]),
        "graph",
    );
    for to in ["db@h3", "db@h4"] {
        assert!(
            dot.contains(&format!("  \"service:api@h2\" -> \"service:{to}\" [label=")),
            "{to}: {dot}"
        );
    }
}

/// The address `fleet serve` says it serves on.
fn serve_addr(serve: &Serving) -> std::net::SocketAddr {
    let line = serve.first_line();
    line.strip_suffix("/graph")
        .and_then(|l| l.rsplit_once("http://"))
        .and_then(|(_, a)| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

#[test]
fn fleet_serve_answers_the_maps_json_with_the_fleet_read_on_each_request() {
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let client = client(&ch);
    let now = time::now();
    chain(&client, now);
    let config_arg = config.display().to_string();
    let url = ch.url();
    let mut serve = Serving::start(&[
        "fleet",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--clickhouse",
        &url,
        "--config",
        &config_arg,
    ]);
    let line = serve.first_line().to_owned();
    let addr = serve_addr(&serve);
    assert_eq!(
        line,
        format!("serving the fleet map of {url}/ (database bulkhead) at http://{addr}/graph")
    );

    let (status, head, body) = http_get(addr, "/graph.json");
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let data: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(data["graph"]["schema"], "bulkhead.graph.v1");
    let edges = |data: &serde_json::Value| -> Vec<(String, String)> {
        data["graph"]["edges"]
            .as_array()
            .map(|es| {
                es.iter()
                    .map(|e| (e["from"].to_string(), e["to"].to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        edges(&data),
        [
            (
                "\"service:api@h2\"".to_owned(),
                "\"service:db@h3\"".to_owned()
            ),
            (
                "\"service:web@h1\"".to_owned(),
                "\"service:api@h2\"".to_owned()
            ),
        ]
    );
    assert_eq!(
        data["blast"]["service:web@h1"]["paths"],
        serde_json::json!(["web@h1 → api@h2:8080", "web@h1 → api@h2:8080 → db@h3:5432"])
    );

    // A new flow is on the next answer: read again, not cached.
    let mut more = vec![egress(
        "iso",
        "h4",
        ("203.0.113.5", 443),
        1,
        (now - 60, now - 50),
    )];
    insert(&client, "serve-flows", &mut more);
    let (status, _, body) = http_get(addr, "/graph.json");
    assert_eq!(status, 200, "{body}");
    let data: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(edges(&data).len(), 3, "{body}");

    // The page is the host map's, with the fleet inlined.
    let (status, head, page) = http_get(addr, "/graph");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        page.contains("\"service:db@h3\""),
        "the data is not inlined"
    );
    // A name a web page could rebind to loopback is not answered.
    let (status, _, _) = http_request(
        addr,
        "GET /graph.json HTTP/1.0\r\nHost: evil.example\r\n\r\n",
    );
    assert_eq!(status, 421);
    let (status, head, _) = http_get(addr, "/");
    assert_eq!(status, 303);
    assert!(head.contains("location: /graph\r\n"), "{head}");

    // ClickHouse gone: the answer says so, and the server keeps serving.
    drop(ch);
    let (status, _, body) = http_get(addr, "/graph.json");
    assert_eq!(status, 502, "{body}");
    assert!(
        body.starts_with(&format!(
            "read the policy snapshots: cannot reach ClickHouse at {url}/: "
        )),
        "{body}"
    );

    let status = serve.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "fleet serve did not exit cleanly on SIGTERM: {status:?} {}",
        serve.stderr()
    );
}

#[test]
fn fleet_serve_refuses_a_non_loopback_address() {
    let out = bulkhead(&[
        "fleet",
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--clickhouse",
        "http://127.0.0.1:1",
        "--config",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "bulkhead fleet serve: --listen 0.0.0.0:0: not a loopback address; the fleet map shows \
         every host's services and flows, so it is served on loopback only (reach it through an \
         SSH tunnel or an authenticating proxy)\n"
    );
}

#[test]
fn a_fleet_query_error_names_the_url_and_clickhouses_message() {
    // A server without the schema: the read fails, saying what to run.
    let ch = server();
    let dir = tempdir();
    let config = config(dir.path(), PASSWORD);
    let out = fleet_at(&ch, &config, &["graph"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "bulkhead fleet graph: read the policy snapshots: ClickHouse at {}/ answered with an error: HTTP ",
            ch.url()
        )),
        "{err}"
    );
    // ClickHouse's own words: UNKNOWN_DATABASE.
    assert!(err.contains("HTTP 404: Code: 81"), "{err}");
    assert!(
        err.trim_end()
            .ends_with("(run `bulkhead fleet init` first)"),
        "{err}"
    );
}
