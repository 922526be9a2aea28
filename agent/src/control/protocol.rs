//! The control socket's wire format, shared by the daemon and the CLI.
//!
//! One request per connection: a single JSON object on one line,
//! `{"v":1,"cmd":"flows","follow":true,"service":"billing"}`. The daemon
//! answers with JSON lines: for `flows`, the events themselves (the
//! decision log's records, unchanged), `{"lagged":N}` when a follower
//! missed N events, and a last `{"end":"complete"|"shutdown"}`. A failed
//! request gets one `{"error":"..."}` line. `v` changes only when an old
//! client could misread a new daemon's answer; new commands and new optional
//! fields do not need a new version.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    events::{EventType, FlowEvent, Verdict},
    policy::PolicyError,
};

/// The protocol version this build speaks.
pub const VERSION: u64 = 1;
/// A request longer than this is refused (requests are a few filters).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// A reply line longer than this is refused by the client (an event is
/// well under 1 KiB; a full service graph, 20,000 edges, about 8 MiB).
pub const MAX_REPLY_BYTES: usize = 32 * 1024 * 1024;

/// What a client asks for. The `cmd` field names the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Recent (and with `follow`, live) events.
    Flows(FlowsRequest),
    /// The agent's state: services, policy, reloads, coverage.
    Status(StatusRequest),
    /// Cut a service off, except the listed exceptions.
    Quarantine(QuarantineRequest),
    /// Lift a service's quarantine.
    Release(ReleaseRequest),
    /// The service graph (docs/graph.md).
    Graph(GraphRequest),
    /// One service's blast radius.
    BlastRadius(BlastRadiusRequest),
    /// A policy learned from what a service was observed doing.
    Learn(LearnRequest),
    /// Re-read the policy directory (and re-open the decision log), as
    /// SIGHUP does, and answer with the outcome ([`ReloadAnswer`]).
    Reload(ReloadRequest),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReloadRequest {}

/// The answer to a reload request: whether the policy was applied, and
/// every problem, each where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// `false`: refused, the policy in force unchanged.
    pub applied: bool,
    /// Why it was refused (empty when applied).
    pub errors: Vec<Problem>,
    /// Accepted anyway: policy warnings, insecure files tolerated by
    /// `--allow-insecure-policy-files`, a decision log that cannot be
    /// re-opened.
    pub warnings: Vec<Problem>,
}

/// One problem, located in a policy file when it is about one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The file (or policy directory); absent when the problem is not a
    /// file's (the kernel refused a valid policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// 1-based; 0 when the problem is the file as a whole.
    #[serde(default)]
    pub line: usize,
    #[serde(default)]
    pub column: usize,
    pub message: String,
}

impl Problem {
    /// A problem that is no file's.
    pub fn unlocated(message: String) -> Self {
        Self {
            file: None,
            line: 0,
            column: 0,
            message,
        }
    }
}

impl From<&PolicyError> for Problem {
    fn from(e: &PolicyError) -> Self {
        Self {
            file: Some(e.file.display().to_string()),
            line: e.line,
            column: e.column,
            message: e.message.clone(),
        }
    }
}

/// `FILE:LINE:COL: message`, as the policy loader writes errors; the
/// message alone when no file is concerned.
impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{file}:{}:{}: {}", self.line, self.column, self.message),
            None => f.write_str(&self.message),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraphRequest {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlastRadiusRequest {
    pub service: String,
    /// Only connections seen at or after this time (RFC 3339) count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearnRequest {
    pub service: String,
    /// Only connections seen at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Write `mode = "enforce"` instead of `"audit"`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforce: bool,
    /// Write `exe = [...]` on each rule (the executables seen).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exe: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusRequest {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuarantineRequest {
    pub service: String,
    /// `CIDR[:PORT]` exceptions.
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub service: String,
}

/// `bulkhead flows`: which events, and whether to keep streaming.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
// Unknown fields are refused: a filter the daemon silently ignored would
// show the user events they asked to leave out.
#[serde(default, deny_unknown_fields)]
pub struct FlowsRequest {
    /// After the recent events, stream live ones until the client leaves.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Only this service's events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Only verdict events with this verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Only events of this type.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<EventType>,
    /// At most this many of the recent events (the newest ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<usize>,
}

impl FlowsRequest {
    /// Whether `ev` passes every filter.
    pub fn matches(&self, ev: &FlowEvent) -> bool {
        self.service
            .as_deref()
            .is_none_or(|s| ev.service.as_deref() == Some(s))
            && self.verdict.is_none_or(|v| ev.verdict == Some(v))
            && self.kind.is_none_or(|k| ev.kind == k)
    }
}

/// Why a stream ended normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// Everything asked for was sent.
    Complete,
    /// The daemon is stopping.
    Shutdown,
}

