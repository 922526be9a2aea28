//! The exporter against a real OTLP/HTTP receiver on loopback (axum).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
use serde_json::{json, Value};

use super::{spawn, ExportConfig, ExportEvents, ExportStats};
use crate::events::{FlowEvent, Hub, Sink};

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Value>>>,
    /// What the receiver answers (200 unless a test says otherwise).
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn records(&self) -> Vec<Value> {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .flat_map(|r| {
                r["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect()
    }
}

async fn logs(State(r): State<Receiver>, body: Bytes) -> StatusCode {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    r.requests.lock().expect("lock").push(v);
    StatusCode::from_u16(r.status.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK)
}

async fn receiver(at: SocketAddr, status: u16) -> (Receiver, SocketAddr) {
    let r = Receiver::default();
    r.status.store(status, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(at).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = Router::new()
        .route("/v1/logs", post(logs))
        .with_state(r.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (r, addr)
}

fn hub() -> (Arc<Hub>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = Sink::open(dir.path().join("events.jsonl").to_str().expect("utf-8")).expect("sink");
    (
        Arc::new(Hub::new(sink).expect("the writer thread starts")),
        dir,
    )
}

fn config(addr: SocketAddr) -> ExportConfig {
    ExportConfig {
        otlp_endpoint: format!("http://{addr}/v1/logs"),
        batch_size: 4,
        flush_interval_ms: 50,
        queue_capacity: 8,
        timeout_ms: 1000,
        max_retries: 1,
        retry_initial_ms: 10,
        retry_max_ms: 20,
        ..ExportConfig::default()
    }
}

/// A denied connect of `pid`.
fn verdict(pid: u32) -> FlowEvent {
    FlowEvent {
        pid,
        tid: pid,
        ..crate::events::sample_verdict()
    }
}

fn anomaly() -> FlowEvent {
    let mut d = crate::anomaly::Detector::new(crate::anomaly::AnomalyConfig::default());
    for _ in 0..30 {
        d.observe(&verdict(1));
    }
    let found = d.tick(1_800_000_000);
    crate::anomaly::to_event(&found[0])
}

async fn eventually(what: &str, ok: impl Fn() -> bool) {
    for _ in 0..200 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arrive_as_otlp_json_logs() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 200).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = spawn(config(addr), &hub, Arc::clone(&stats))
        .expect("valid endpoint")
        .expect("enabled");
    let events: Vec<FlowEvent> = (1..=5).map(verdict).chain([anomaly()]).collect();
    hub.publish(events);
    // The exporter counts a batch as sent once the receiver has answered,
    // which is after the receiver holds the records.
    eventually("6 records at the receiver, counted as sent", || {
        r.records().len() == 6 && ExportStats::get(&stats.sent) == 6
    })
    .await;
    assert_eq!(stats.dropped(), 0);
    let first = r.requests.lock().expect("lock")[0].clone();
    let resource = &first["resourceLogs"][0]["resource"]["attributes"][0];
    assert_eq!(resource["key"], "service.name");
    assert_eq!(resource["value"]["stringValue"], "bulkhead");
    let records = r.records();
    let bodies: Vec<Value> = records
        .iter()
        .map(|rec| {
            serde_json::from_str(rec["body"]["stringValue"].as_str().expect("string body"))
                .expect("body is an event")
        })
        .collect();
    assert_eq!(
        bodies
            .iter()
            .map(|b| b["pid"].clone())
            .take(5)
            .collect::<Vec<_>>(),
        (1..=5).map(Value::from).collect::<Vec<_>>()
    );
    let verdict = &records[0];
    // 64-bit integers are strings in the protobuf JSON mapping.
    assert_eq!(verdict["timeUnixNano"], "1779268087123456789");
    assert_eq!(verdict["severityText"], "WARN", "a deny");
    assert_eq!(verdict["eventName"], "bulkhead.verdict");
    // The semantic-convention attributes (docs/events.md, "Field mapping"):
    // the denied connect of `billing` to 192.0.2.9:5432/tcp by pid 1.
    let attrs: Vec<(String, Value)> = verdict["attributes"]
        .as_array()
        .expect("attributes")
        .iter()
        .map(|x| {
            let key = x["key"].as_str().expect("key").to_string();
            (key, x["value"].clone())
        })
        .collect();
    let expected = [
        ("bulkhead.event.type", json!({"stringValue": "verdict"})),
        ("bulkhead.service", json!({"stringValue": "billing"})),
        ("bulkhead.mode", json!({"stringValue": "enforce"})),
        (
            "bulkhead.rule",
            json!({"stringValue": "billing.toml#default-deny"}),
        ),
        (
            "bulkhead.traffic_direction",
            json!({"stringValue": "egress"}),
        ),
        ("bulkhead.verdict", json!({"stringValue": "deny"})),
        ("network.transport", json!({"stringValue": "tcp"})),
        ("network.type", json!({"stringValue": "ipv4"})),
        ("network.peer.address", json!({"stringValue": "192.0.2.9"})),
        ("network.peer.port", json!({"intValue": "5432"})),
        ("process.pid", json!({"intValue": "1"})),
        ("thread.id", json!({"intValue": "1"})),
        ("process.executable.name", json!({"stringValue": "curl"})),
        ("user.id", json!({"stringValue": "0"})),
    ]
    .map(|(k, v)| (k.to_string(), v));
    assert_eq!(attrs, expected.to_vec(), "{verdict:#}");
    let resource = &first["resourceLogs"][0]["resource"]["attributes"][2];
    assert_eq!(resource["key"], "host.name");
    assert_eq!(
        resource["value"]["stringValue"],
        crate::events::host::name(),
        "the name events carry"
    );
    assert_eq!(bodies[0]["host"], "web-1", "the event's own host field");
    let a = &records[5];
    assert_eq!(bodies[5]["type"], "anomaly");
    assert_eq!(a["eventName"], "bulkhead.anomaly");
    let attrs = a["attributes"].as_array().expect("attributes");
    assert!(
        attrs
            .iter()
            .any(|x| x["key"] == "bulkhead.anomaly.kind"
                && x["value"]["stringValue"] == "deny_burst"),
        "{a:#}"
    );
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_drops_and_counts_then_recovers() {
    // A free port with nothing listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = spawn(config(port), &hub, Arc::clone(&stats))
        .expect("valid endpoint")
        .expect("enabled");
    hub.publish((1..=40).map(verdict).collect());
    eventually("every event sent or dropped", || {
        ExportStats::get(&stats.dropped_queue_full) + ExportStats::get(&stats.dropped_retries) == 40
    })
    .await;
    assert!(
        ExportStats::get(&stats.dropped_queue_full) > 0,
        "queue of 8"
    );
    assert!(ExportStats::get(&stats.failed_requests) >= 2, "retried");
    assert_eq!(ExportStats::get(&stats.sent), 0);
    // The collector comes up on that port: new events get through.
    let (r, _) = receiver(port, 200).await;
    hub.publish(vec![verdict(99)]);
    eventually("the event after recovery", || {
        r.records().iter().any(|rec| {
            rec["body"]["stringValue"]
                .as_str()
                .is_some_and(|b| b.contains("\"pid\":99"))
        })
    })
    .await;
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_only_and_refused_batches_are_counted() {
    let (r, addr) = receiver(SocketAddr::from(([127, 0, 0, 1], 0)), 400).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let cfg = ExportConfig {
        events: ExportEvents::Anomalies,
        ..config(addr)
    };
    let exporter = spawn(cfg, &hub, Arc::clone(&stats))
        .expect("valid endpoint")
        .expect("enabled");
    hub.publish(vec![verdict(1), anomaly(), verdict(2)]);
    eventually("the refused anomaly", || {
        ExportStats::get(&stats.dropped_rejected) == 1
    })
    .await;
    let records = r.records();
    assert_eq!(
        records.len(),
        1,
        "a 400 is not retried; verdicts not exported"
    );
    assert!(records[0]["body"]["stringValue"]
        .as_str()
        .is_some_and(|b| b.contains("\"type\":\"anomaly\"")));
    exporter.abort();
}

/// A collector that answers 200 and then sends body chunks of `size`
/// bytes forever, one every `gap`; returns its address and how many body
/// bytes it managed to write before the exporter hung up.
async fn endless_collector(
    size: usize,
    gap: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = conn.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if conn.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("{size:x}\r\n{}\r\n", "x".repeat(size));
                while conn.write_all(chunk.as_bytes()).await.is_ok() {
                    count.fetch_add(size as u64, Ordering::Relaxed);
                    if !gap.is_zero() {
                        tokio::time::sleep(gap).await;
                    }
                }
            });
        }
    });
    (addr, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_answer_is_cut_at_the_cap() {
    let (addr, written) = endless_collector(0x4000, Duration::ZERO).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = spawn(config(addr), &hub, Arc::clone(&stats))
        .expect("valid endpoint")
        .expect("enabled");
    hub.publish((1..=4).map(verdict).collect());
    eventually("the batch counted as sent", || {
        ExportStats::get(&stats.sent) == 4
    })
    .await;
    // Let the collector notice the hang-up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bytes = written.load(Ordering::Relaxed);
    // The cap plus what the two kernels' socket buffers held.
    assert!(bytes < 16 * 1024 * 1024, "the exporter read {bytes} bytes");
    exporter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_answer_times_out() {
    let (addr, _) = endless_collector(1, Duration::from_millis(100)).await;
    let (hub, _dir) = hub();
    let stats = Arc::new(ExportStats::default());
    let exporter = spawn(config(addr), &hub, Arc::clone(&stats))
        .expect("valid endpoint")
        .expect("enabled");
    hub.publish((1..=4).map(verdict).collect());
    // timeout_ms 1000, one retry: both attempts time out, the batch is
    // dropped and counted.
    eventually("the batch dropped after its retries", || {
        ExportStats::get(&stats.dropped_retries) == 4
    })
    .await;
    assert_eq!(ExportStats::get(&stats.failed_requests), 2);
    assert_eq!(ExportStats::get(&stats.sent), 0);
    exporter.abort();
}
