//! Cgroup churn: a service cgroup made and removed over and over (a unit
//! restarting), and worker cgroups coming and going below the soak's
//! service; a probe in each new cgroup checks that it is judged by its
//! service's policy from its first call, whether the agent runs or not.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread,
    time::Duration,
};

use super::{
    policy::CHURN_CGROUP,
    worker::Tally,
    workers::{self, Seen},
};
use crate::bench::sandbox::{Cgroup, Netns};

/// What the churn thread did, at the end.
pub struct Churned {
    pub seen: Seen,
    pub cycles: u64,
    pub failures: Vec<String>,
}

pub struct Churn {
    seen: Arc<Mutex<Seen>>,
    cycles: Arc<AtomicU64>,
    thread: thread::JoinHandle<Vec<String>>,
}

impl Churn {
    pub fn snapshot(&self) -> Tally {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tally
    }

    /// Waits for the thread (the caller has set the stop flag).
    pub fn finish(self) -> Churned {
        let failures = self
            .thread
            .join()
            .unwrap_or_else(|_| vec!["the churn thread panicked".into()]);
        Churned {
            seen: std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner)),
            cycles: self.cycles.load(Ordering::SeqCst),
            failures,
        }
    }
}

const PAUSE: Duration = Duration::from_millis(200);
/// Failures kept; a broken machine would otherwise fill memory.
const MAX_FAILURES: usize = 20;

pub fn start(ns: Arc<Netns>, mount: &Path, service: &Path, stop: Arc<AtomicBool>) -> Churn {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let cycles = Arc::new(AtomicU64::new(0));
    let (shared, counted) = (Arc::clone(&seen), Arc::clone(&cycles));
    let (mount, service) = (mount.to_path_buf(), service.to_path_buf());
    let thread = thread::spawn(move || {
        let mut failures = Vec::new();
        let mut n: u64 = 0;
        while !stop.load(Ordering::SeqCst) {
            // Even cycles: the churn service's own cgroup; odd: a worker
            // cgroup below the soak's service (judged as that service).
            let (parent, name): (&PathBuf, String) = if n.is_multiple_of(2) {
                (&mount, CHURN_CGROUP.to_owned())
            } else {
                (&service, format!("churn-{n}"))
            };
            match cycle(&ns, parent, &name) {
                Ok(s) => {
                    let mut all = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    all.tally.add(s.tally);
                    all.wrong.extend(
                        s.wrong
                            .into_iter()
                            .map(|w| format!("new cgroup {name}: {w}")),
                    );
                }
                Err(e) if failures.len() < MAX_FAILURES => {
                    failures.push(format!("churn cycle {n} ({name}): {e:#}"));
                }
                Err(_) => {}
            }
            counted.fetch_add(1, Ordering::SeqCst);
            n += 1;
            thread::sleep(PAUSE);
        }
        failures
    });
    Churn {
        seen,
        cycles,
        thread,
    }
}

fn cycle(ns: &Netns, parent: &Path, name: &str) -> anyhow::Result<Seen> {
    let cgroup = Cgroup::create(parent, name)?;
    // The cgroup goes when `cgroup` drops, after the probe has exited.
    workers::probe(ns, &cgroup.path, None)
}
