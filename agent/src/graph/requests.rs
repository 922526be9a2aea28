//! The daemon's answers to `graph`, `blast_radius` and `learn` requests on
//! the control socket (called by the engine, which owns the policy).

use serde_json::Value;

use super::{blast, view, Shared};
use crate::{
    control::protocol::{BlastRadiusRequest, LearnRequest},
    policy::PolicySet,
};

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode the answer: {e}"))
}

fn check_since(since: Option<&String>) -> Result<(), String> {
    match since {
        Some(t) if humantime::parse_rfc3339_weak(t).is_err() => {
            Err(format!("since: {t:?} is not an RFC 3339 time"))
        }
        _ => Ok(()),
    }
}

pub fn graph(shared: &Shared, policy: &PolicySet) -> Value {
    let v = view::build(&shared.graph(), policy);
    serde_json::to_value(&v).unwrap_or(Value::Null)
}

/// # Errors
/// Unknown service or a bad `since`.
pub fn blast_radius(
    shared: &Shared,
    policy: &PolicySet,
    r: &BlastRadiusRequest,
) -> Result<Value, String> {
    check_since(r.since.as_ref())?;
    let b = blast::compute(&shared.graph(), policy, &r.service, r.since.as_deref())?;
    to_value(&b)
}

/// # Errors
/// Unknown service, a bad `since`, or nothing observed.
pub fn learn(shared: &Shared, policy: &PolicySet, r: &LearnRequest) -> Result<Value, String> {
    check_since(r.since.as_ref())?;
    let l = super::learn::learn(
        &shared.graph(),
        policy,
        &r.service,
        r.since.as_deref(),
        super::learn::Options {
            enforce: r.enforce,
            exe: r.exe,
        },
    )?;
    to_value(&l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::protocol::{encode_reply, Reply, MAX_REPLY_BYTES},
        events::Verdict,
        graph::{model::MAX_EDGES, tests::connect},
    };

    #[test]
    fn a_full_graph_fits_in_one_reply_line() {
        let shared = Shared::default();
        {
            let mut g = shared.graph();
            for i in 0..MAX_EDGES {
                let port = u16::try_from(i % 60_000 + 1).expect("port");
                let service = format!("service-with-a-long-name-{}", i / 60_000);
                g.observe(&connect(
                    &service,
                    ("2001:db8:ffff:ffff::1", port),
                    Verdict::Allow,
                ));
            }
        }
        let result = graph(&shared, &PolicySet::default());
        let line = encode_reply(&Reply::Result { result });
        assert!(
            line.len() < MAX_REPLY_BYTES / 2,
            "{} bytes for {MAX_EDGES} edges",
            line.len()
        );
    }

    #[test]
    fn requests_round_trip_on_the_wire() {
        use crate::control::protocol::{decode_request, encode_request, GraphRequest, Request};
        let blast = Request::BlastRadius(BlastRadiusRequest {
            service: "web".to_string(),
            since: None,
        });
        assert_eq!(
            encode_request(&blast),
            "{\"v\":1,\"cmd\":\"blast_radius\",\"service\":\"web\"}\n"
        );
        let learn = Request::Learn(LearnRequest {
            service: "web".to_string(),
            since: Some("2026-11-29T02:00:00Z".to_string()),
            enforce: true,
            exe: true,
        });
        for req in [Request::Graph(GraphRequest {}), blast, learn] {
            let line = encode_request(&req);
            assert_eq!(decode_request(line.trim_end().as_bytes()), Ok(req));
        }
        assert!(decode_request(br#"{"v":1,"cmd":"learn"}"#)
            .expect_err("no service")
            .contains("service"));
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let shared = Shared::default();
        let set = PolicySet::default();
        let bad_since = BlastRadiusRequest {
            service: "a".to_string(),
            since: Some("yesterday".to_string()),
        };
        assert!(blast_radius(&shared, &set, &bad_since)
            .expect_err("bad since")
            .contains("RFC 3339"));
        let unknown = LearnRequest {
            service: "zz".to_string(),
            ..LearnRequest::default()
        };
        assert!(learn(&shared, &set, &unknown)
            .expect_err("unknown")
            .contains("no service named"));
    }
}
