//! Byte summaries of open TCP connections: a pooled database connection
//! may stay open for days, and its `tcp_closed` (with the bytes) comes only
//! at the end. Every sweep, each connection the agent saw established and
//! not yet closed gets a `flow` event with the bytes it sent and received
//! since the previous one, read from the kernel's socket list (sock_diag,
//! `tcpi_bytes_acked`/`tcpi_bytes_received`, the counters the closing
//! record uses). Only this network namespace's sockets are listed: a
//! connection made in another one has its bytes at close only.
//!
//! What it follows is saved in the state directory when the agent stops
//! (`open-connections.json`) and read back by the next agent of the same
//! boot, before it reads anything: the closes the old programs left in
//! their ring then add only what no summary reported, and the connections
//! still open get their summaries from the new agent.

use std::{
    borrow::Cow,
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex, PoisonError},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    events::{monotonic_ns, EventType, FlowEvent, Stage},
    sock_diag::{self, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_FIN_WAIT2, TCP_LAST_ACK},
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

/// The file in the state directory.
pub const FILE: &str = "open-connections.json";

#[derive(Debug, Serialize, Deserialize)]
struct Saved<'a> {
    /// Socket cookies are numbered again from each boot.
    boot_id: String,
    /// Established first, first.
    open: Cow<'a, [SavedOpen]>,
    /// Connections gone from the socket list whose close may still be in
    /// the ring: the bytes their summaries reported.
    gone: Vec<(u64, (u64, u64))>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedOpen {
    cookie: u64,
    established: FlowEvent,
    base: (u64, u64),
    last: (u64, u64),
}

impl OpenConnections {
    /// Writes what it follows to `state_dir`, whole or not at all; the
    /// connections established first are left out if the file would pass
    /// the state-file limit (their closes then add their whole totals, and
    /// they get no more summaries).
    pub fn save(&self, state_dir: &Path) {
        let (mut open, gone) = {
            let follow = self.follow.lock().unwrap_or_else(PoisonError::into_inner);
            let open: Vec<SavedOpen> = follow
                .open
                .iter()
                .map(|(cookie, conn)| SavedOpen {
                    cookie: *cookie,
                    established: FlowEvent::clone(&conn.established),
                    base: conn.base,
                    last: conn.last,
                })
                .collect();
            let gone: Vec<(u64, (u64, u64))> = follow.gone.iter().map(|(c, b)| (*c, *b)).collect();
            (open, gone)
        };
        open.sort_by_key(|o| o.established.ktime_ns);
        let boot_id = crate::state_file::boot_id();
        let to_bytes = |kept: &[SavedOpen]| {
            serde_json::to_vec(&Saved {
                boot_id: boot_id.clone(),
                open: Cow::Borrowed(kept),
                gone: gone.clone(),
            })
        };
        let write = || -> std::io::Result<()> {
            let (bytes, left_out) =
                crate::state_file::fitting(&open, crate::state_file::MAX_BYTES, to_bytes)
                    .map_err(std::io::Error::other)?;
            if left_out > 0 {
                warn!(left_out, "the oldest open TCP connections are not saved for the next agent: the file would pass the state-file limit");
            }
            crate::state_file::write_atomic(state_dir, FILE, &bytes, 0o600)
        };
        if let Err(e) = write() {
            warn!(dir = %state_dir.display(), "cannot save the open TCP connections for the next agent: {e}; their closes will count their whole bytes");
        }
    }

    /// What a previous agent of this boot saved in `state_dir`; nothing if
    /// there is no file or it is from another boot. A damaged file is set
    /// aside (logged, counted) and restores nothing. A file read is
    /// removed: if this agent stops without saving (a crash), the next one
    /// must not restore counters this one has summarised past.
    pub fn load(state_dir: &Path) -> Self {
        let Some(saved) = crate::state_file::load(
            state_dir,
            FILE,
            |bytes| serde_json::from_slice::<Saved>(bytes).map_err(|e| e.to_string()),
            "the TCP connections a previous agent followed get no more byte summaries, and their closes count their whole bytes",
        ) else {
            return Self::default();
        };
        if !removed(state_dir) {
            return Self::default();
        }
        if saved.boot_id != crate::state_file::boot_id() {
            info!("open TCP connections saved before a reboot: not followed (socket cookies start again)");
            return Self::default();
        }
        Self::restored(saved)
    }

    fn restored(saved: Saved) -> Self {
        let open: HashMap<u64, Open> = saved
            .open
            .into_owned()
            .into_iter()
            .take(MAX_OPEN)
            .map(|o| {
                (
                    o.cookie,
                    Open {
                        established: Arc::new(o.established),
                        base: o.base,
                        last: o.last,
                    },
                )
            })
            .collect();
        info!(
            connections = open.len(),
            "open TCP connections of the previous agent followed"
        );
        Self {
            follow: Mutex::new(Followed {
                open,
                gone: saved.gone.into_iter().collect(),
            }),
            warned: Mutex::new(false),
        }
    }
}

/// Removes the file read; false (warned) if it stays: what it holds may be
/// stale by the time another agent reads it, so it restores nothing.
fn removed(state_dir: &Path) -> bool {
    match std::fs::remove_file(state_dir.join(FILE)) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            warn!(dir = %state_dir.display(), "cannot remove {FILE} after reading it: {e}; the previous agent's open TCP connections are not followed");
            false
        }
    }
}

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
    fn what_it_follows_is_saved_and_read_back_by_the_next_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = followed((1_001, 11));
        open.follow.lock().expect("lock").gone.insert(9, (300, 0));
        open.save(dir.path());
        let next = OpenConnections::load(dir.path());
        assert!(!dir.path().join(FILE).exists(), "read once");
        // The close the old programs left in the ring adds only the rest.
        let mut closes = [
            tcp(EventType::TcpClosed, 7, (1_600, 10)),
            tcp(EventType::TcpClosed, 9, (800, 0)),
        ];
        next.amend(&mut closes);
        assert_eq!(closes[0].new_bytes(), Some((600, 0)));
        assert_eq!(closes[1].new_bytes(), Some((500, 0)));
    }

    #[test]
    fn connections_saved_in_another_boot_are_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let saved = Saved {
            boot_id: "another boot".into(),
            open: Cow::Owned(vec![SavedOpen {
                cookie: 7,
                established: tcp(EventType::TcpEstablished, 7, (1, 1)),
                base: (1, 1),
                last: (501, 1),
            }]),
            gone: Vec::new(),
        };
        crate::state_file::write_atomic(
            dir.path(),
            FILE,
            &serde_json::to_vec(&saved).expect("json"),
            0o600,
        )
        .expect("write");
        let next = OpenConnections::load(dir.path());
        assert!(next.follow.lock().expect("lock").open.is_empty());
    }

    #[test]
    fn a_damaged_file_is_set_aside_and_follows_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::state_file::write_atomic(dir.path(), FILE, b"{\"boot_id\":", 0o600).expect("write");
        let next = OpenConnections::load(dir.path());
        assert!(next.follow.lock().expect("lock").open.is_empty());
        assert!(!dir.path().join(FILE).exists(), "set aside");
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
