//! An OTLP/HTTP logs receiver on loopback for the suites: a real HTTP/1.1
//! server on a thread of its own that keeps every request (path, headers,
//! body, un-gzipped when it says gzip), answers 200 and closes the
//! connection. It reads both OTLP encodings: JSON and protobuf (with the
//! OpenTelemetry project's message types).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::{any_value::Value as Any, KeyValue},
};
use prost::Message as _;
use serde_json::Value;

use crate::eventually::eventually;

/// One request as received.
#[derive(Debug, Clone)]
pub struct OtlpRequest {
    pub path: String,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The body, decompressed if `content-encoding: gzip`.
    pub body: Vec<u8>,
}

/// A log record, whichever encoding carried it: attribute values as text
/// (integers in decimal), the body parsed as the event's JSON.
#[derive(Debug, Clone)]
pub struct OtlpRecord {
    /// The record's `eventName`.
    pub event_name: String,
    pub resource: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub event: Value,
}

impl OtlpRequest {
    /// The header `name` (lower case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Its log records; panics if the body is not an
    /// `ExportLogsServiceRequest` in the encoding its content type says.
    #[must_use]
    pub fn records(&self) -> Vec<OtlpRecord> {
        match self.header("content-type") {
            Some("application/x-protobuf") => proto_records(&self.body),
            Some("application/json") => json_records(&self.body),
            other => panic!("an OTLP request with content type {other:?}"),
        }
    }
}

fn text(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Any::StringValue(s)) => s.clone(),
                Some(Any::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn proto_records(body: &[u8]) -> Vec<OtlpRecord> {
    let request = ExportLogsServiceRequest::decode(body)
        .unwrap_or_else(|e| panic!("not a protobuf ExportLogsServiceRequest: {e}"));
    let mut out = Vec::new();
    for rl in &request.resource_logs {
        let resource = text(rl.resource.as_ref().map_or(&[][..], |r| &r.attributes));
        for sl in &rl.scope_logs {
            for rec in &sl.log_records {
                let Some(Any::StringValue(body)) = rec.body.as_ref().and_then(|b| b.value.as_ref())
                else {
                    panic!("a record without a string body: {rec:?}");
                };
                out.push(OtlpRecord {
                    event_name: rec.event_name.clone(),
                    resource: resource.clone(),
                    attributes: text(&rec.attributes),
                    event: serde_json::from_str(body).expect("the body is an event"),
                });
            }
        }
    }
    out
}

fn json_attrs(v: &Value) -> BTreeMap<String, String> {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let value = &a["value"];
            let text = value["stringValue"]
                .as_str()
                .or_else(|| value["intValue"].as_str())
                .map_or_else(|| value.to_string(), str::to_string);
            (a["key"].as_str().unwrap_or_default().to_string(), text)
        })
        .collect()
}

fn json_records(body: &[u8]) -> Vec<OtlpRecord> {
    let request: Value = serde_json::from_slice(body).expect("a JSON body");
    let mut out = Vec::new();
    for rl in request["resourceLogs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let resource = json_attrs(&rl["resource"]["attributes"]);
        for sl in rl["scopeLogs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            for rec in sl["logRecords"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let body = rec["body"]["stringValue"].as_str().expect("a string body");
                out.push(OtlpRecord {
                    event_name: rec["eventName"].as_str().unwrap_or_default().to_string(),
                    resource: resource.clone(),
                    attributes: json_attrs(&rec["attributes"]),
                    event: serde_json::from_str(body).expect("the body is an event"),
                });
            }
        }
    }
    out
}

/// The receiver; it runs until the test process ends.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<OtlpRequest>>>,
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1, a port of its own.
    #[must_use]
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind the OTLP receiver: {e}"));
        let addr = listener.local_addr().expect("the receiver's address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&requests);
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if let Some(request) = serve(conn) {
                    kept.lock().expect("lock").push(request);
                }
            }
        });
        Self { addr, requests }
    }

    /// Every request so far.
    #[must_use]
    pub fn requests(&self) -> Vec<OtlpRequest> {
        self.requests.lock().expect("lock").clone()
    }

    /// Every record of every request so far.
    #[must_use]
    pub fn records(&self) -> Vec<OtlpRecord> {
        self.requests()
            .iter()
            .flat_map(OtlpRequest::records)
            .collect()
    }

    /// Waits (up to 30 s) for a request holding a record that satisfies
    /// `matches`, and returns both.
    #[must_use]
    pub fn wait_record(&self, matches: impl Fn(&OtlpRecord) -> bool) -> (OtlpRequest, OtlpRecord) {
        eventually(Duration::from_secs(30), Duration::from_millis(100), || {
            for request in self.requests() {
                if let Some(r) = request.records().into_iter().find(|r| matches(r)) {
                    return Ok((request, r));
                }
            }
            Err(self.requests().len())
        })
        .unwrap_or_else(|n| panic!("no such OTLP record within 30 s ({n} requests arrived)"))
    }
}

/// Reads one request from `conn`, answers 200 and closes.
fn serve(conn: TcpStream) -> Option<OtlpRequest> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    let length: usize = headers.get("content-length")?.parse().ok()?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    if headers.get("content-encoding").map(String::as_str) == Some("gzip") {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .expect("a gzip body");
        body = plain;
    }
    let mut conn = conn;
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    Some(OtlpRequest {
        path,
        headers,
        body,
    })
}
