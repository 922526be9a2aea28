//! `cargo xtask bench-events`: the event pipeline's throughput. How many
//! decisions per second reach the JSON decision log with zero loss, what
//! the agent spends on them (CPU seconds per 100,000 events, resident
//! memory), next to the rate at which the load generator alone can call
//! connect() on this machine (the ceiling).
//!
//! Each decision is one UDP connect() of a managed service to an allowed
//! loopback port: one verdict event, no packet. Each call goes to an
//! address of its own in 127.0.0.0/8, so that each is a new flow with a
//! record (the kernel counts repeated calls of a flow without one: this
//! measures the records' path). The load generator is a
//! forked child in the service's cgroup, paced to a target rate, then
//! unthrottled. Last, the agent's own drain capacity: it is held stopped
//! while the generator fills a large ring buffer, then let go and timed
//! until every record is in the log.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use super::{
    daemon::{rss_kib, Daemon},
    fork,
    sandbox::{cgroup2_mount, Cgroup, PREFIX},
};
use crate::{build, util::target_dir, util::workspace_root};

/// The allowed port the decisions go to (nothing needs to listen: UDP
/// connect() sends no packet).
const PORT: u16 = 6000;
/// Each rate runs this long.
const RUN: Duration = Duration::from_secs(2);
/// Target rates tried, per second, then the generator unthrottled.
const LADDER: [u64; 8] = [
    10_000, 25_000, 50_000, 75_000, 100_000, 150_000, 200_000, 300_000,
];
/// Ceiling runs and drain runs; the median counts.
const CEILING_ROUNDS: usize = 3;
const DRAIN_ROUNDS: usize = 3;
/// Ring buffer for the drain measurement: room for about 1.8 million
/// records, so the backlog built while the agent is stopped is never lost.
const DRAIN_RING_BYTES: u64 = 256 << 20;
/// How long the generator fills the ring while the agent is stopped.
const FILL: Duration = Duration::from_secs(1);
/// A step with this target runs the generator as fast as it can.
const UNTHROTTLED: u64 = u64::MAX;

#[derive(clap::Args, Debug)]
pub struct BenchEventsArgs {
    /// Write the results into this file's events section
    /// [default: BENCHMARKS.md].
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// One rate's outcome.
struct Step {
    target: u64,
    sent: u64,
    achieved: f64,
    logged: u64,
    lost: u64,
    cpu_s: f64,
}

/// The agent draining a backlog it did not read while stopped.
struct Drain {
    backlog: u64,
    lost: u64,
    seconds: f64,
    cpu_s: f64,
}

impl Drain {
    fn rate(&self) -> f64 {
        self.backlog as f64 / self.seconds.max(1e-9)
    }
}

/// What the agent under test reads and writes.
struct Setup {
    config: PathBuf,
    events: PathBuf,
    metrics_port: u16,
}

pub fn run(args: &BenchEventsArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "bench-events needs root");
    build::run(true)?;
    let bin = target_dir()?.join("release").join("bulkhead");
    let mount = cgroup2_mount()?;
    let work = tempfile::Builder::new()
        .prefix("bulkhead-bench-events")
        .tempdir()
        .context("create a work directory")?;
    let rel = format!("{PREFIX}events-{}", std::process::id());
    let cgroup = Cgroup::create(&mount, &rel)?;

    let mut ceilings = Vec::new();
    for _ in 0..CEILING_ROUNDS {
        ceilings.push(generate(&cgroup.path, UNTHROTTLED, RUN)? as f64 / RUN.as_secs_f64());
    }
    ceilings.sort_by(f64::total_cmp);
    let ceiling_rate = ceilings[CEILING_ROUNDS / 2];
    eprintln!("xtask bench-events: ceiling (no agent) {ceiling_rate:.0} connect()/s");

    let policies = work.path().join("policies");
    fs::create_dir_all(&policies)?;
    fs::write(
        policies.join("svc.toml"),
        format!(
            "cgroup = \"/{}\"\nmode = \"enforce\"\n[[egress]]\nto = [\"127.0.0.0/8\"]\nports = [{PORT}]\nprotocol = \"udp\"\n",
            rel
        ),
    )?;

