//! A TCP relay between the agent and a real server that can lose answers:
//! the request reaches the server and is carried out, but the connection
//! is cut before its answer reaches the agent. That is the one failure a
//! retry cannot tell from "never arrived", so it is what an idempotent
//! retry is tested against. Nothing is answered by the relay itself.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// How often the accept loop looks whether the relay was dropped.
const POLL: Duration = Duration::from_millis(50);

/// Relays 127.0.0.1:PORT to `upstream`; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    state: Arc<State>,
    accepting: Option<thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    /// Answers still to lose, and the text a request must contain for its
    /// answer to be lost.
    to_lose: AtomicUsize,
    matching: String,
    /// Answers lost so far.
    lost: AtomicUsize,
    stop: AtomicBool,
}

impl Relay {
    /// Starts a relay to `upstream` that loses the answers of the first
    /// `n` requests whose bytes contain `matching` (an HTTP request line's
    /// query, say), then relays everything faithfully.
    #[must_use]
    pub fn losing_answers(upstream: SocketAddr, matching: &str, n: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("relay: bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("relay: local address: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("relay: nonblocking: {e}"));
        let state = Arc::new(State {
            upstream,
            to_lose: AtomicUsize::new(n),
            matching: matching.to_string(),
            lost: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let accepting = {
            let state = Arc::clone(&state);
            thread::spawn(move || accept_loop(&listener, &state))
        };
        Self {
            addr,
            state,
            accepting: Some(accepting),
        }
    }

    /// Where clients connect.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers lost so far.
    #[must_use]
    pub fn lost(&self) -> usize {
        self.state.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accepting.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, state: &Arc<State>) {
    while !state.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let state = Arc::clone(state);
                thread::spawn(move || relay_connection(client, &state));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => panic!("relay: accept: {e}"),
        }
    }
}

/// One connection: requests flow to the server as they come; each answer
/// flows back unless the request before it matched and answers are still
/// to be lost, in which case both connections are cut as soon as the
/// server starts answering (it has carried the request out by then).
fn relay_connection(client: TcpStream, state: &Arc<State>) {
    let Ok(server) = TcpStream::connect(state.upstream) else {
        return; // the server is away: the client sees the connection close
    };
    let _ = client.set_nonblocking(false);
    let matched = Arc::new(AtomicBool::new(false));
    let (Ok(mut from_client), Ok(mut to_server)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let requests = {
        let (matched, matching) = (Arc::clone(&matched), state.matching.clone());
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = from_client.read(&mut buf) {
                if contains(&buf[..n], matching.as_bytes()) {
                    matched.store(true, Ordering::SeqCst);
                }
                if to_server.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to_server.shutdown(Shutdown::Write);
        })
    };
    let (mut from_server, mut to_client) = (server, client);
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from_server.read(&mut buf) {
        // The answer to a matching request: lose it, if any are left.
        if matched.swap(false, Ordering::SeqCst) && take_one(&state.to_lose) {
            state.lost.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if to_client.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to_client.shutdown(Shutdown::Both);
    let _ = from_server.shutdown(Shutdown::Both);
    let _ = requests.join();
}

fn take_one(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
