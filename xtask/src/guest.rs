//! Other kernels: the integration suite run inside a virtual machine booted
//! on a distribution's stock kernel (`cargo xtask test --kernel NAME`).
//!
//! The guest is virtme-ng (`vng`) under QEMU: it boots the kernel with the
//! host's own root file system shared read-only, so the test executables and
//! the `bulkhead` binary built on the host run there unchanged, as root, in
//! the guest's own cgroups, namespaces and BPF. Only `target/guest/run/` is
//! shared read-write: the script the guest runs, and each suite's output and
//! timing, which the host reads back. No KVM is assumed (QEMU's TCG
//! emulation): slower, but it boots wherever QEMU runs.
//!
//! Everything it needs is installed on first use, under `target/guest/` for
//! what is not a Debian package: the pinned virtme-ng in a virtualenv, and
//! the kernel package downloaded with `apt-get download` and unpacked with
//! `dpkg -x` (never installed on the host).

use std::{
    collections::BTreeMap,
    env,
    fmt::Write as _,
    fs,
    os::unix::io::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    setup,
    util::{find_in_path, is_root, output_of, run_cmd, secs},
};

/// A kernel the suite can run on, besides the host's own.
pub struct GuestKernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// The Debian package holding the kernel and its modules. Not the
    /// `cloud` flavour: it lacks 9p, which virtme-ng shares the root with.
    pub package: &'static str,
    /// The package's exact version (`apt-cache madison PACKAGE`).
    pub version: &'static str,
}

/// The kernels `--kernel` knows. To move one to a newer build, change its
/// package and version together: Debian keeps only current kernel packages
/// in its archive (`apt-cache search linux-image-6.1.0 | grep amd64-unsigned`
/// lists them).
pub const KERNELS: &[GuestKernel] = &[GuestKernel {
    name: "debian-6.1",
    package: "linux-image-6.1.0-50-amd64-unsigned",
    version: "6.1.176-1",
}];

/// The host's running kernel: the default of `--kernel`.
pub const HOST: &str = "host";

/// virtme-ng, installed from PyPI into its own virtualenv.
const VIRTME_NG_VERSION: &str = "1.42";

/// Debian packages the guest needs: QEMU, `modprobe`/`depmod` for the
/// guest's modules, and the busybox virtme-ng builds its init from.
const GUEST_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];

/// What the guest gets: all host cores, memory for the suite's daemons.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "3G";

/// How long the tests wait for the daemon's `READY=1` in the guest (20 s
/// on the host): without KVM, the 6.1 verifier took 23.5 s over one program.
const GUEST_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// How many times longer heavy programs (headless Chromium) may take in
/// the emulated guest than on the host.
const GUEST_TIMEOUT_SCALE: u32 = 8;

/// The binaries the tests start, again and again (target/debug): served
/// from the guest's memory rather than over 9p.
const EXECUTED_BY_TESTS: [&str; 3] = ["bulkhead", "bulkhead-probe", "bulkhead-conn"];

/// How long one suite may run in the guest before it is killed.
const SUITE_TIMEOUT: Duration = Duration::from_secs(45 * 60);
/// Boot and shutdown, on top of the suites' own time.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Tests that do not run in a guest, by suite: not about the kernel, and
/// they need a writable workspace.
const GUEST_SKIPS: &[(&str, &str, &str)] = &[(
    "systemd",
    "xtask_",
    "they run `cargo xtask install/package`, which build into the workspace (read-only in the \
     guest) and do not depend on the kernel",
)];

/// `BULKHEAD_GUEST_LOCK=FILE`: hold an exclusive `flock` on FILE while the
/// guest runs, so that runs sharing a machine take turns (an emulated guest
/// takes every core it is given).
const LOCK_ENV: &str = "BULKHEAD_GUEST_LOCK";

/// The names `--kernel` accepts.
pub fn kernel_names() -> Vec<&'static str> {
    std::iter::once(HOST)
        .chain(KERNELS.iter().map(|k| k.name))
        .collect()
}

/// The guest kernel called `name`, or None for the host's own.
pub fn kernel(name: &str) -> Result<Option<&'static GuestKernel>> {
    if name == HOST {
        return Ok(None);
    }
    KERNELS
        .iter()
        .find(|k| k.name == name)
        .map(Some)
        .with_context(|| {
            format!(
                "unknown kernel {name:?}; known: {}",
                kernel_names().join(", ")
            )
        })
}