    // The ladder, with the default ring buffer.
    let ladder_dir = work.path().join("ladder");
    let setup = write_setup(&ladder_dir, None)?;
    let daemon = Daemon::start(&bin, &setup.config, &policies, &ladder_dir)?;
    let pid = daemon.pid().context("the agent exited")?;
    let mut log = LogCounter::new(&setup.events);
    let mut steps = Vec::new();
    let rates = LADDER
        .iter()
        .copied()
        .filter(|r| (*r as f64) < ceiling_rate)
        .chain([UNTHROTTLED]);
    for target in rates {
        let lost_before = lost(setup.metrics_port)?;
        let logged_before = log.verdicts()?;
        let cpu_before = cpu_ticks(pid)?;
        let sent = generate(&cgroup.path, target, RUN)?;
        let logged = log.settle(logged_before + sent)? - logged_before;
        let cpu_s = (cpu_ticks(pid)? - cpu_before) as f64 / ticks_per_second();
        let lost = lost(setup.metrics_port)? - lost_before;
        let step = Step {
            target,
            sent,
            achieved: sent as f64 / RUN.as_secs_f64(),
            logged,
            lost,
            cpu_s,
        };
        eprintln!(
            "xtask bench-events: target {:>10} achieved {:>9.0}/s logged {} of {} lost {}",
            target_label(step.target),
            step.achieved,
            step.logged,
            step.sent,
            step.lost
        );
        steps.push(step);
    }
    let rss_kib = rss_kib(pid);
    daemon.stop()?;

    // Drain capacity, with a ring large enough for the whole backlog.
    let drain_dir = work.path().join("drain");
    let setup = write_setup(&drain_dir, Some(DRAIN_RING_BYTES))?;
    let daemon = Daemon::start(&bin, &setup.config, &policies, &drain_dir)?;
    let mut drains = Vec::new();
    for _ in 0..DRAIN_ROUNDS {
        let d = drain(&daemon, &setup, &cgroup.path)?;
        eprintln!(
            "xtask bench-events: drained a backlog of {} in {:.3} s: {:.0} events/s, lost {}",
            d.backlog,
            d.seconds,
            d.rate(),
            d.lost
        );
        drains.push(d);
    }
    daemon.stop()?;
    drains.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    let drain_range = (drains[0].rate(), drains[DRAIN_ROUNDS - 1].rate());
    let drain = drains.swap_remove(DRAIN_ROUNDS / 2);

    let text = report(ceiling_rate, &steps, &drain, drain_range, rss_kib);
    println!("{text}");
    let path = args
        .output
        .clone()
        .unwrap_or_else(|| workspace_root().join("BENCHMARKS.md"));
    write_section(&path, &text)?;
    eprintln!(
        "xtask bench-events: wrote the events section of {}",
        path.display()
    );
    Ok(())
}

/// Writes the agent's config into `dir`.
fn write_setup(dir: &Path, ring_bytes: Option<u64>) -> Result<Setup> {
    fs::create_dir_all(dir)?;
    let metrics_port = free_port()?;
    let events = dir.join("events.jsonl");
    let config = dir.join("bulkhead.toml");
    let ring = ring_bytes.map_or(String::new(), |b| format!("ring_buffer_bytes = {b}\n"));
    fs::write(
        &config,
        format!(
            "[events]\nsink = {:?}\n{ring}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[control]\nsocket = {:?}\n",
            events.display().to_string(),
            dir.join("control.sock").display().to_string()
        ),
    )?;
    Ok(Setup {
        config,
        events,
        metrics_port,
    })
}

/// Stops the agent (SIGSTOP), fills its ring with the generator for
/// [`FILL`], lets it go (SIGCONT) and times it until every record is in
/// the log.
fn drain(daemon: &Daemon, setup: &Setup, cgroup: &Path) -> Result<Drain> {
    let pid = daemon.pid().context("the agent exited")?;
    let pid = libc::pid_t::try_from(pid).context("pid")?;
    let mut log = LogCounter::new(&setup.events);
    let lost_before = lost(setup.metrics_port)?;
    let logged_before = log.verdicts()?;
    // SAFETY: signalling our own child.
    ensure!(unsafe { libc::kill(pid, libc::SIGSTOP) } == 0, "SIGSTOP");
    let sent = generate(cgroup, UNTHROTTLED, FILL);
    let cpu_before = cpu_ticks(pid as u32);
    let started = Instant::now();
    // SAFETY: as above; sent even when the generator failed.
    ensure!(unsafe { libc::kill(pid, libc::SIGCONT) } == 0, "SIGCONT");
    let (sent, cpu_before) = (sent?, cpu_before?);
    let want = logged_before + sent;
    let mut got = logged_before;
    let deadline = started + Duration::from_secs(60);
    while got < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        got = log.verdicts()?;
    }
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        got >= want,
        "the agent logged {} of {sent} within 60 s",
        got - logged_before
    );
    Ok(Drain {
        backlog: sent,
        lost: lost(setup.metrics_port)? - lost_before,
        seconds,
        cpu_s: (cpu_ticks(pid as u32)? - cpu_before) as f64 / ticks_per_second(),
    })
}