/// One line of a reply. Events are sent as the bare event object, so
/// `--json` output is the decision log's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// The answer to a status, quarantine or release request.
    Result {
        result: Value,
    },
    Event(Box<FlowEvent>),
    Lagged {
        lagged: u64,
    },
    End {
        end: End,
    },
    Error {
        error: String,
    },
}

/// The request as one line, newline included.
pub fn encode_request(req: &Request) -> String {
    #[derive(Serialize)]
    struct Envelope<'a> {
        v: u64,
        #[serde(flatten)]
        req: &'a Request,
    }
    // Serializing plain structs and enums into a String cannot fail.
    let mut line = serde_json::to_string(&Envelope { v: VERSION, req }).unwrap_or_default();
    line.push('\n');
    line
}

/// Parses a request line, checking the version first so that a client
/// from a newer release gets "unsupported version" rather than a confusing
/// field error.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("request is not JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("request must be a JSON object".to_string());
    };
    match fields.remove("v") {
        Some(Value::Number(n)) if n.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "unsupported protocol version {v} (this daemon speaks {VERSION})"
            ))
        }
        None => return Err(format!("request has no \"v\" (use \"v\":{VERSION})")),
    }
    if !fields.contains_key("cmd") {
        return Err("request has no \"cmd\"".to_string());
    }
    serde_json::from_value(Value::Object(fields)).map_err(|e| format!("bad request: {e}"))
}

/// A reply line (without its newline).
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_default()
}

/// An event as a reply line (without its newline), without copying it into
/// a [`Reply`].
pub fn encode_event(ev: &FlowEvent) -> Vec<u8> {
    serde_json::to_vec(ev).unwrap_or_default()
}

