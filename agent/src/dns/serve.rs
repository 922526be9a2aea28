//! The DNS proxy in the daemon: bound on loopback at start, told to the
//! kernel (DNS_PROXY, with a heartbeat each second), routing each query by
//! what the kernel recorded about its sender (DNS_CLIENTS), learning into
//! the kernel's LEARNT map.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use agent_common::{DnsOrigin, PROTO_TCP, PROTO_UDP};
use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    learnt::{monotonic_now, LearntCache, LearntLimits, LearntSink, Nanos, RuleBits, ServiceId},
    name::NamePattern,
    proxy::{Proxy, ProxyConfig, Route, Router, Transport},
};
use crate::{
    config::DnsConfig,
    kernel::{
        dns_maps::{ip_of, DnsClients, Learnt, ProxyBeat},
        CompiledPolicy,
    },
    policy::PolicySet,
};

/// How often the proxy tells the kernel it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Each service's name rules, by its stable key: what a route carries.
pub type NameRules = Arc<RwLock<HashMap<ServiceId, Arc<[Vec<NamePattern>]>>>>;

/// The name rules of every service with names in `set` (compiled into
/// `compiled`, which has the keys), in rule order: bit i of a learnt
/// entry is the i-th.
pub fn name_rules(
    set: &PolicySet,
    compiled: &CompiledPolicy,
) -> HashMap<ServiceId, Arc<[Vec<NamePattern>]>> {
    set.services
        .iter()
        .zip(&compiled.services)
        .filter_map(|(service, c)| {
            let rules: Vec<Vec<NamePattern>> = service
                .egress
                .iter()
                .filter(|r| !r.names.is_empty())
                .take(agent_common::MAX_NAME_RULES)
                .map(|r| r.names.clone())
                .collect();
            (!rules.is_empty()).then(|| (c.entry.name_key, rules.into()))
        })
        .collect()
}

/// LEARNT as the learnt cache's sink.
pub struct KernelSink(Learnt);

impl LearntSink for KernelSink {
    fn allow(
        &mut self,
        service: ServiceId,
        addr: std::net::IpAddr,
        until: Nanos,
        rules: RuleBits,
    ) -> Result<(), super::learnt::SinkError> {
        self.0
            .allow(service, addr, until, rules)
            .map_err(|e| super::learnt::SinkError(e.to_string()))
    }

    fn revoke(
        &mut self,
        service: ServiceId,
        addr: std::net::IpAddr,
    ) -> Result<(), super::learnt::SinkError> {
        self.0
            .revoke(service, addr)
            .map_err(|e| super::learnt::SinkError(e.to_string()))
    }
}

/// The running proxy and its heartbeat.
pub struct DnsService {
    pub proxy: Proxy<KernelSink>,
    pub rules: NameRules,
    heartbeat: JoinHandle<()>,
}

impl Drop for DnsService {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Binds the proxy on `config.listen` and starts it.
///
/// # Errors
/// The address cannot be bound, or the kernel map cannot be written.
pub async fn start(
    config: &DnsConfig,
    maps: (DnsClients, Learnt, ProxyBeat),
    rules: HashMap<ServiceId, Arc<[Vec<NamePattern>]>>,
) -> Result<DnsService> {
    let (clients, learnt, mut beat) = maps;
    let rules: NameRules = Arc::new(RwLock::new(rules));
    let router = router(clients, Arc::clone(&rules));
    let cache = LearntCache::new(LearntLimits {
        min_ttl: Duration::from_secs(u64::from(config.min_ttl_secs)),
        max_per_name: config.max_per_name as usize,
        max_total: config.max_learnt as usize,
    });
    let proxy_config = ProxyConfig {
        upstream_timeout: Duration::from_millis(u64::from(config.upstream_timeout_ms)),
        ..ProxyConfig::default()
    };
    let proxy = Proxy::bind(
        config.listen,
        router,
        proxy_config,
        cache,
        KernelSink(learnt),
    )
    .await
    .with_context(|| format!("cannot bind the DNS proxy on {}", config.listen))?;
    let addr = proxy.addr();
    match addr {
        SocketAddr::V4(_) => beat.set_addresses(Some(addr), None),
        SocketAddr::V6(_) => beat.set_addresses(None, Some(addr)),
    }
    beat.beat(monotonic_now())
        .context("cannot write the DNS proxy's address into the kernel")?;
    info!(listen = %addr, "DNS proxy: lookups of services with name rules go through it");
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut failing = false;
        loop {
            tick.tick().await;
            match beat.beat(monotonic_now()) {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    warn!("DNS proxy: cannot write its heartbeat: {e}; the kernel stops redirecting lookups after 30 s");
                }
                Err(_) => {}
            }
        }
    });
    Ok(DnsService {
        proxy,
        rules,
        heartbeat,
    })
}

/// A query's route: the service and resolver the kernel recorded for its
/// sender, with that service's name rules now.
fn router(clients: DnsClients, rules: NameRules) -> Router {
    Arc::new(move |transport, client| {
        let protocol = match transport {
            Transport::Udp => PROTO_UDP,
            Transport::Tcp => PROTO_TCP,
        };
        let origin: DnsOrigin = clients.get(protocol, client)?;
        let service_rules = rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&origin.name_key)
            .cloned()?;
        Some(Route {
            service: origin.name_key,
            upstream: SocketAddr::new(ip_of(origin.family, origin.addr), origin.port),
            rules: service_rules,
        })
    })
}
