//! The DNS proxy in the daemon: bound on loopback at start, told to the
//! kernel (DNS_PROXY, with a heartbeat each second), routing each query by
//! what the kernel recorded about its sender (DNS_CLIENTS), learning into
//! the kernel's LEARNT map.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
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
        compile::name_key,
        dns_maps::{ip_of, DnsClients, Learnt, ProxyBeat},
    },
    policy::PolicySet,
};

/// How often the proxy tells the kernel it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Each service's name rules, by its stable key: what a route carries.
pub type NameRules = Arc<RwLock<HashMap<ServiceId, Arc<[Vec<NamePattern>]>>>>;

/// The name rules of every service with names in `set`, by its stable
/// key, in rule order: bit i of a learnt entry is the i-th.
pub fn name_rules(set: &PolicySet) -> HashMap<ServiceId, Arc<[Vec<NamePattern>]>> {
    set.services
        .iter()
        .filter_map(|service| {
            let rules: Vec<Vec<NamePattern>> =
                service.name_rules().map(|(_, r)| r.names.clone()).collect();
            (!rules.is_empty()).then(|| (name_key(&service.name), rules.into()))
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

/// The proxy of name rules in the daemon: started when a service first
/// has name rules (at start or on a reload), so a host without them has
/// no DNS listener; told to the kernel with a heartbeat each second.
pub struct Dns {
    config: DnsConfig,
    rules: NameRules,
    state: Mutex<State>,
}

enum State {
    /// Not started; the maps wait for the first name rule.
    Idle(Box<(DnsClients, Learnt, ProxyBeat)>),
    Running(Running),
    /// Stopped with the agent, or a start failed past taking the maps.
    Gone,
}

struct Running {
    proxy: Arc<Proxy<KernelSink>>,
    heartbeat: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Dns {
    #[must_use]
    pub fn new(config: &DnsConfig, maps: (DnsClients, Learnt, ProxyBeat)) -> Self {
        Self {
            config: config.clone(),
            rules: NameRules::default(),
            state: Mutex::new(State::Idle(Box::new(maps))),
        }
    }

    /// Makes `set`'s name rules the ones queries are learnt by, starting
    /// the proxy if this is the first time a service has some. A service
    /// whose name rules changed (or went) loses what it learnt: an
    /// address's rule bits are positions in the old rule list, and an
    /// address of a name no longer allowed must not stay allowed. Its next
    /// lookups learn again (fail closed meanwhile).
    ///
    /// # Errors
    /// The proxy was needed and could not start (its address taken, or
    /// the kernel map not writable): services with name rules then have
    /// no lookup learnt, which fails closed.
    pub fn apply(&self, set: &PolicySet) -> Result<()> {
        let new = name_rules(set);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !new.is_empty() {
            if let State::Idle(_) = *state {
                let State::Idle(maps) = std::mem::replace(&mut *state, State::Gone) else {
                    unreachable!("matched Idle above");
                };
                *state = State::Running(self.start(*maps)?);
            }
        }
        let mut rules = self.rules.write().unwrap_or_else(PoisonError::into_inner);
        if let State::Running(running) = &*state {
            for (service, old) in rules.iter() {
                if new.get(service) != Some(old) {
                    match running.proxy.forget(*service) {
                        Ok(0) => {}
                        Ok(n) => info!(service, forgotten = n, "name rules changed: the addresses this service learnt are revoked until it looks them up again"),
                        Err(e) => warn!(service, "name rules changed, but a learnt address could not be revoked ({e}); it stays allowed until its expiry"),
                    }
                }
            }
        }
        *rules = new;
        Ok(())
    }

    /// Stops the proxy (the agent stops): lookups in flight get no answer
    /// (the clients retry), and after the grace the kernel stops
    /// redirecting; learnt addresses stay in the pinned map.
    pub fn stop(&self) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = State::Gone;
    }

    fn start(&self, maps: (DnsClients, Learnt, ProxyBeat)) -> Result<Running> {
        let (clients, learnt, mut beat) = maps;
        let router = router(clients, Arc::clone(&self.rules));
        let cache = LearntCache::new(LearntLimits {
            min_ttl: Duration::from_secs(u64::from(self.config.min_ttl_secs)),
            max_per_name: self.config.max_per_name as usize,
            max_total: self.config.max_learnt as usize,
        });
        let proxy_config = ProxyConfig {
            upstream_timeout: Duration::from_millis(u64::from(self.config.upstream_timeout_ms)),
            ..ProxyConfig::default()
        };
        let listen = self.config.listen;
        let proxy = Proxy::bind_now(listen, router, proxy_config, cache, KernelSink(learnt))
            .with_context(|| format!("cannot bind the DNS proxy on {listen}"))?;
        let addr = proxy.addr();
        match addr {
            SocketAddr::V4(_) => beat.set_addresses(Some(addr), None),
            SocketAddr::V6(_) => beat.set_addresses(None, Some(addr)),
        }
        beat.beat(monotonic_now())
            .context("cannot write the DNS proxy's address into the kernel")?;
        info!(listen = %addr, "DNS proxy: lookups of services with name rules go through it");
        // Lookups that never leave a service on port 53 teach nothing.
        super::host::warn_host_bypasses();
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
        Ok(Running {
            proxy: Arc::new(proxy),
            heartbeat,
        })
    }
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
            .unwrap_or_else(PoisonError::into_inner)
            .get(&origin.name_key)
            .cloned()?;
        Some(Route {
            service: origin.name_key,
            upstream: SocketAddr::new(ip_of(origin.family, origin.addr), origin.port),
            rules: service_rules,
        })
    })
}