impl GuestKernel {
    /// `uname -r` of the kernel: the package name without `linux-image-`
    /// and `-unsigned`.
    pub fn release(&self) -> &'static str {
        let name = self.package;
        let name = name.strip_prefix("linux-image-").unwrap_or(name);
        name.strip_suffix("-unsigned").unwrap_or(name)
    }
}

/// A guest ready to boot: the tools and the unpacked kernel.
pub struct Guest {
    kernel: &'static GuestKernel,
    vng: PathBuf,
    vmlinuz: PathBuf,
    dir: PathBuf,
}

/// Installs what is missing to boot `kernel` (quick when all is there).
pub fn ensure(kernel: &'static GuestKernel, target: &Path) -> Result<Guest> {
    let start = Instant::now();
    ensure!(
        cfg!(target_arch = "x86_64"),
        "--kernel {} needs an x86_64 host",
        kernel.name
    );
    setup::ensure_debian_packages(GUEST_PACKAGES)?;
    let dir = target.join("guest");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let vng = ensure_virtme_ng(&dir)?;
    let vmlinuz = ensure_kernel(kernel, &dir)?;
    eprintln!(
        "xtask: guest {} ({} {}): ready in {:.1}s",
        kernel.name,
        kernel.package,
        kernel.version,
        secs(start)
    );
    Ok(Guest {
        kernel,
        vng,
        vmlinuz,
        dir,
    })
}

/// `vng` of the pinned virtme-ng, in a virtualenv of its own (so neither
/// the system's Python nor its other packages are touched).
fn ensure_virtme_ng(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join(format!("virtme-ng-{VIRTME_NG_VERSION}"));
    let vng = venv.join("bin/vng");
    let want = format!("virtme-ng {VIRTME_NG_VERSION}");
    let version = || output_of(Command::new(&vng).arg("--version"));
    if version().is_some_and(|v| v.trim() == want) {
        eprintln!("xtask: {want}: present");
        return Ok(vng);
    }
    let python = find_in_path("python3").context(
        "python3 is not installed: the guest needs it for virtme-ng \
         (apt-get install python3 python3-venv)",
    )?;
    eprintln!("xtask: installing {want} into {}", venv.display());
    let _ = fs::remove_dir_all(&venv);
    run_cmd(
        Command::new(&python)
            .args(["-m", "venv"])
            .arg(&venv)
            .stdin(Stdio::null()),
    )
    .context("cannot make a Python virtualenv (on Debian: apt-get install python3-venv)")?;
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}"))
            .stdin(Stdio::null()),
    )
    .context("cannot install virtme-ng from PyPI")?;
    let got = version();
    ensure!(
        got.as_deref().map(str::trim) == Some(want.as_str()),
        "{} --version says {got:?} after installing, not {want:?}",
        vng.display()
    );
    Ok(vng)
}

/// The kernel image, downloading and unpacking the package first if needed:
/// `DIR/PACKAGE_VERSION/root/` holds its `boot/` and `lib/modules/`.
fn ensure_kernel(kernel: &GuestKernel, dir: &Path) -> Result<PathBuf> {
    let release = kernel.release();
    let unpacked = dir.join(format!("{}_{}", kernel.package, kernel.version));
    let root = unpacked.join("root");
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    let done = unpacked.join("unpacked");
    if done.is_file() && vmlinuz.is_file() {
        eprintln!(
            "xtask: kernel {} {}: present",
            kernel.package, kernel.version
        );
        return Ok(vmlinuz);
    }
    let _ = fs::remove_dir_all(&unpacked);
    let download = unpacked.join("download");
    fs::create_dir_all(&download).with_context(|| format!("create {}", download.display()))?;
    let spec = format!("{}={}", kernel.package, kernel.version);
    eprintln!("xtask: downloading {spec}");
    if apt_download(&spec, &download).is_err() {
        // The package lists may be missing or stale on a fresh machine.
        if is_root() {
            run_cmd(apt().arg("update"))?;
        }
        apt_download(&spec, &download).with_context(|| {
            format!(
                "apt-get cannot download {spec}. Debian keeps only current kernel packages: \
                 if it has moved on, pick one from `apt-cache search linux-image-6.1.0 | grep \
                 amd64-unsigned` (and `apt-cache madison` for its version) and change the \
                 kernel {:?} in xtask/src/guest.rs",
                kernel.name
            )
        })?;
    }
    let deb = only_deb(&download)?;
    run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    ensure!(
        vmlinuz.is_file(),
        "{} has no {} (is {} a kernel image package?)",
        deb.display(),
        vmlinuz.display(),
        kernel.package
    );
    // The package leaves modules.dep to its postinst: make it here, so
    // that modprobe works in the guest.
    let depmod = find_in_path("depmod")
        .or_else(|| Some(PathBuf::from("/sbin/depmod")).filter(|p| p.is_file()))
        .context("depmod is not installed (Debian package kmod)")?;
    run_cmd(Command::new(depmod).arg("-b").arg(&root).arg(release))?;
    fs::remove_dir_all(&download).with_context(|| format!("remove {}", download.display()))?;
    fs::write(&done, format!("{spec}\n")).with_context(|| format!("write {}", done.display()))?;
    Ok(vmlinuz)
}

