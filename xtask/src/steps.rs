//! A list of commands run one after another, ending in a summary: `test` and
//! `lint` keep going after a failure so that one run shows every problem.

use std::{process::Command, time::Instant};

use anyhow::{bail, Result};

use crate::util::{run_cmd, secs};

enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
}

#[derive(Default)]
pub struct Steps {
    done: Vec<(String, Outcome, f64)>,
}

impl Steps {
    /// Runs `cmd` (its output stays visible) and records whether it passed.
    pub fn run(&mut self, name: &str, cmd: &mut Command) -> bool {
        eprintln!("xtask: == {name}");
        let start = Instant::now();
        let outcome = match run_cmd(cmd) {
            Ok(()) => Outcome::Passed,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        let passed = matches!(outcome, Outcome::Passed);
        self.done.push((name.to_owned(), outcome, secs(start)));
        passed
    }

    /// Records a step run some other way (e.g. inside a guest) that took `took` seconds.
    pub fn record(&mut self, name: &str, result: Result<()>, took: f64) {
        let outcome = match result {
            Ok(()) => Outcome::Passed,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        };
        self.done.push((name.to_owned(), outcome, took));
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        self.done
            .push((name.to_owned(), Outcome::Skipped(why.to_owned()), 0.0));
    }

    /// Prints the summary; fails if any step failed.
    pub fn finish(self, task: &str) -> Result<()> {
        eprintln!("xtask: ---- {task} summary ----");
        let mut failed = 0;
        for (name, outcome, took) in &self.done {
            let (word, note) = match outcome {
                Outcome::Passed => ("ok", String::new()),
                Outcome::Failed(why) => {
                    failed += 1;
                    ("FAILED", format!("  {why}"))
                }
                Outcome::Skipped(why) => ("skipped", format!("  ({why})")),
            };
            eprintln!("xtask:   {word:<8} {name:<20} {took:>7.1}s{note}");
        }
        if failed > 0 {
            bail!("{task}: {failed} of {} steps failed", self.done.len());
        }
        eprintln!("xtask: {task}: all {} steps passed", self.done.len());
        Ok(())
    }
}
