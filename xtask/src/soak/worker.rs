//! The soak's workers: child processes (this same xtask binary, hidden
//! `soak-worker` task) that enter a service cgroup and make calls whose
//! verdict the policy fixes, counting every verdict that differs from it.
//! A worker is started inside the soak's network namespace; it moves
//! itself into its cgroup before its first call.

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::policy::PORTS;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Allowed and denied TCP connects and UDP sends, paced, until killed.
    Traffic,
    /// Denied connects to many destinations, as fast as `--rate` lets.
    Flood,
    /// One round of checks, then exit (a fresh cgroup, a reload).
    Probe,
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// The cgroup directory to enter.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Rounds (traffic) or calls (flood) per second.
    #[arg(long, default_value_t = 50)]
    pub rate: u32,
    /// Whether the toggle port is allowed now (probe only).
    #[arg(long)]
    pub toggle_allowed: Option<bool>,
}

/// What a worker counted; printed as one JSON line (every second, and at
/// exit for a probe).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Calls whose verdict matched the policy.
    pub right: u64,
    /// Calls whose verdict differed from it: a bypass or a false denial.
    pub wrong: u64,
    /// Calls that failed for another reason (a timeout, say), no verdict.
    pub errors: u64,
}

impl Tally {
    pub fn to_json(self) -> String {
        serde_json::json!({"right": self.right, "wrong": self.wrong, "errors": self.errors})
            .to_string()
    }

    pub fn from_json(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Self {
            right: v.get("right")?.as_u64()?,
            wrong: v.get("wrong")?.as_u64()?,
            errors: v.get("errors")?.as_u64()?,
        })
    }

    pub fn add(&mut self, other: Self) {
        self.right += other.right;
        self.wrong += other.wrong;
        self.errors += other.errors;
    }

    fn record(&mut self, outcome: Outcome, what: &str) {
        match outcome {
            Outcome::Right => self.right += 1,
            Outcome::Wrong(got) => {
                self.wrong += 1;
                // The parent keeps these lines: they name the bypass.
                println!("{}", serde_json::json!({"wrong": format!("{what}: {got}")}));
            }
            Outcome::Error => self.errors += 1,
        }
    }
}

enum Outcome {
    Right,
    Wrong(String),
    Error,
}

fn judge(allowed: bool, result: std::io::Result<()>) -> Outcome {
    let denied = matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EPERM));
    match (allowed, denied, &result) {
        (true, false, Ok(())) | (false, true, _) => Outcome::Right,
        // No listener, or a full backlog: the hook let it through.
        (true, false, Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Right,
        (true, true, _) => Outcome::Wrong("EPERM".into()),
        (false, false, Ok(())) => Outcome::Wrong("succeeded".into()),
        (false, false, Err(e)) if e.kind() == ErrorKind::ConnectionRefused => {
            Outcome::Wrong("reached the port (connection refused)".into())
        }
        (_, false, Err(_)) => Outcome::Error,
    }
}

const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn tcp(addr: SocketAddrV4, echo: bool) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), CONNECT_TIMEOUT)?;
    if echo {
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        stream.write_all(b"bulkhead-soak\n")?;
        let mut buf = [0u8; 14];
        stream.read_exact(&mut buf)?;
    }
    Ok(())
}

fn udp(socket: &UdpSocket, port: u16) -> std::io::Result<()> {
    socket
        .send_to(b"bulkhead-soak", SocketAddrV4::new(LOOPBACK, port))
        .map(drop)
}

pub fn run(args: &WorkerArgs) -> Result<()> {
    // "0" moves the writing process itself.
    let procs = args.cgroup.join("cgroup.procs");
    fs::write(&procs, "0").with_context(|| format!("enter {}", procs.display()))?;
    let socket = UdpSocket::bind((LOOPBACK, 0)).context("bind a UDP socket")?;
    match args.kind {
        Kind::Probe => {
            let mut tally = Tally::default();
            round(&socket, &mut tally);
            if let Some(allowed) = args.toggle_allowed {
                let addr = SocketAddrV4::new(LOOPBACK, PORTS.toggle);
                // No listener on the toggle port: refused means allowed.
                tally.record(judge(allowed, tcp(addr, false)), "tcp toggle port");
            }
            println!("{}", tally.to_json());
        }
        Kind::Traffic => paced(args.rate, |tally, _| round(&socket, tally)),
        Kind::Flood => paced(args.rate, |tally, i| {
            // A different destination each time: 127.0.0.2-251, 1000 ports.
            let host = Ipv4Addr::new(127, 0, 0, 2 + u8::try_from(i % 250).unwrap_or(0));
            let port = 20_000 + u16::try_from(i % 1000).unwrap_or(0);
            let addr = SocketAddrV4::new(host, port);
            tally.record(judge(false, tcp(addr, false)), "tcp flood");
        }),
    }
    Ok(())
}

/// One of each: allowed TCP with an echo, denied TCP, allowed and denied
/// unconnected UDP.
fn round(socket: &UdpSocket, tally: &mut Tally) {
    let allowed = SocketAddrV4::new(LOOPBACK, PORTS.tcp_allowed);
    tally.record(judge(true, tcp(allowed, true)), "tcp allowed port");
    let denied = SocketAddrV4::new(LOOPBACK, PORTS.denied);
    tally.record(judge(false, tcp(denied, false)), "tcp denied port");
    tally.record(
        judge(true, udp(socket, PORTS.udp_allowed)),
        "udp allowed port",
    );
    tally.record(judge(false, udp(socket, PORTS.denied)), "udp denied port");
}

/// Calls `step` `rate` times a second until the process is killed,
/// printing the running tally every second.
fn paced(rate: u32, mut step: impl FnMut(&mut Tally, u64)) -> ! {
    let mut tally = Tally::default();
    let period = Duration::from_secs(1) / rate.max(1);
    let start = Instant::now();
    let mut next_print = start + Duration::from_secs(1);
    let mut i: u64 = 0;
    loop {
        step(&mut tally, i);
        i += 1;
        let now = Instant::now();
        if now >= next_print {
            println!("{}", tally.to_json());
            next_print += Duration::from_secs(1);
        }
        // Behind schedule (a slow call): catch up without sleeping.
        let due = start + period * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(now) {
            thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: i32) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(code))
    }

    #[test]
    fn a_verdict_is_wrong_exactly_when_it_differs_from_the_policy() {
        assert!(matches!(judge(true, Ok(())), Outcome::Right));
        assert!(matches!(
            judge(true, err(libc::ECONNREFUSED)),
            Outcome::Right
        ));
        assert!(matches!(judge(true, err(libc::EPERM)), Outcome::Wrong(_)));
        assert!(matches!(judge(false, err(libc::EPERM)), Outcome::Right));
        assert!(matches!(judge(false, Ok(())), Outcome::Wrong(_)));
        assert!(matches!(
            judge(false, err(libc::ECONNREFUSED)),
            Outcome::Wrong(_)
        ));
        assert!(matches!(judge(true, err(libc::ETIMEDOUT)), Outcome::Error));
        assert!(matches!(judge(false, err(libc::ETIMEDOUT)), Outcome::Error));
    }

    #[test]
    fn a_tally_survives_its_json_line() {
        let t = Tally {
            right: 7,
            wrong: 1,
            errors: 2,
        };
        assert_eq!(Tally::from_json(&t.to_json()), Some(t));
        assert_eq!(Tally::from_json("{\"wrong\": \"x\"}"), None);
    }
}
