//! Bytes of open TCP connections, from the event stream: an open
//! connection's byte summaries (flow records from sock_ops, one per
//! interval) each carry the bytes of their interval, its close the total.
//! Consumers that add bytes (the graph, the volume detector) count each
//! byte once by remembering, per connection, what the summaries added.

use std::collections::HashMap;

use super::{EventType, FlowEvent};

/// Open connections remembered at most; past it, a new connection's
/// summaries are not counted and its close adds its whole total.
pub const MAX_OPEN: usize = 65_536;

/// What each open connection's summaries added, by socket cookie.
#[derive(Debug, Clone, Default)]
pub struct OpenBytes {
    added: HashMap<u64, (u64, u64), foldhash::fast::RandomState>,
}

impl OpenBytes {
    /// The (sent, received) bytes `ev` adds: a byte summary its own
    /// (remembered), a close its total less what the summaries added.
    /// `None`: nothing to add (a summary past [`MAX_OPEN`]).
    pub fn new_bytes(&mut self, ev: &FlowEvent) -> Option<(u64, u64)> {
        let (sent, received) = (ev.bytes_sent.unwrap_or(0), ev.bytes_received.unwrap_or(0));
        if ev.kind == EventType::TcpClosed {
            let (done_sent, done_received) = self.added.remove(&ev.socket_cookie).unwrap_or((0, 0));
            return Some((
                sent.saturating_sub(done_sent),
                received.saturating_sub(done_received),
            ));
        }
        let known = self.added.contains_key(&ev.socket_cookie);
        if !known && self.added.len() >= MAX_OPEN {
            return None;
        }
        let done = self.added.entry(ev.socket_cookie).or_default();
        done.0 += sent;
        done.1 += received;
        Some((sent, received))
    }

    pub fn len(&self) -> usize {
        self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
    }
}
