//! Watching the policy directory for changes, including the directory
//! itself being replaced (`mv new-policies /etc/bulkhead/policies`, a
//! config-management tool swapping a directory): an inotify watch follows
//! the inode, not the name, so the parent is watched for the name too and
//! the directory's watch is re-added ([`PolicyWatch::rearm`]) before each
//! reload.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use inotify::{EventStream, Inotify, WatchDescriptor, WatchMask};
use tracing::{info, warn};

/// Events in the directory that may change the policy.
const DIR_MASK: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// Events in the parent that may replace the directory.
const PARENT_MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB);

pub struct PolicyWatch {
    dir: PathBuf,
    name: OsString,
    parent: WatchDescriptor,
    current: Option<WatchDescriptor>,
    stream: EventStream<[u8; 4096]>,
}

impl PolicyWatch {
    /// Watches `dir` and, for its name, its parent.
    ///
    /// # Errors
    /// inotify cannot start, or the directory or its parent cannot be watched.
    pub fn start(dir: &Path) -> Result<Self> {
        let inotify = Inotify::init().context("cannot start inotify")?;
        let parent_dir = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dir.file_name().map(OsString::from).unwrap_or_default();
        let mut watches = inotify.watches();
        let current = watches
            .add(dir, DIR_MASK)
            .with_context(|| format!("cannot watch the policy directory {}", dir.display()))?;
        let parent = watches.add(&parent_dir, PARENT_MASK).with_context(|| {
            format!(
                "cannot watch {} (the policy directory's parent)",
                parent_dir.display()
            )
        })?;
        let stream = inotify
            .into_event_stream([0u8; 4096])
            .context("cannot read inotify events")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            name,
            parent,
            current: Some(current),
            stream,
        })
    }

    /// Waits for a change that may concern the policy (in the directory,
    /// or the directory's own name in its parent).
    pub async fn changed(&mut self) {
        loop {
            match self.stream.next().await {
                Some(Ok(ev)) if ev.wd != self.parent => return,
                Some(Ok(ev)) if ev.name.as_deref() == Some(self.name.as_os_str()) => return,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!("policy directory watch: {e}");
                    return;
                }
                // The stream never ends while the fd is open.
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Watches whatever directory is at the path now (a no-op when it is
    /// the one already watched; nothing when there is none, until the
    /// parent reports one).
    pub fn rearm(&mut self) {
        let mut watches = self.stream.watches();
        match watches.add(&self.dir, DIR_MASK) {
            Ok(wd) if Some(&wd) == self.current.as_ref() => {}
            Ok(wd) => {
                if let Some(old) = self.current.replace(wd) {
                    // Gone with its directory if that was deleted.
                    let _ = watches.remove(old);
                }
                info!(dir = %self.dir.display(), "the policy directory was replaced; watching the new one");
            }
            Err(e) => {
                warn!(dir = %self.dir.display(), "cannot watch the policy directory (reloads follow when it reappears): {e}");
            }
        }
    }
}