fn target_label(target: u64) -> String {
    if target == UNTHROTTLED {
        "unthrottled".to_string()
    } else {
        format!("{target}/s")
    }
}

fn report(
    ceiling: f64,
    steps: &[Step],
    drain: &Drain,
    drain_range: (f64, f64),
    rss_kib: Option<u64>,
) -> String {
    let zero_loss = |s: &&Step| s.lost == 0 && s.logged == s.sent;
    let best = steps
        .iter()
        .filter(zero_loss)
        .map(|s| s.achieved)
        .fold(0.0, f64::max);
    let top = steps.last();
    let mut out = String::from(
        "## Event pipeline throughput\n\n\
         Reproduce: `cargo xtask bench-events` (as root; writes this section). One verdict event per \
         UDP connect() of a managed service to an allowed loopback address, a new one (a new flow) \
         per call, so that every call has a record; a forked load generator in the \
         service's cgroup, paced to each target rate for 2 s, then unthrottled; `logged` = verdict lines \
         in the JSON decision log, `lost` = `bulkhead_events_lost_total` growth; CPU = the agent's \
         user+system time over the step. Drain capacity: the agent is held with SIGSTOP while the \
         unthrottled generator fills a 256 MiB ring for 1 s, then let go and timed until every record \
         is in the log (three times).\n\n",
    );
    out.push_str(&format!(
        "- Ceiling (the load generator alone, no agent; median of {CEILING_ROUNDS} runs of 2 s): **{ceiling:.0} connect()/s**.\n"
    ));
    if let Some(top) = top {
        out.push_str(&format!(
            "- The same generator unthrottled while the agent enforces and logs: {:.0} connect()/s ({:.0}% of the ceiling; \
             with the agent held stopped it makes {:.0}/s, so the difference is the connect hook's own cost per call, not the agent's \
             share of the CPU); {} of {} logged, {} lost: {}.\n",
            top.achieved,
            100.0 * top.achieved / ceiling.max(1.0),
            drain.backlog as f64 / FILL.as_secs_f64(),
            top.logged,
            top.sent,
            top.lost,
            if zero_loss(&top) { "**zero loss at the highest rate this machine can produce**" } else { "events lost" },
        ));
    }
    out.push_str(&format!(
        "- Highest rate with zero loss: **{best:.0} events/s**.\n\
         - Drain capacity (the agent alone on a backlog; median of {DRAIN_ROUNDS} runs, which ranged {:.0}–{:.0}/s): **{:.0} events/s** ({:.2}× the ceiling): {} records in {:.3} s, {:.2} CPU s ({:.3} CPU s per 100,000), {} lost.\n\
         - Agent resident memory after the ladder: {}.\n\n",
        drain_range.0,
        drain_range.1,
        drain.rate(),
        drain.rate() / ceiling.max(1.0),
        drain.backlog,
        drain.seconds,
        drain.cpu_s,
        drain.cpu_s / (drain.backlog.max(1) as f64) * 100_000.0,
        drain.lost,
        rss_kib.map_or("unknown".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
    ));
    out.push_str("| target /s | achieved /s | sent | logged | lost | agent CPU s | CPU s per 100,000 events |\n|---:|---:|---:|---:|---:|---:|---:|\n");
    for s in steps {
        let target = if s.target == UNTHROTTLED {
            "unthrottled".to_string()
        } else {
            s.target.to_string()
        };
        out.push_str(&format!(
            "| {target} | {:.0} | {} | {} | {} | {:.2} | {:.3} |\n",
            s.achieved,
            s.sent,
            s.logged,
            s.lost,
            s.cpu_s,
            s.cpu_s / (s.logged.max(1) as f64) * 100_000.0
        ));
    }
    out
}

const BEGIN: &str = "<!-- bench-events:begin -->";
const END: &str = "<!-- bench-events:end -->";

/// The marked events section of a BENCHMARKS.md text, markers included.
pub fn section(text: &str) -> Option<String> {
    let b = text.find(BEGIN)?;
    let e = text[b..].find(END)? + b + END.len();
    Some(format!("\n{}\n", &text[b..e]))
}

/// Replaces (or appends) the marked events section, leaving the rest.
fn write_section(path: &Path, text: &str) -> Result<()> {
    let old = fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN}\n{text}{END}\n");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{section}{}",
            &old[..b],
            &old[e + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{section}", old.trim_end()),
    };
    fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

/// Forks a child that joins `cgroup` and calls connect() on one UDP
/// socket at `rate` per second ([`UNTHROTTLED`]: as fast as it can) for `run`;
/// returns how many calls it made. xtask is single-threaded here (checked),
/// so the child may allocate; it ends with `_exit`.
fn generate(cgroup: &Path, rate: u64, run: Duration) -> Result<u64> {
    fork::ensure_single_threaded()?;
    let (rd, wr) = fork::pipe()?;
    // SAFETY: the process has one thread (checked above); the child only
    // runs `child` and exits.
    let pid = unsafe { libc::fork() };
    ensure!(pid >= 0, "fork failed");
    if pid == 0 {
        drop(rd);
        let n = child(cgroup, rate, run).unwrap_or(u64::MAX);
        let bytes = n.to_le_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our pipe end.
        unsafe {
            libc::write(wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    }
    drop(wr);
    let mut buf = [0u8; 8];
    let mut file = fs::File::from(rd);
    let read = file.read_exact(&mut buf);
    fork::wait(pid)?;
    read.context("read the load generator's count")?;
    let n = u64::from_le_bytes(buf);
    ensure!(
        n != u64::MAX,
        "the load generator failed (is the cgroup writable?)"
    );
    Ok(n)
}

fn child(cgroup: &Path, rate: u64, run: Duration) -> Result<u64> {
    fork::join_cgroup(cgroup)?;
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        if rate != UNTHROTTLED {
            // Pace: call i is due at i / rate seconds.
            let due = Duration::from_secs_f64(n as f64 / rate as f64);
            if start.elapsed() < due {
                continue;
            }
        }
        // 127.0.0.1 onwards, a new address (a new flow) per call: 16
        // million before one comes again, more than any run makes.
        let host = u32::try_from(n % 0x00ff_fffe).unwrap_or(0) + 1;
        sock.connect(SocketAddrV4::new(Ipv4Addr::from(0x7f00_0000 | host), PORT))?;
        n += 1;
    }
    Ok(n)
}

/// Counts the verdict lines of the decision log, reading only what was
/// appended since the last call.
struct LogCounter {
    path: PathBuf,
    offset: u64,
    verdicts: u64,
    /// A line cut off at the end of the last read.
    partial: Vec<u8>,
}

impl LogCounter {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            offset: 0,
            verdicts: 0,
            partial: Vec::new(),
        }
    }

    fn verdicts(&mut self) -> Result<u64> {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return Ok(self.verdicts);
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        loop {
            let n = reader.read_until(b'\n', &mut self.partial)?;
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            if self.partial.last() == Some(&b'\n') {
                // The type comes second, right after the schema.
                let head = &self.partial[..self.partial.len().min(64)];
                if contains(head, b"\"type\":\"verdict\"") {
                    self.verdicts += 1;
                }
                self.partial.clear();
            }
        }
        // An incomplete last line is read again next time.
        self.offset -= self.partial.len() as u64;
        self.partial.clear();
        Ok(self.verdicts)
    }

    /// Waits until the log holds `want` verdicts or stops growing.
    fn settle(&mut self, want: u64) -> Result<u64> {
        let mut last = self.verdicts()?;
        let mut still = 0;
        while last < want && still < 10 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.verdicts()?;
            still = if now == last { still + 1 } else { 0 };
            last = now;
        }
        Ok(last)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `bulkhead_events_lost_total`, every source.
fn lost(port: u16) -> Result<u64> {
    use std::io::Write;
    let mut stream =
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).context("connect to /metrics")?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    let total = body
        .lines()
        .filter(|l| l.starts_with("bulkhead_events_lost_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    Ok(total)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based).
    let get = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    match (get(14), get(15)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => bail!("cannot parse /proc/{pid}/stat"),
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