pub fn decode_reply(line: &[u8]) -> Result<Reply, serde_json::Error> {
    serde_json::from_slice(line)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) use crate::events::sample_verdict as event;

    #[test]
    fn request_round_trips_with_version_first() {
        let req = Request::Flows(FlowsRequest {
            follow: true,
            service: Some("billing".to_string()),
            verdict: Some(Verdict::Deny),
            kind: None,
            last: None,
        });
        let line = encode_request(&req);
        assert_eq!(
            line,
            "{\"v\":1,\"cmd\":\"flows\",\"follow\":true,\"service\":\"billing\",\"verdict\":\"deny\"}\n"
        );
        assert_eq!(decode_request(line.as_bytes()), Ok(req));
    }

    #[test]
    fn minimal_request_has_defaults() {
        let req = decode_request(br#"{"v":1,"cmd":"flows"}"#).expect("valid");
        assert_eq!(req, Request::Flows(FlowsRequest::default()));
        let req = decode_request(br#"{"cmd":"flows","type":"tcp_closed","last":5,"v":1}"#)
            .expect("valid");
        assert_eq!(
            req,
            Request::Flows(FlowsRequest {
                kind: Some(EventType::TcpClosed),
                last: Some(5),
                ..FlowsRequest::default()
            })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let err = |line: &str| decode_request(line.as_bytes()).expect_err(line);
        assert!(err("flows").starts_with("request is not JSON"));
        assert_eq!(err("[1]"), "request must be a JSON object");
        assert!(err(r#"{"cmd":"flows"}"#).contains("no \"v\""));
        assert_eq!(
            err(r#"{"v":2,"cmd":"flows"}"#),
            "unsupported protocol version 2 (this daemon speaks 1)"
        );
        assert!(err(r#"{"v":"1","cmd":"flows"}"#).starts_with("unsupported protocol version"));
        assert_eq!(err(r#"{"v":1}"#), "request has no \"cmd\"");
        assert!(err(r#"{"v":1,"cmd":"statuz"}"#).contains("unknown variant `statuz`"));
        assert!(err(r#"{"v":1,"cmd":"flows","folow":true}"#).contains("unknown field `folow`"));
        assert!(err(r#"{"v":1,"cmd":"flows","verdict":"drop"}"#).contains("unknown variant"));
    }

    #[test]
    fn replies_encode_and_decode() {
        let ev = event();
        let line = encode_event(&ev);
        assert_eq!(
            decode_reply(&line).expect("event"),
            Reply::Event(Box::new(ev.clone()))
        );
        // An event reply is exactly the decision log's record.
        assert_eq!(line, serde_json::to_vec(&ev).expect("event serializes"));
        for (reply, text) in [
            (Reply::Lagged { lagged: 12 }, r#"{"lagged":12}"#),
            (Reply::End { end: End::Complete }, r#"{"end":"complete"}"#),
            (Reply::End { end: End::Shutdown }, r#"{"end":"shutdown"}"#),
            (
                Reply::Error {
                    error: "nope".to_string(),
                },
                r#"{"error":"nope"}"#,
            ),
        ] {
            assert_eq!(String::from_utf8_lossy(&encode_reply(&reply)), text);
            assert_eq!(decode_reply(text.as_bytes()).expect(text), reply);
        }
        assert!(decode_reply(br#"{"surprise":1}"#).is_err());
    }

    #[test]
    fn reload_request_and_answer_round_trip() {
        let line = encode_request(&Request::Reload(ReloadRequest {}));
        assert_eq!(line, "{\"v\":1,\"cmd\":\"reload\"}\n");
        assert_eq!(
            decode_request(line.as_bytes()),
            Ok(Request::Reload(ReloadRequest {}))
        );
        let answer = ReloadAnswer {
            applied: false,
            errors: vec![
                Problem::from(&PolicyError {
                    file: "/etc/bulkhead/policies/web.toml".into(),
                    line: 6,
                    column: 9,
                    message: "port 0 is not a port".to_string(),
                }),
                Problem::unlocated("the kernel said no".to_string()),
            ],
            warnings: vec![],
        };
        let json = serde_json::to_string(&answer).expect("serializes");
        assert_eq!(
            json,
            r#"{"applied":false,"errors":[{"file":"/etc/bulkhead/policies/web.toml","line":6,"column":9,"message":"port 0 is not a port"},{"line":0,"column":0,"message":"the kernel said no"}],"warnings":[]}"#
        );
        assert_eq!(
            serde_json::from_str::<ReloadAnswer>(&json).expect("parses"),
            answer
        );
        assert_eq!(
            answer.errors[0].to_string(),
            "/etc/bulkhead/policies/web.toml:6:9: port 0 is not a port"
        );
        assert_eq!(answer.errors[1].to_string(), "the kernel said no");
    }

    #[test]
    fn filters() {
        let ev = event();
        let all = FlowsRequest::default();
        assert!(all.matches(&ev));
        let f = |service: Option<&str>, verdict, kind| FlowsRequest {
            service: service.map(str::to_string),
            verdict,
            kind,
            ..FlowsRequest::default()
        };
        assert!(f(
            Some("billing"),
            Some(Verdict::Deny),
            Some(EventType::Verdict)
        )
        .matches(&ev));
        assert!(!f(Some("search"), None, None).matches(&ev));
        assert!(!f(None, Some(Verdict::Allow), None).matches(&ev));
        assert!(!f(None, None, Some(EventType::TcpClosed)).matches(&ev));
        // A verdict filter leaves out lifecycle events (they have none).
        let closed = FlowEvent {
            kind: EventType::TcpClosed,
            verdict: None,
            ..ev.clone()
        };
        assert!(!f(None, Some(Verdict::Deny), None).matches(&closed));
        // Unmanaged processes have no service.
        let unmanaged = FlowEvent {
            service: None,
            ..ev
        };
        assert!(!f(Some("billing"), None, None).matches(&unmanaged));
    }
}
