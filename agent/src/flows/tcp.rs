//! Byte summaries of open TCP connections: a pooled database connection
//! may stay open for days, and its `tcp_closed` (with the bytes) comes only
//! at the end. Every sweep, each connection the agent saw established and
//! not yet closed gets a `flow` event with the bytes it sent and received
//! since the previous one, read from the kernel's socket list (sock_diag,
//! `tcpi_bytes_acked`/`tcpi_bytes_received`, the counters the closing
//! record uses). Only this network namespace's sockets are listed: a
//! connection made in another one has its bytes at close only.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
};

use tracing::warn;

use crate::{
    events::{monotonic_ns, EventType, FlowEvent, Tap},
    sock_diag,
};

/// Connections followed at most; past it, new ones have their bytes at
/// close only (counted in `untracked`).
const MAX_OPEN: usize = 65_536;

#[derive(Default)]
pub struct OpenConnections {
    open: Mutex<HashMap<u64, Open>>,
    /// Whether a failed socket dump was already logged.
    warned: Mutex<bool>,
}

struct Open {
    /// The connection's `tcp_established` event.
    established: Arc<FlowEvent>,
    /// The counters (sent and acknowledged, received) at the last summary.
    last: (u64, u64),
}

impl Tap for OpenConnections {
    fn observe(&self, batch: &[Arc<FlowEvent>]) {
        if !batch
            .iter()
            .any(|ev| matches!(ev.kind, EventType::TcpEstablished | EventType::TcpClosed))
        {
            return;
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for ev in batch {
            match (ev.kind, ev.bytes_base) {
                (EventType::TcpEstablished, Some(base)) if open.len() < MAX_OPEN => {
                    open.insert(
                        ev.socket_cookie,
                        Open {
                            established: Arc::clone(ev),
                            last: base,
                        },
                    );
                }
                (EventType::TcpClosed, _) => {
                    open.remove(&ev.socket_cookie);
                }
                _ => {}
            }
        }
    }
}

impl OpenConnections {
    /// A `flow` event per followed connection that sent or received since
    /// the last; connections the socket list no longer has (closed, or in
    /// another network namespace) are no longer followed.
    pub fn summaries(&self) -> Vec<FlowEvent> {
        // Not held during the dump: the reader adds connections meanwhile.
        let before: HashSet<u64> = {
            let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            open.keys().copied().collect()
        };
        if before.is_empty() {
            return Vec::new();
        }
        let mut sockets = Vec::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            if let Err(e) = sock_diag::dump_with(
                family as u8,
                libc::IPPROTO_TCP as u8,
                sock_diag::FULL_SOCKET_STATES,
                sock_diag::EXT_TCP_INFO,
                &mut sockets,
            ) {
                let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
                if !*warned {
                    warn!("cannot list the TCP sockets for the byte summaries of open connections: {e}; their bytes come at close");
                    *warned = true;
                }
                return Vec::new();
            }
        }
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let now = monotonic_ns();
        let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        let mut seen = HashSet::with_capacity(open.len());
        let mut out = Vec::new();
        for socket in sockets {
            let (Some(conn), Some(bytes)) = (open.get_mut(&socket.cookie), socket.tcp_bytes) else {
                continue;
            };
            seen.insert(socket.cookie);
            let sent = bytes.0.saturating_sub(conn.last.0);
            let received = bytes.1.saturating_sub(conn.last.1);
            if sent == 0 && received == 0 {
                continue;
            }
            conn.last = bytes;
            let mut ev = FlowEvent::clone(&conn.established);
            ev.kind = EventType::Flow;
            ev.time.clone_from(&time);
            ev.ktime_ns = now;
            ev.bytes_sent = Some(sent);
            ev.bytes_received = Some(received);
            ev.bytes_base = None;
            out.push(ev);
        }
        // Gone from the list since the last look (closed, its close event
        // not seen; or never in this network namespace).
        open.retain(|cookie, _| seen.contains(cookie) || !before.contains(cookie));
        out
    }
}