fn apt_download(spec: &str, into: &Path) -> Result<()> {
    let mut cmd = apt();
    // As root, apt drops to the `_apt` user, which may not write here.
    if is_root() {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    run_cmd(cmd.arg("download").arg(spec).current_dir(into))
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}

fn only_deb(dir: &Path) -> Result<PathBuf> {
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => bail!(
            "expected one .deb in {} after apt-get download, found {}",
            dir.display(),
            debs.len()
        ),
    }
}

/// One test executable to run in the guest.
pub struct Suite {
    /// The test target's name (`escape`, `egress`, ...).
    pub name: String,
    pub exe: PathBuf,
}

/// How one suite did in the guest.
pub struct SuiteResult {
    pub name: String,
    /// The executable's exit code; None if the guest never reported one
    /// (it crashed, hung, or was killed).
    pub code: Option<i32>,
    /// Wall time in the guest.
    pub secs: f64,
    /// libtest's `test result:` line.
    pub summary: Option<String>,
    /// Names of the tests that failed.
    pub failed: Vec<String>,
    pub log: PathBuf,
}

impl SuiteResult {
    pub fn passed(&self) -> bool {
        self.code == Some(0)
    }
}

/// What the guest's environment needs from the host.
pub struct RunSpec<'a> {
    pub suites: &'a [Suite],
    /// Arguments for every test executable (after `--test-threads=1`).
    pub args: &'a [String],
    pub bulkhead: &'a Path,
    /// The working directory of the tests (cargo runs them in their package).
    pub cwd: &'a Path,
}

