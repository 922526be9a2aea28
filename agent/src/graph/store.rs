//! The graph shared by the daemon's tasks, fed from the event hub, saved
//! to `state_dir/graph.json` every [`SAVE_INTERVAL`] and on stop, loaded at
//! start: a restart does not forget the map.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::model::{Dest, EdgeStats, Graph, ListenKey, ListenerInfo, Source};
use crate::{
    events::{FlowEvent, Tap},
    policy::PolicySet,
};

pub const FILE: &str = "graph.json";
/// How often the graph is written to the state directory.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(30);
const SCHEMA: &str = "bulkhead.graph-state.v1";

/// The graph and the policy in force, shared by the aggregator, the engine
/// (blast radius, learn) and the HTTP page.
#[derive(Debug, Default)]
pub struct Shared {
    graph: Mutex<Graph>,
    policy: RwLock<Arc<PolicySet>>,
}

impl Shared {
    pub fn graph(&self) -> MutexGuard<'_, Graph> {
        self.graph.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn policy(&self) -> Arc<PolicySet> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn set_policy(&self, set: &PolicySet) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set.clone());
    }

    /// Edges and listeners evicted to stay within the caps.
    pub fn evictions(&self) -> u64 {
        self.graph().evictions
    }
}

#[derive(Serialize, Deserialize)]
struct Saved {
    schema: String,
    edges: Vec<SavedEdge>,
    #[serde(default)]
    listeners: Vec<SavedListener>,
}

#[derive(Serialize, Deserialize)]
struct SavedEdge {
    from: Source,
    to: Dest,
    #[serde(flatten)]
    stats: EdgeStats,
}

#[derive(Serialize, Deserialize)]
struct SavedListener {
    #[serde(flatten)]
    at: ListenKey,
    #[serde(flatten)]
    info: ListenerInfo,
}

/// The graph as saved (edges sorted, so the file diffs well).
pub fn to_json(graph: &Graph) -> Vec<u8> {
    let mut edges: Vec<SavedEdge> = graph
        .edges
        .iter()
        .map(|((from, to), stats)| SavedEdge {
            from: from.clone(),
            to: to.clone(),
            stats: stats.clone(),
        })
        .collect();
    edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    let saved = Saved {
        schema: SCHEMA.to_string(),
        edges,
        listeners: graph
            .listeners
            .iter()
            .map(|(at, info)| SavedListener {
                at: at.clone(),
                info: info.clone(),
            })
            .collect(),
    };
    serde_json::to_vec(&saved).unwrap_or_default()
}

/// Parses a saved graph.
///
/// # Errors
/// Not JSON, or not a graph of this schema.
pub fn from_json(bytes: &[u8]) -> Result<Graph, String> {
    let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if saved.schema != SCHEMA {
        return Err(format!(
            "unknown schema {:?} (expected {SCHEMA})",
            saved.schema
        ));
    }
    let mut graph = Graph::default();
    graph.restore(
        saved
            .edges
            .into_iter()
            .map(|e| (e.from, e.to, e.stats))
            .collect(),
        saved
            .listeners
            .into_iter()
            .map(|l| (l.at, l.info))
            .collect(),
    );
    Ok(graph)
}

/// Loads `state_dir/graph.json`; an absent file is an empty graph, a
/// damaged one is set aside (see `state_file`), so that it never stops the
/// agent.
pub fn load(state_dir: &Path) -> Graph {
    let loaded =
        crate::state_file::load(state_dir, FILE, from_json, "the service graph starts empty");
    if let Some(g) = &loaded {
        info!(path = %state_dir.join(FILE).display(), edges = g.edges.len(), "service graph loaded");
    }
    loaded.unwrap_or_default()
}

/// Writes the graph atomically (temporary file, then rename), mode 0600.
///
/// # Errors
/// The state directory cannot be written.
pub fn save(state_dir: &Path, shared: &Shared) -> std::io::Result<()> {
    crate::state_file::write_atomic(state_dir, FILE, &to_json(&shared.graph()), 0o600)
}

/// Every event the reader publishes is folded into the graph, under one
/// lock per batch.
impl Tap for Shared {
    fn observe(&self, batch: &[Arc<FlowEvent>]) {
        let mut g = self.graph();
        for ev in batch {
            g.observe(ev);
        }
    }
}

/// The running upkeep task (listener scans, periodic saves);
/// [`Upkeep::finish`] stops it.
pub struct Upkeep {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Upkeep {
    /// Stops the task (waiting at most 2 s for a save in progress).
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Scans for managed services' listeners at start and then every
/// [`SAVE_INTERVAL`], saving the graph each time. The events themselves
/// come in through the hub's tap ([`Shared`] implements [`Tap`]).
pub fn spawn_upkeep(shared: Arc<Shared>, state_dir: PathBuf) -> Upkeep {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        scan_listeners(&shared).await;
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                _ = tick.tick() => {
                    scan_listeners(&shared).await;
                    let shared = Arc::clone(&shared);
                    let dir = state_dir.clone();
                    let saved = tokio::task::spawn_blocking(move || save(&dir, &shared)).await;
                    if let Ok(Err(e)) = saved {
                        warn!(dir = %state_dir.display(), "cannot save the service graph: {e}");
                    }
                }
            }
        }
    });
    Upkeep { stop, task }
}

/// Adds the listeners of managed services found in `/proc` (off the async
/// workers: it reads every process's file descriptors).
async fn scan_listeners(shared: &Arc<Shared>) {
    let policy = shared.policy();
    let Ok(found) = tokio::task::spawn_blocking(move || super::listeners::scan(&policy)).await
    else {
        return;
    };
    shared.graph().add_scanned(found, &super::now());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        events::Verdict,
        graph::tests::{accepted, connect},
    };

    #[test]
    fn saved_and_loaded_graphs_are_equal() {
        let shared = Shared::default();
        {
            let mut g = shared.graph();
            g.observe(&connect("a", ("192.0.2.7", 5432), Verdict::Allow));
            g.observe(&accepted("b", ("127.0.0.1", 8080)));
        }
        let dir = tempfile::tempdir().expect("tempdir");
        save(dir.path(), &shared).expect("save");
        let loaded = load(dir.path());
        let g = shared.graph();
        assert_eq!(loaded.edges, g.edges);
        assert_eq!(loaded.listeners, g.listeners);
    }

    #[test]
    fn the_tap_folds_in_every_published_event() {
        let shared = Arc::new(Shared::default());
        let hub = crate::events::Hub::new(
            crate::events::Sink::open("/dev/null").expect("/dev/null opens"),
        )
        .expect("the writer thread starts");
        hub.add_tap(Arc::clone(&shared) as Arc<dyn Tap>);
        for _ in 0..3 {
            hub.publish(vec![
                connect("a", ("192.0.2.7", 5432), Verdict::Allow),
                connect("a", ("192.0.2.7", 5432), Verdict::Deny),
            ]);
        }
        let g = shared.graph();
        let edge = g.edges.values().next().expect("one edge");
        assert_eq!(g.edges.len(), 1);
        assert_eq!((edge.allowed, edge.denied), (3, 3));
    }

    #[test]
    fn a_damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE), b"{not json").expect("write");
        assert!(load(dir.path()).edges.is_empty());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("graph.json.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1);
        assert!(!dir.path().join(FILE).exists());
    }
}
