//! `bulkhead-probe`: the one program the integration tests run as a "service"
//! process or as a listener on a "remote host".
//!
//! ```text
//! bulkhead-probe [--cgroup DIR] [--netns NAME] COMMAND
//!   tcp-connect ADDR:PORT         connect(), then read the byte the listener sends
//!   tcp-fastopen ADDR:PORT        sendto(MSG_FASTOPEN) instead of connect(), then read
//!   udp-connect ADDR:PORT         connect a UDP socket, send, wait for the echo
//!   udp-sendto ADDR:PORT          unconnected sendto(), wait for the echo
//!   udp-connect-sendto A:P B:Q    connect a UDP socket to A:P, then sendto() B:Q
//!   listen tcp|udp ADDR:PORT      print `ready ADDR:PORT` once bound, then serve
//! ```
//!
//! `--cgroup DIR` writes the probe's own pid into `DIR/cgroup.procs` before
//! any socket exists (a socket belongs to the cgroup it was created in), and
//! `--netns NAME` joins `/var/run/netns/NAME` first.
//!
//! A client command prints one JSON line, `{"ok":true}` or
//! `{"ok":false,"stage":"connect","errno":1,"error":"..."}`, and exits 0:
//! the test judges the outcome. Exit 2 means the probe itself could not run
//! (bad usage, could not join the cgroup or namespace).

mod client;
mod listen;

use std::{fs, io, net::SocketAddr, os::fd::AsRawFd as _, process::ExitCode};

use serde_json::json;

use crate::client::Failure;

const USAGE: &str = "usage: bulkhead-probe [--cgroup DIR] [--netns NAME] \
    (tcp-connect|tcp-fastopen|udp-connect|udp-sendto ADDR:PORT \
    | udp-connect-sendto ADDR:PORT ADDR:PORT | listen tcp|udp ADDR:PORT)";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("bulkhead-probe: {msg}");
            ExitCode::from(2)
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    let mut args = args.into_iter();
    let mut command = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cgroup" => join_cgroup(&args.next().ok_or(USAGE)?)?,
            "--netns" => join_netns(&args.next().ok_or(USAGE)?)?,
            _ => {
                command.push(arg);
                command.extend(args.by_ref());
            }
        }
    }
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let outcome = match command.as_slice() {
        ["tcp-connect", addr] => client::tcp_connect(parse_addr(addr)?),
        ["tcp-fastopen", addr] => client::tcp_fastopen(parse_addr(addr)?),
        ["udp-connect", addr] => client::udp_connect(parse_addr(addr)?),
        ["udp-sendto", addr] => client::udp_sendto(parse_addr(addr)?),
        ["udp-connect-sendto", a, b] => client::udp_connect_sendto(parse_addr(a)?, parse_addr(b)?),
        ["listen", "tcp", addr] => return listen::listen_tcp(parse_addr(addr)?),
        ["listen", "udp", addr] => return listen::listen_udp(parse_addr(addr)?),
        _ => return Err(USAGE.to_owned()),
    };
    report(outcome);
    Ok(())
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("bad address {s:?} (want ADDR:PORT or [ADDR6]:PORT): {e}"))
}

fn join_cgroup(dir: &str) -> Result<(), String> {
    let procs = format!("{dir}/cgroup.procs");
    fs::write(&procs, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot join cgroup: write {procs}: {e}"))
}

fn join_netns(name: &str) -> Result<(), String> {
    let path = format!("/var/run/netns/{name}");
    let ns = fs::File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    // SAFETY: setns on a valid open fd; the probe is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns({path}): {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Prints the outcome as one JSON line.
fn report(outcome: Result<(), Failure>) {
    let line = match outcome {
        Ok(()) => json!({ "ok": true }),
        Err(Failure { stage, err }) => json!({
            "ok": false,
            "stage": stage,
            "errno": err.raw_os_error(),
            "error": err.to_string(),
        }),
    };
    println!("{line}");
}