impl Guest {
    /// Boots the guest once and runs every suite in it, one after another;
    /// their output goes to the console and to `target/guest/run/NAME.log`.
    pub fn run(&self, spec: &RunSpec) -> Result<Vec<SuiteResult>> {
        let run_dir = self.dir.join("run");
        if run_dir.exists() {
            fs::remove_dir_all(&run_dir)
                .with_context(|| format!("remove {}", run_dir.display()))?;
        }
        fs::create_dir_all(&run_dir).with_context(|| format!("create {}", run_dir.display()))?;
        let script = run_dir.join("run.sh");
        fs::write(&script, self.script(spec, &run_dir)?)
            .with_context(|| format!("write {}", script.display()))?;

        let _lock = lock()?;
        let budget = BOOT_ALLOWANCE + SUITE_TIMEOUT * u32::try_from(spec.suites.len())?;
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=30", &format!("{}", budget.as_secs())])
            .arg(&self.vng)
            .args([
                "--disable-kvm",
                "--cpus",
                GUEST_CPUS,
                "--memory",
                GUEST_MEMORY,
            ])
            .arg("--run")
            .arg(&self.vmlinuz)
            .arg("--rwdir")
            .arg(&run_dir)
            .arg("--exec")
            .arg(format!("/bin/bash {}", quote(&script)?))
            .current_dir(spec.cwd)
            .stdin(Stdio::null());
        // vng runs virtme-ng's other programs (virtme-run) from PATH: the
        // virtualenv's bin comes first.
        if let Some(bin) = self.vng.parent() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![bin.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(dirs)?);
        }
        eprintln!(
            "xtask: booting {} ({}) under QEMU without KVM: {} suite(s)",
            self.kernel.name,
            self.kernel.release(),
            spec.suites.len()
        );
        let start = Instant::now();
        // The console comes through a pipe: QEMU would truncate a file
        // given as its stdout, losing what was printed before.
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("failed to start {}", self.vng.display()))?;
        let stderr = child.stderr.take().map(|mut from| {
            std::thread::spawn(move || std::io::copy(&mut from, &mut std::io::stderr()))
        });
        if let Some(mut from) = child.stdout.take() {
            let _ = std::io::copy(&mut from, &mut std::io::stdout());
        }
        if let Some(copier) = stderr {
            let _ = copier.join();
        }
        let status = child
            .wait()
            .with_context(|| format!("wait for {}", self.vng.display()))?;
        eprintln!("xtask: guest exited ({status}) after {:.1}s", secs(start));
        let results = read_results(&run_dir, spec.suites)?;
        if results.iter().all(|r| r.code.is_none()) {
            bail!(
                "the guest ran no suite ({} exited: {status}); its console output is above",
                self.vng.display()
            );
        }
        Ok(results)
    }

    /// The script the guest runs: each suite with its output teed to a log
    /// and its exit code and time appended to `results`.
    fn script(&self, spec: &RunSpec, run_dir: &Path) -> Result<String> {
        let path = env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let mut s = String::new();
        s.push_str(
            "#!/bin/bash\n# Written by `cargo xtask test --kernel`: runs in the guest.\nset -u\n",
        );
        writeln!(s, "export PATH={}", quote_str(&path))?;
        writeln!(s, "export BULKHEAD_BIN={}", quote(spec.bulkhead)?)?;
        s.push_str("export BULKHEAD_REQUIRE_BPF=1 RUST_BACKTRACE=1\n");
        // Emulated: a browser's bound grows with it (tests/src/process.rs).
        writeln!(s, "export BULKHEAD_TIMEOUT_SCALE={GUEST_TIMEOUT_SCALE}")?;
        // Emulated, the verifier takes tens of seconds over the programs.
        writeln!(
            s,
            "export BULKHEAD_READY_TIMEOUT_SECS={}",
            GUEST_READY_TIMEOUT.as_secs()
        )?;
        // A share from the host takes no Unix sockets: temporary
        // directories (the daemons' control and notify sockets) go to the
        // guest's own tmpfs.
        s.push_str("export TMPDIR=/run/bulkhead-tmp\nmkdir -p \"$TMPDIR\"\n");
        // The guest's root is the host's over 9p with no page cache: each
        // exec of the agent read its binary from the host again, about 4 s
        // of every agent start (1 s from tmpfs; measured in the 6.1 guest).
        // The binaries the tests start go to the guest's tmpfs, mounted
        // over their own paths, which the tests have compiled in.
        if let Some(dir) = spec.bulkhead.parent() {
            s.push_str("mkdir -p /run/bulkhead-bin\n");
            for name in EXECUTED_BY_TESTS {
                let path = quote(&dir.join(name))?;
                writeln!(
                    s,
                    "if [ -f {path} ]; then cp {path} /run/bulkhead-bin/{name} && \
                     mount --bind /run/bulkhead-bin/{name} {path} || exit 1; fi"
                )?;
            }
        }
        writeln!(s, "out={}", quote(run_dir)?)?;
        writeln!(s, "cd {} || exit 1", quote(spec.cwd)?)?;
        writeln!(
            s,
            "echo \"guest: kernel $(uname -r), $(nproc) cpus, cgroup2 at \
             $(awk '$9 == \"cgroup2\" {{print $5; exit}}' /proc/self/mountinfo), \
             LSMs $(cat /sys/kernel/security/lsm)\""
        )?;
        s.push_str(
            "run() {\n  name=$1; shift\n  echo \"guest: == $name\"\n  start=$(date +%s.%N)\n  \
             \"$@\" 2>&1 | tee \"$out/$name.log\"\n  code=${PIPESTATUS[0]}\n  \
             end=$(date +%s.%N)\n  \
             echo \"$name $code $(echo \"$end - $start\" | awk '{print $1 - $3}')\" >> \"$out/results\"\n  \
             echo \"guest: after $name: load $(cut -d' ' -f1-3 /proc/loadavg), \
             $(ls -d /proc/[0-9]* | wc -l) processes\"\n\
             }\n",
        );
        let timeout = SUITE_TIMEOUT.as_secs();
        for suite in spec.suites {
            let mut line = format!(
                "run {} timeout --kill-after=10 {timeout} {} --test-threads=1",
                quote_str(&suite.name),
                quote(&suite.exe)?
            );
            for (in_suite, filter, _) in GUEST_SKIPS {
                if *in_suite == suite.name {
                    write!(line, " --skip {}", quote_str(filter))?;
                }
            }
            for arg in spec.args {
                write!(line, " {}", quote_str(arg))?;
            }
            s.push_str(&line);
            s.push('\n');
        }
        s.push_str("sync\n");
        Ok(s)
    }
}

