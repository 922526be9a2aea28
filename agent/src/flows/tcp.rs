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
    events::{monotonic_ns, EventType, FlowEvent, Stage},
    sock_diag,
};

/// Connections followed at most; past it, new ones have their bytes at
/// close only (counted in `untracked`).
const MAX_OPEN: usize = 65_536;

#[derive(Default)]
pub struct OpenConnections {
    follow: Mutex<Followed>,
    /// Whether a failed socket dump was already logged.
    warned: Mutex<bool>,
}

#[derive(Default)]
struct Followed {
    open: HashMap<u64, Open>,
    /// Connections the socket list stopped showing at the last sweep, with
    /// the bytes their summaries reported: the close may still be on its
    /// way through the ring (the socket leaves the list first), and must
    /// not add those bytes again. Kept one sweep.
    gone: HashMap<u64, (u64, u64)>,
}

struct Open {
    /// The connection's `tcp_established` event.
    established: Arc<FlowEvent>,
    /// The counters (sent and acknowledged, received) at establishment
    /// and at the last summary.
    base: (u64, u64),
    last: (u64, u64),
}

impl Open {
    /// The bytes its summaries reported.
    fn summarised(&self) -> (u64, u64) {
        (
            self.last.0.saturating_sub(self.base.0),
            self.last.1.saturating_sub(self.base.1),
        )
    }
}

