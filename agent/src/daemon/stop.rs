//! Step 4: stop without detaching.

use tracing::{info, warn};

use super::{start::Tasks, Running};

impl Running {
    /// Ends the control socket, the event reader and the background tasks,
    /// saves the service graph, and leaves the pinned programs enforcing
    /// until a new agent takes over, or `bulkhead detach` removes them.
    pub async fn stop(self) {
        let Running {
            engine,
            hub,
            metrics,
            graph,
            state_dir,
            pins,
            tasks,
            ..
        } = self;
        let Tasks {
            reader,
            control,
            metrics_server,
            graph_upkeep,
            anomalies,
            exporter,
            fleet,
            bpf_logger,
            flow_sweeper,
            dns,
        } = tasks;
        crate::notify::stopping("stopping");
        // Followers get {"end":"shutdown"}; the socket file is removed.
        control.shutdown().await;
        metrics.set_attached(false);
        // The links stay pinned: enforcement goes on until a new agent takes
        // over, or `bulkhead detach` removes it.
        engine.leave_pinned();
        reader.abort();
        // Lookups taken are answered; the rest wait in the proxy's sockets
        // when the service manager holds them. Learnt addresses stay in
        // the pinned map, enforced.
        dns.stop().await;
        // The calls counted since the last sweep are reported now; the
        // flows go on counting for the next agent, which reports them, and
        // follows the open TCP connections saved here.
        let sweeper_state = state_dir.clone();
        if tokio::task::spawn_blocking(move || flow_sweeper.stop(&sweeper_state))
            .await
            .is_err()
        {
            warn!("the flow sweeper's last sweep did not finish");
        }
        if let Some(task) = anomalies {
            task.stop().await;
        }
        if let Some(exporter) = exporter {
            exporter.abort();
        }
        // After the last sweep and anomalies: their rows go to the spool.
        if let Some(fleet) = fleet {
            if tokio::task::spawn_blocking(move || fleet.stop())
                .await
                .is_err()
            {
                warn!("the fleet exporter did not stop cleanly");
            }
        }
        graph_upkeep.finish().await;
        // The last anomaly and shutdown events reach the decision log.
        hub.sync_log();
        match crate::graph::store::save(&state_dir, &graph) {
            Ok(()) => info!(dir = %state_dir.display(), "service graph saved"),
            Err(e) => warn!(dir = %state_dir.display(), "cannot save the service graph: {e}"),
        }
        info!(pins = %pins.display(), "agent stopped; its programs stay attached and enforcing (`bulkhead detach` removes them)");
        // Served until here, as before the steps were split.
        drop(metrics_server);
        drop(bpf_logger);
    }
}