/// Notes the tests a guest run leaves out, for the summary.
pub fn skipped_note(suites: &[Suite]) -> Vec<String> {
    GUEST_SKIPS
        .iter()
        .filter(|(suite, _, _)| suites.iter().any(|s| s.name == *suite))
        .map(|(suite, filter, why)| format!("{suite}: tests matching {filter:?} skipped: {why}"))
        .collect()
}

/// Reads `results` and each suite's log.
fn read_results(run_dir: &Path, suites: &[Suite]) -> Result<Vec<SuiteResult>> {
    let text = fs::read_to_string(run_dir.join("results")).unwrap_or_default();
    let mut reported: BTreeMap<&str, (Option<i32>, f64)> = BTreeMap::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if let (Some(name), Some(code), Some(took)) = (fields.next(), fields.next(), fields.next())
        {
            reported.insert(name, (code.parse().ok(), took.parse().unwrap_or(0.0)));
        }
    }
    Ok(suites
        .iter()
        .map(|suite| {
            let (code, secs) = reported
                .get(suite.name.as_str())
                .copied()
                .unwrap_or((None, 0.0));
            let log = run_dir.join(format!("{}.log", suite.name));
            let output = fs::read_to_string(&log).unwrap_or_default();
            SuiteResult {
                name: suite.name.clone(),
                code,
                secs,
                summary: output
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("test result:"))
                    .map(str::to_owned),
                failed: failed_tests(&output),
                log,
            }
        })
        .collect())
}

/// The names libtest lists in the last `failures:` block of its output.
fn failed_tests(output: &str) -> Vec<String> {
    let Some((_, tail)) = output.rsplit_once("\nfailures:\n") else {
        return Vec::new();
    };
    tail.lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.strip_prefix("    "))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Holds the `BULKHEAD_GUEST_LOCK` file locked until dropped (no lock when
/// it is unset).
fn lock() -> Result<Option<fs::File>> {
    let Some(path) = env::var_os(LOCK_ENV) else {
        return Ok(None);
    };
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("{LOCK_ENV}: cannot open {}", Path::new(&path).display()))?;
    eprintln!(
        "xtask: waiting for the lock {} ({LOCK_ENV})",
        Path::new(&path).display()
    );
    // SAFETY: flock on a file descriptor we own; it blocks until granted.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        bail!("{LOCK_ENV}: flock {}: {err}", Path::new(&path).display());
    }
    Ok(Some(file))
}

/// `path` quoted for the shell; fails on a path that is not UTF-8.
fn quote(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(quote_str(text))
}

fn quote_str(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_is_the_package_name_without_prefix_and_flavour_suffix() {
        let k = kernel("debian-6.1")
            .expect("known kernel")
            .expect("not the host");
        assert!(k.release().starts_with("6.1.0-"), "{}", k.release());
        assert!(k.release().ends_with("-amd64"), "{}", k.release());
        assert!(kernel(HOST).expect("host is known").is_none());
        assert!(kernel("debian-99").is_err());
    }

    #[test]
    fn no_cloud_kernel() {
        for k in KERNELS {
            assert!(!k.package.contains("cloud"), "{}: no 9p", k.package);
        }
    }

    #[test]
    fn failed_tests_come_from_the_last_failures_block() {
        let out = "running 3 tests\n\nfailures:\n\n---- a stdout ----\npanic\n\nfailures:\n    a\n    mod::b\n\ntest result: FAILED. 1 passed; 2 failed\n";
        assert_eq!(failed_tests(out), vec!["a", "mod::b"]);
        assert!(failed_tests("test result: ok. 3 passed\n").is_empty());
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote_str("it's"), r"'it'\''s'");
    }
}
