//! `/graph` and `/graph.json` from one rendering, kept for [`TTL`]: the
//! blast radius of every service is computed per rendering, so requests in
//! a burst must not each pay for it. One rendering at a time (later
//! requests wait for it and take its result), and it takes a turn from the
//! same limit as the scrapes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, Semaphore};

use super::http_stats::HttpStats;
use crate::graph::{page, Shared};

/// How long a rendering is served. Short: the page is a live view.
pub const TTL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Rendered {
    /// Cheap to clone into each response.
    pub json: bytes::Bytes,
    pub html: bytes::Bytes,
}

#[derive(Debug, Default)]
pub struct GraphCache {
    last: Mutex<Option<(Instant, Arc<Rendered>)>>,
}

impl GraphCache {
    /// The rendering of `shared`, from the cache if it is younger than
    /// [`TTL`].
    ///
    /// # Errors
    /// The rendering task panicked.
    pub async fn get(
        &self,
        shared: &Arc<Shared>,
        work: &Semaphore,
        stats: &HttpStats,
    ) -> Result<Arc<Rendered>, tokio::task::JoinError> {
        let mut last = self.last.lock().await;
        if let Some((at, rendered)) = last.as_ref() {
            if at.elapsed() < TTL {
                return Ok(Arc::clone(rendered));
            }
        }
        // The semaphore is never closed; if it were, render anyway.
        let _turn = work.acquire().await;
        HttpStats::bump(&stats.graph_renders);
        let shared = Arc::clone(shared);
        let rendered = tokio::task::spawn_blocking(move || {
            let json = page::data(&shared).to_string();
            let html = page::html_of(&json);
            Rendered {
                json: json.into(),
                html: html.into(),
            }
        })
        .await?;
        let rendered = Arc::new(rendered);
        *last = Some((Instant::now(), Arc::clone(&rendered)));
        Ok(rendered)
    }
}
