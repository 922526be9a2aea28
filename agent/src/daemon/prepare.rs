//! Step 1: everything that can be refused is checked before the runtime
//! starts and before anything touches the kernel.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use tracing::warn;

use super::Options;
use crate::{
    cgroup,
    config::Config,
    kernel,
    reload::{self, Loaded, PolicySource},
};

/// Everything `run` decided before starting: nothing here touched the kernel.
pub struct Plan {
    pub config: Config,
    pub source: PolicySource,
    pub loaded: Loaded,
    pub mount: PathBuf,
    /// The OTLP exporter's settings (None: export is off).
    pub export: Option<crate::export::settings::Settings>,
}

/// Starts logging, loads the policy and checks the kernel and the control
/// socket.
pub(super) fn prepare(options: Options) -> Result<Plan> {
    let Options {
        config,
        source,
        log_level,
    } = options;
    crate::logging::init(&log_level, config.log_file.as_deref()).with_context(|| {
        format!(
            "cannot open the log file {}",
            config
                .log_file
                .as_deref()
                .unwrap_or(std::path::Path::new("-"))
                .display()
        )
    })?;
    let loaded = load_policy(&source)?;
    kernel::preflight::check().map_err(|line| anyhow!(line))?;
    // A second agent must be refused before it touches the kernel (it
    // would take over the first one's pins): one live agent per socket.
    crate::control::server::ensure_free(&config.control.socket)?;
    let mount = cgroup::cgroup2_mount()?;
    // Before any event is made: every event names this host.
    match config.fleet.host_name() {
        Ok(host) => {
            crate::events::host::set(&host);
        }
        Err(e) => {
            let kernel = crate::events::host::kernel_hostname();
            warn!("events carry the kernel's host name {kernel:?} as it is: {e}");
            crate::events::host::set(&kernel);
        }
    }
    if config.fleet.enabled {
        // Refused here, before READY: the exporter starts after it, when
        // its failing must not stop enforcement.
        config
            .fleet
            .connection(None)
            .context("fleet mode: the ClickHouse connection")?;
        config
            .fleet
            .identity()
            .context("fleet mode: this host's identity")?;
        let to_loopback = crate::fleet::parse_clickhouse_url(&config.fleet.clickhouse_url)
            .ok()
            .and_then(|u| u.host().map(|h| h.trim_matches(['[', ']']).to_string()))
            .is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
        if !to_loopback {
            warn!(url = %config.fleet.clickhouse_url, "fleet mode sends its rows and the ClickHouse password over plain HTTP to another host: put a TLS proxy on this host in front of it");
        }
    }
    // The export's environment (OTEL_EXPORTER_OTLP_*) is checked here,
    // before READY: a bad variable refuses the start, naming it.
    let export = crate::export::settings::resolve(&config.export, &|k| std::env::var(k).ok())
        .map_err(|problems| anyhow!("OTLP export: {}", problems.join("; ")))?;
    if !config.metrics.listen.ip().is_loopback() {
        warn!(listen = %config.metrics.listen, "metrics endpoint is not on loopback: it exposes the service map to the network");
    }
    Ok(Plan {
        config,
        source,
        loaded,
        mount,
        export,
    })
}

/// The policy directory, in full; any error refuses the start.
fn load_policy(source: &PolicySource) -> Result<Loaded> {
    let loaded = reload::load(source).map_err(|errors| {
        anyhow!(
            "invalid policy in {}; nothing was loaded:\n{errors}",
            source.dir.display()
        )
    })?;
    for w in &loaded.set.warnings {
        warn!("policy accepted with a warning: {w}");
    }
    for w in &loaded.warnings {
        warn!("INSECURE policy file accepted (--allow-insecure-policy-files): {w}");
    }
    Ok(loaded)
}
