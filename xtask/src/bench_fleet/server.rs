//! The ClickHouse server of the bench: the integration harness's
//! (tests/src/clickhouse.rs: Debian's clickhouse-server on loopback, its
//! own config and data in a temporary directory, stopped by its pid on
//! drop), with errors instead of panics for the bench's own queries, and
//! `bulkhead fleet` commands of the release binary against it.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use anyhow::{bail, Context, Result};
use integration_tests::ClickHouse;

pub struct Server {
    pub ch: ClickHouse,
}

impl Server {
    /// Starts it (the harness panics, with the server's log, if it cannot).
    pub fn start() -> Self {
        Self {
            ch: ClickHouse::start(),
        }
    }

    pub fn url(&self) -> String {
        self.ch.url()
    }

    /// Runs `sql`; its answer.
    pub fn query(&self, sql: &str) -> Result<String> {
        self.ch
            .try_query(sql)
            .map_err(|(status, message)| anyhow::anyhow!("HTTP {status}: {message}"))
            .with_context(|| format!("ClickHouse at {}: {}", self.url(), first_line(sql)))
    }

    /// A number the query answers.
    pub fn number(&self, sql: &str) -> Result<u64> {
        let answer = self.query(sql)?;
        answer
            .trim()
            .parse()
            .with_context(|| format!("{}: answered {answer:?}, not a number", first_line(sql)))
    }

    /// `bulkhead fleet ARGS --clickhouse URL --config CONFIG` with the
    /// binary under test; its output, or an error with it if it failed.
    pub fn fleet(&self, bin: &Path, config: &Path, args: &[&str]) -> Result<Output> {
        let out = Command::new(bin)
            .arg("fleet")
            .args(args)
            .arg("--clickhouse")
            .arg(self.url())
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {} fleet {}", bin.display(), args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "bulkhead fleet {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or_default()
}