impl Stage for OpenConnections {
    /// Follows connections from their establishment, and marks on each
    /// close what its summaries did not report, so that every consumer
    /// counts each byte once without keeping state of its own.
    fn amend(&self, batch: &mut [FlowEvent]) {
        if !batch
            .iter()
            .any(|ev| matches!(ev.kind, EventType::TcpEstablished | EventType::TcpClosed))
        {
            return;
        }
        let mut follow = self.follow.lock().unwrap_or_else(PoisonError::into_inner);
        for ev in batch {
            match (ev.kind, ev.bytes_base) {
                (EventType::TcpEstablished, Some(base)) if follow.open.len() < MAX_OPEN => {
                    follow.open.insert(
                        ev.socket_cookie,
                        Open {
                            established: Arc::new(ev.clone()),
                            base,
                            last: base,
                        },
                    );
                }
                (EventType::TcpClosed, _) => {
                    let cookie = ev.socket_cookie;
                    let summarised = follow
                        .open
                        .remove(&cookie)
                        .map(|conn| conn.summarised())
                        .or_else(|| follow.gone.remove(&cookie));
                    if let Some((sent, received)) = summarised {
                        ev.bytes_unsummarised = Some((
                            ev.bytes_sent.unwrap_or(0).saturating_sub(sent),
                            ev.bytes_received.unwrap_or(0).saturating_sub(received),
                        ));
                    }
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
    ///
    /// The events must be published after this returns: a close amended
    /// meanwhile already leaves their bytes out.
    pub fn summaries(&self) -> Vec<FlowEvent> {
        // Not held during the dump: the reader adds connections meanwhile.
        let before: HashSet<u64> = {
            let follow = self.follow.lock().unwrap_or_else(PoisonError::into_inner);
            follow.open.keys().copied().collect()
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
        let mut follow = self.follow.lock().unwrap_or_else(PoisonError::into_inner);
        let now = monotonic_ns();
        let time = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        let mut seen = HashSet::with_capacity(follow.open.len());
        let mut out = Vec::new();
        for socket in sockets {
            let (Some(conn), Some(counters)) =
                (follow.open.get_mut(&socket.cookie), socket.tcp_bytes)
            else {
                continue;
            };
            let bytes = without_fins(socket.state, counters);
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
        follow.forget_unseen(&before, &seen);
        out
    }
}

/// TCP states (`include/net/tcp_states.h`) in which a full socket's
/// counters hold a FIN.
const TCP_FIN_WAIT2: u8 = 5;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

/// The payload in a socket's (bytes acknowledged, bytes received) counters:
/// a FIN takes one sequence number, and the close record leaves both out
/// (agent-ebpf's `fins_counted`), so a summary must too, or the bytes
/// after it would not add up to the close's total. While the socket is
/// still listed, its own FIN is acknowledged only in FIN_WAIT2 (then it
/// leaves from there), and the peer's is in from CLOSE_WAIT on (LAST_ACK,
/// or CLOSING when both sides closed at once).
fn without_fins(state: u8, (acked, received): (u64, u64)) -> (u64, u64) {
    let ours = u64::from(state == TCP_FIN_WAIT2);
    let peers = u64::from(matches!(state, TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING));
    (acked.saturating_sub(ours), received.saturating_sub(peers))
}

impl Followed {
    /// Connections followed `before` the dump and not `seen` in it are gone
    /// (closed, their close not seen yet or lost; or never in this network
    /// namespace): kept one sweep as `gone`, for a close still on its way.
    fn forget_unseen(&mut self, before: &HashSet<u64>, seen: &HashSet<u64>) {
        let unseen: Vec<u64> = self
            .open
            .keys()
            .filter(|c| before.contains(c) && !seen.contains(c))
            .copied()
            .collect();
        self.gone = unseen
            .into_iter()
            .filter_map(|c| self.open.remove(&c).map(|conn| (c, conn.summarised())))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::sample_verdict;

    fn tcp(kind: EventType, cookie: u64, bytes: (u64, u64)) -> FlowEvent {
        let mut ev = sample_verdict();
        ev.kind = kind;
        ev.hook = "sock_ops".into();
        ev.socket_cookie = cookie;
        if kind == EventType::TcpEstablished {
            ev.bytes_base = Some(bytes);
        } else {
            (ev.bytes_sent, ev.bytes_received) = (Some(bytes.0), Some(bytes.1));
        }
        ev
    }

    /// Follows cookie 7 from counters (1, 1), with summaries that reported
    /// the counters up to `last`.
    fn followed(last: (u64, u64)) -> OpenConnections {
        let open = OpenConnections::default();
        open.amend(&mut [tcp(EventType::TcpEstablished, 7, (1, 1))]);
        if let Some(conn) = open.follow.lock().expect("lock").open.get_mut(&7) {
            conn.last = last;
        }
        open
    }

    #[test]
    fn a_close_adds_what_the_summaries_did_not_report() {
        let open = followed((1_001, 11));
        let mut close = [tcp(EventType::TcpClosed, 7, (1_600, 10))];
        open.amend(&mut close);
        assert_eq!(close[0].bytes_unsummarised, Some((600, 0)));
        assert_eq!(close[0].new_bytes(), Some((600, 0)));
        assert_eq!(close[0].bytes_sent, Some(1_600), "the log keeps the total");
        assert!(open.follow.lock().expect("lock").open.is_empty());
    }

    #[test]
    fn a_close_after_the_socket_left_the_list_still_leaves_out_the_summaries() {
        let open = followed((501, 1));
        let before = HashSet::from([7]);
        open.follow
            .lock()
            .expect("lock")
            .forget_unseen(&before, &HashSet::new());
        let mut close = [tcp(EventType::TcpClosed, 7, (800, 0))];
        open.amend(&mut close);
        assert_eq!(close[0].new_bytes(), Some((300, 0)));
    }

    #[test]
    fn a_lost_close_is_forgotten_after_one_more_sweep() {
        let open = followed((501, 1));
        let before = HashSet::from([7]);
        for _ in 0..2 {
            open.follow
                .lock()
                .expect("lock")
                .forget_unseen(&before, &HashSet::new());
        }
        let follow = open.follow.lock().expect("lock");
        assert!(follow.open.is_empty() && follow.gone.is_empty());
    }

    #[test]
    fn a_summary_leaves_out_the_fins_the_counters_hold() {
        let counters = (1_001, 701);
        assert_eq!(without_fins(1, counters), (1_001, 701), "established");
        assert_eq!(
            without_fins(4, counters),
            (1_001, 701),
            "FIN_WAIT1: ours unacknowledged"
        );
        assert_eq!(without_fins(TCP_FIN_WAIT2, counters), (1_000, 701));
        assert_eq!(without_fins(TCP_CLOSE_WAIT, counters), (1_001, 700));
        assert_eq!(without_fins(TCP_LAST_ACK, counters), (1_001, 700));
        assert_eq!(without_fins(TCP_CLOSING, counters), (1_001, 700));
    }

    #[test]
    fn a_connection_not_followed_adds_its_whole_total_at_close() {
        let open = OpenConnections::default();
        let mut close = [tcp(EventType::TcpClosed, 9, (70, 5))];
        open.amend(&mut close);
        assert_eq!(close[0].bytes_unsummarised, None);
        assert_eq!(close[0].new_bytes(), Some((70, 5)));
    }
}
