//! A batch as a request body: encoded (JSON or protobuf) and compressed
//! (gzip or not), with the headers that say so.

use std::{io::Write as _, sync::Arc, time::SystemTime};

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression as Level};

use super::{
    config::{Compression, Protocol},
    otlp_json, otlp_proto,
    record::{nanos, record, resource},
};
use crate::events::FlowEvent;

pub struct Body {
    pub bytes: Bytes,
    pub content_type: &'static str,
    /// `Content-Encoding: gzip`.
    pub gzip: bool,
}

/// The body of one request for `batch`.
///
/// # Errors
/// Only if gzip fails to write to memory.
pub fn encode(
    batch: &[Arc<FlowEvent>],
    host: &str,
    protocol: Protocol,
    compression: Compression,
) -> std::io::Result<Body> {
    let observed = nanos(SystemTime::now());
    let records: Vec<_> = batch.iter().map(|ev| record(ev, observed)).collect();
    let resource = resource(host);
    let (raw, content_type) = match protocol {
        Protocol::HttpJson => (
            otlp_json::encode(&resource, &records, observed),
            "application/json",
        ),
        Protocol::HttpProtobuf => (
            otlp_proto::encode(&resource, &records, observed),
            "application/x-protobuf",
        ),
    };
    let (bytes, gzip) = match compression {
        Compression::None => (raw, false),
        Compression::Gzip => {
            // The default level: event batches compress well at it (JSON
            // lines repeat their keys) and it costs little CPU.
            let mut gz = GzEncoder::new(Vec::with_capacity(raw.len() / 4), Level::default());
            gz.write_all(&raw)?;
            (gz.finish()?, true)
        }
    };
    Ok(Body {
        bytes: Bytes::from(bytes),
        content_type,
        gzip,
    })
}
