//! `bulkhead run`: load, attach, enforce until told to stop, detach.

use anyhow::{anyhow, Context, Result};
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    cgroup,
    cli::RunArgs,
    config::Config,
    kernel::{self, CompiledPolicy, Enforcer, LoadOptions, ResolvedService},
    policy,
};

pub fn run(args: &RunArgs) -> Result<()> {
    // Everything that can be refused is checked before the runtime starts
    // and before anything touches the kernel.
    let config = Config::load(args.config.as_deref())?;
    let policy_dir = args.policy_dir.clone().unwrap_or(config.policy_dir.clone());
    let set = policy::load_dir(&policy_dir)
        .and_then(|set| kernel::compile(&set).map(|c| (set, c)))
        .map_err(|errors| {
            anyhow!(
                "invalid policy in {}; nothing was loaded:\n{errors}",
                policy_dir.display()
            )
        });
    let (set, compiled) = set?;
    kernel::preflight::check().map_err(|line| anyhow!(line))?;
    let mount = cgroup::cgroup2_mount()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, policy_dir, set, compiled, mount))
}

/// Resolves each service's cgroup id; a cgroup that does not exist yet is
/// reported and left out (its service is not managed until it exists).
fn resolve(compiled: &CompiledPolicy, mount: &std::path::Path) -> Vec<ResolvedService> {
    compiled
        .services
        .iter()
        .filter_map(|s| match cgroup::cgroup_id(mount, &s.cgroup_path) {
            Some(cgroup_id) => {
                info!(service = %s.name, cgroup = %s.cgroup_path, cgroup_id, mode = if s.entry.mode == agent_common::MODE_AUDIT { "audit" } else { "enforce" }, rules = s.rule_count, "service managed");
                Some(ResolvedService {
                    cgroup_id,
                    entry: s.entry,
                })
            }
            None => {
                warn!(service = %s.name, cgroup = %s.cgroup_path, "cgroup does not exist; service not managed until it does (restart the agent once it runs)");
                None
            }
        })
        .collect()
}

async fn serve(
    config: Config,
    policy_dir: std::path::PathBuf,
    set: policy::PolicySet,
    compiled: CompiledPolicy,
    mount: std::path::PathBuf,
) -> Result<()> {
    let resolved = resolve(&compiled, &mount);
    let mut enforcer = Enforcer::load(
        &compiled,
        &LoadOptions {
            bpf_log: config.bpf_log,
            ..LoadOptions::default()
        },
    )?;
    let _bpf_logger = if config.bpf_log {
        Some(start_bpf_logger(enforcer.ebpf_mut())?)
    } else {
        None
    };
    enforcer.write_policy(&compiled, &resolved)?;
    enforcer.attach(&mount)?;
    let status = format!(
        "enforcing: {} of {} services managed, {} rules, from {}",
        resolved.len(),
        set.services.len(),
        compiled.rules.len(),
        policy_dir.display()
    );
    info!(cgroup2 = %mount.display(), "{status}");
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                warn!("SIGHUP: policy reload is not supported yet; restart the agent to apply policy changes");
            }
        }
    }
    notify(&[NotifyState::Stopping]);
    enforcer.detach()?;
    info!("programs detached; enforcement stopped");
    Ok(())
}

/// Tells the service manager (systemd `Type=notify`) where we are; a no-op
/// when NOTIFY_SOCKET is unset or empty.
fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none_or(|s| s.is_empty()) {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// Forwards aya-log records from the kernel programs to our log.
fn start_bpf_logger(ebpf: &mut aya::Ebpf) -> Result<tokio::task::JoinHandle<()>> {
    let logger = aya_log::EbpfLogger::init(ebpf).context("cannot start the kernel log reader")?;
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives,
    // and the AsyncFd owns the logger, so the fd stays open and unchanged.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .context("cannot poll the kernel log")?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
