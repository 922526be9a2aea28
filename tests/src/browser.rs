//! Headless Chromium (Debian's `chromium`) for the pages the agent serves:
//! the DOM after the page's scripts ran, and a screenshot kept as a test's
//! artifact. Started as the machine notes say: no sandbox (root), no GPU,
//! no background networking, a profile of its own.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    process::{output_with_timeout, scaled},
    require::REQUIRE_ENV,
};

/// A headless browser with a profile in a temporary directory.
pub struct Headless {
    browser: &'static str,
    work: tempfile::TempDir,
}

impl Headless {
    /// The browser, or `None` when it is not installed and the run does not
    /// require it (with `BULKHEAD_REQUIRE_BPF=1` a missing browser fails:
    /// `cargo xtask setup` installs it). `test` names the caller in the
    /// skip line.
    #[must_use]
    pub fn new(test: &str) -> Option<Self> {
        let Some(browser) = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
        else {
            assert!(
                std::env::var(REQUIRE_ENV).as_deref() != Ok("1"),
                "chromium is not installed and {REQUIRE_ENV}=1: run `cargo xtask setup` (it installs Debian's chromium)"
            );
            eprintln!("SKIPPED: {test}: chromium is not installed");
            return None;
        };
        let work = tempfile::Builder::new()
            .prefix("bulkhead-test-chromium-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        Some(Self { browser, work })
    }

    fn run(&self, url: &str, extra: &[OsString]) -> String {
        let mut cmd = Command::new(self.browser);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,900",
        ])
        .arg(format!(
            "--user-data-dir={}",
            self.work.path().join("profile").display()
        ))
        .args(extra)
        .arg(url);
        let out = output_with_timeout(&mut cmd, scaled(Duration::from_secs(90)));
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The page's DOM once its scripts have run.
    #[must_use]
    pub fn dom(&self, url: &str) -> String {
        self.run(url, &["--dump-dom".into()])
    }

    /// A screenshot of the page as `name` (a PNG), kept after the test as
    /// its artifact: the path is printed and returned.
    #[must_use]
    pub fn screenshot(&self, url: &str, name: &str) -> PathBuf {
        let shot = self.work.path().join(name);
        let _ = self.run(url, &[format!("--screenshot={}", shot.display()).into()]);
        let size = std::fs::metadata(&shot).map_or(0, |m| m.len());
        assert!(
            size > 1000,
            "no screenshot at {} ({size} bytes)",
            shot.display()
        );
        let artifact = std::env::temp_dir().join(format!("bulkhead-{}-{name}", std::process::id()));
        std::fs::copy(&shot, &artifact).unwrap_or_else(|e| panic!("keep the screenshot: {e}"));
        println!("screenshot: {}", artifact.display());
        eprintln!("screenshot: {}", artifact.display());
        artifact
    }
}

/// The value of the attribute `name` of the page's `<body>` in `dom`.
#[must_use]
pub fn body_attribute(dom: &str, name: &str) -> Option<String> {
    let body = &dom[dom.find("<body")?..];
    let tag = &body[..body.find('>')?];
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let rest = &tag[at..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The part of a page's DOM a person reads: the `<body>` without its
/// `<script>` elements (the inlined library would bury a failure message).
#[must_use]
pub fn readable(dom: &str) -> String {
    let mut out = String::new();
    let mut rest = dom.find("<body").map_or(dom, |at| &dom[at..]);
    while let Some(start) = rest.find("<script") {
        out.push_str(&rest[..start]);
        match rest[start..].find("</script>") {
            Some(end) => rest = &rest[start + end + "</script>".len()..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}
