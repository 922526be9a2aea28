//! A batch as a request body: encoded (JSON or protobuf) and compressed
//! (gzip or not), with the headers that say so.

use std::{io::Write as _, sync::Arc, time::SystemTime};

use bytes::Bytes;
use flate2::{write::GzEncoder, Compression as Level};

use super::{
    config::{Compression, Protocol},
    otlp,
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
/// Only if JSON or gzip fails to write to memory.
pub fn encode(
    batch: &[Arc<FlowEvent>],
    host: &str,
    protocol: Protocol,
    compression: Compression,
) -> std::io::Result<Body> {
    let observed = nanos(SystemTime::now());
    let records: Vec<_> = batch.iter().map(|ev| record(ev, observed)).collect();
    let request = otlp::request(&resource(host), &records, observed);
    let (raw, content_type) = match protocol {
        Protocol::HttpJson => (otlp::json(&request)?, "application/json"),
        Protocol::HttpProtobuf => (otlp::protobuf(&request), "application/x-protobuf"),
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
