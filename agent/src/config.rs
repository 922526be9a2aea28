//! The daemon's own configuration (`/etc/bulkhead/bulkhead.toml`). A bad
//! config stops the daemon: a security agent never falls back to defaults.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/bulkhead/bulkhead.toml";
pub const DEFAULT_POLICY_DIR: &str = "/etc/bulkhead/policies";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulkhead";
pub const DEFAULT_EVENTS_SINK: &str = "/var/log/bulkhead/events.jsonl";
/// The group that reads logs on Debian and on every systemd host (its
/// sysusers `basic.conf` makes it).
pub const DEFAULT_SINK_GROUP: &str = "adm";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/bulkhead/control.sock";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of policy files, one `*.toml` per service.
    pub policy_dir: PathBuf,
    /// Kernel-side diagnostics through aya-log (off: zero cost on the hot path).
    pub bpf_log: bool,
    /// The agent's own log: a file to append to; unset = stderr (the
    /// journal under systemd).
    pub log_file: Option<PathBuf>,
    /// Where programs, links and maps are pinned (bpffs), so that
    /// enforcement survives the agent's restarts.
    pub pin_dir: PathBuf,
    /// The agent's state (names of the policy in force, quarantines).
    pub state_dir: PathBuf,
    pub events: EventsConfig,
    pub metrics: MetricsConfig,
    pub control: ControlConfig,
    /// Anomaly detection (docs/anomaly.md).
    pub anomaly: crate::anomaly::AnomalyConfig,
    /// OTLP/HTTP export of events (docs/export.md); off by default.
    pub export: crate::export::ExportConfig,
    /// UDP pinholes of ingress-restricted services.
    pub udp_replies: UdpRepliesConfig,
    /// How many managed cgroups the kernel holds.
    pub services: ServicesConfig,
    /// The self-check of the kernel maps against the policy in force.
    pub self_check: SelfCheckConfig,
    /// In-kernel flow counting (`[flows]`).
    pub flows: FlowsConfig,
    /// Fleet mode: export to ClickHouse (docs/fleet.md); off by default.
    pub fleet: crate::fleet::FleetConfig,
    /// The DNS proxy of egress rules by name (docs/dns-names.md).
    pub dns: DnsConfig,
}

/// Room for managed cgroups: one per running service, one per running
/// instance of a template policy.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// Entries of the kernel's SERVICES map (a cgroup that goes is removed
    /// at once, so this bounds the cgroups managed at one time).
    pub max_cgroups: u32,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            max_cgroups: agent_common::DEFAULT_MAX_CGROUPS,
        }
    }
}

impl ServicesConfig {
    /// The bounds of `max_cgroups`.
    pub const RANGE: std::ops::RangeInclusive<u32> = 64..=1 << 20;

    fn problems(&self) -> Vec<String> {
        if Self::RANGE.contains(&self.max_cgroups) {
            return Vec::new();
        }
        vec![format!(
            "services.max_cgroups = {}: must be between {} and {}",
            self.max_cgroups,
            Self::RANGE.start(),
            Self::RANGE.end()
        )]
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            policy_dir: PathBuf::from(DEFAULT_POLICY_DIR),
            bpf_log: false,
            log_file: None,
            pin_dir: PathBuf::from(crate::kernel::pins::DEFAULT_PIN_ROOT),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            events: EventsConfig::default(),
            metrics: MetricsConfig::default(),
            control: ControlConfig::default(),
            anomaly: crate::anomaly::AnomalyConfig::default(),
            export: crate::export::ExportConfig::default(),
            udp_replies: UdpRepliesConfig::default(),
            services: ServicesConfig::default(),
            self_check: SelfCheckConfig::default(),
            flows: FlowsConfig::default(),
            fleet: crate::fleet::FleetConfig::default(),
            dns: DnsConfig::default(),
        }
    }
}

/// The DNS proxy through which services with name rules look names up
/// (`[dns]`, docs/dns-names.md).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// IPv4 loopback address the proxy listens on (UDP and TCP); port 0
    /// picks a free one, which the kernel programs are told. Not used when
    /// the service manager passes the sockets (`bulkhead-dns.socket`).
    pub listen: SocketAddr,
    /// The same for lookups sent to IPv6 resolvers; if it cannot be bound
    /// (no IPv6), those are not redirected and teach nothing.
    pub listen6: SocketAddr,
    /// Shortest time a learnt address stays allowed, whatever its TTL.
    pub min_ttl_secs: u32,
    /// Most addresses of each family one (service, name) holds; more
    /// evict the oldest of that family.
    pub max_per_name: u32,
    /// Most learnt (service, name, address) entries in all: the kernel
    /// map's size (about 100 bytes an entry, allocated as used).
    pub max_learnt: u32,
    /// How long a resolver has to answer before the client gets SERVFAIL.
    pub upstream_timeout_ms: u32,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen6: SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
            min_ttl_secs: 60,
            max_per_name: 64,
            max_learnt: agent_common::DEFAULT_MAX_LEARNT,
            upstream_timeout_ms: 2000,
        }
    }
}

impl DnsConfig {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.listen.is_ipv4() && self.listen.ip().is_loopback()) {
            out.push(format!(
                "dns.listen = \"{}\": must be an IPv4 loopback address (the proxy answers local services only)",
                self.listen
            ));
        }
        if !(self.listen6.is_ipv6() && self.listen6.ip().is_loopback()) {
            out.push(format!(
                "dns.listen6 = \"{}\": must be an IPv6 loopback address, [::1]:PORT",
                self.listen6
            ));
        }
        if self.max_per_name == 0 {
            out.push("dns.max_per_name = 0: must be at least 1".to_string());
        }
        if !(16..=4_194_304).contains(&self.max_learnt) {
            out.push(format!(
                "dns.max_learnt = {}: must be between 16 and 4194304",
                self.max_learnt
            ));
        }
        if !(100..=30_000).contains(&self.upstream_timeout_ms) {
            out.push(format!(
                "dns.upstream_timeout_ms = {}: must be between 100 and 30000",
                self.upstream_timeout_ms
            ));
        }
        out
    }
}

/// The self-check reads the policy maps back, compares them with the
/// policy in force and repairs any difference (docs/operations.md). It
/// also runs at start, after every reload and when a map write fails.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SelfCheckConfig {
    /// Seconds between two periodic checks.
    pub interval_secs: u32,
}

impl Default for SelfCheckConfig {
    fn default() -> Self {
        Self { interval_secs: 60 }
    }
}

impl SelfCheckConfig {
    fn problems(&self) -> Vec<String> {
        if (1..=86_400).contains(&self.interval_secs) {
            Vec::new()
        } else {
            vec![format!(
                "self_check.interval_secs = {}: must be between 1 and 86400",
                self.interval_secs
            )]
        }
    }
}

/// The pinholes that let an ingress-restricted service's UDP exchanges
/// through (answers to what it sent, answers to peers a rule let in).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UdpRepliesConfig {
    /// A pinhole unused this long (no send to the peer, no datagram a rule
    /// let in) is closed. Conntrack's UDP default for a stream is 120 s.
    pub idle_timeout_secs: u32,
    /// The most pinholes one service holds; past it, new peers are still
    /// judged by the rules datagram by datagram but get no pinhole.
    pub per_service: u32,
}

impl Default for UdpRepliesConfig {
    fn default() -> Self {
        Self {
            idle_timeout_secs: 120,
            per_service: agent_common::UDP_PEERS_PER_SERVICE,
        }
    }
}

impl UdpRepliesConfig {
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.idle_timeout_secs == 0 {
            out.push("udp_replies.idle_timeout_secs = 0: must be at least 1".to_string());
        }
        if self.per_service == 0 || self.per_service > agent_common::DEFAULT_UDP_PEERS {
            out.push(format!(
                "udp_replies.per_service = {}: must be between 1 and {}",
                self.per_service,
                agent_common::DEFAULT_UDP_PEERS
            ));
        }
        out
    }
}

/// How calls are counted per flow in the kernel (docs/events.md, "Flows").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// A flow's calls since its last record are reported this often (a
    /// `flow` summary).
    pub interval_secs: u32,
    /// A flow with no call for this long ends; its next call starts a new
    /// flow with a record of its own.
    pub idle_timeout_secs: u32,
    /// Flows counted at one time (kernel memory: 184 bytes each,
    /// preallocated). A new flow that finds the table full has each call
    /// reported by a record of its own.
    pub table_size: u32,
    /// Outbound TCP connections of managed services whose owner the kernel
    /// keeps in its preallocated table at one time; the rest go to socket
    /// storage (nothing lost, a slower connect).
    pub tcp_table_size: u32,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            interval_secs: 10,
            idle_timeout_secs: 60,
            table_size: agent_common::DEFAULT_FLOW_TABLE,
            tcp_table_size: agent_common::DEFAULT_SOCK_OWNERS,
        }
    }
}

impl FlowsConfig {
    /// The bounds of `table_size` and `tcp_table_size`.
    const TABLE: std::ops::RangeInclusive<u32> = 16..=4_194_304;
    /// The bounds of `interval_secs`.
    const INTERVAL: std::ops::RangeInclusive<u32> = 1..=3600;

    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !Self::INTERVAL.contains(&self.interval_secs) {
            out.push(format!(
                "flows.interval_secs = {}: must be between {} and {}",
                self.interval_secs,
                Self::INTERVAL.start(),
                Self::INTERVAL.end()
            ));
        }
        if self.idle_timeout_secs < self.interval_secs {
            out.push(format!(
                "flows.idle_timeout_secs = {}: must be at least flows.interval_secs ({})",
                self.idle_timeout_secs, self.interval_secs
            ));
        }
        for (key, size) in [
            ("table_size", self.table_size),
            ("tcp_table_size", self.tcp_table_size),
        ] {
            if !Self::TABLE.contains(&size) {
                out.push(format!(
                    "flows.{key} = {size}: must be between {} and {}",
                    Self::TABLE.start(),
                    Self::TABLE.end()
                ));
            }
        }
        out
    }
}

/// The decision log.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Where JSON lines go: a file path, or "-" for stdout.
    pub sink: String,
    /// The group the decision log file is given (mode 0640: a log shipper
    /// in it reads the file); "" keeps the agent's own group.
    pub sink_group: String,
    /// Size of the kernel ring buffer in bytes: a power of two, at least 4096.
    pub ring_buffer_bytes: u32,
    /// Also emit events (never enforce) for processes outside every managed
    /// service.
    pub observe_unmanaged: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            sink: DEFAULT_EVENTS_SINK.to_string(),
            sink_group: DEFAULT_SINK_GROUP.to_string(),
            ring_buffer_bytes: agent_common::DEFAULT_EVENTS_BYTES,
            observe_unmanaged: false,
        }
    }
}

/// The Prometheus endpoint (and /healthz).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address to listen on; loopback by default. Anything else exposes the
    /// service map to the network: set it only on purpose.
    pub listen: SocketAddr,
    /// Names (without a port) answered in `Host` besides addresses and
    /// `localhost`, e.g. a proxy's; any other name gets 421 (DNS rebinding).
    pub allowed_hosts: Vec<String>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9469)),
            allowed_hosts: Vec::new(),
        }
    }
}

/// The local control socket (`bulkhead flows`, `status`, ...).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Unix socket path; created mode 0600 (root only).
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// Reads `path`; with no path, the default file if it exists, else the
    /// built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = crate::policy::position(text, e.span().map_or(0, |s| s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        let rb = config.events.ring_buffer_bytes;
        if rb < 4096 || !rb.is_power_of_two() {
            let (line, column) =
                crate::policy::position(text, key_offset(text, "events.ring_buffer_bytes"));
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: format!(
                    "events.ring_buffer_bytes = {rb}: must be a power of two of at least 4096"
                ),
            });
        }
        let problems: Vec<String> = config
            .anomaly
            .problems()
            .into_iter()
            .chain(config.export.problems())
            .chain(config.udp_replies.problems())
            .chain(config.services.problems())
            .chain(config.self_check.problems())
            .chain(config.flows.problems())
            .chain(config.fleet.problems())
            .chain(config.dns.problems())
            .collect();
        if let Some(first) = problems.first() {
            // Points at the first offending key.
            let key = first.split([':', ' ']).next().unwrap_or_default();
            let (line, column) = crate::policy::position(text, key_offset(text, key));
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: problems.join("; "),
            });
        }
        // A relative policy_dir is relative to the config file.
        if config.policy_dir.is_relative() {
            if let Some(dir) = path.parent() {
                config.policy_dir = dir.join(&config.policy_dir);
            }
        }
        Ok(config)
    }
}

/// Where `key` (dotted, from the top: `anomaly.volume_spike.factor`) is
/// written in `text`: the start of the key itself, or, when the file leaves
/// it to its default, of the nearest table above it that the file writes;
/// 0 when none is. Only called on a document that already parsed.
fn key_offset(text: &str, key: &str) -> usize {
    use toml::de::{DeTable, DeValue};
    let Ok(doc) = DeTable::parse(text) else {
        return 0;
    };
    let mut table = doc.get_ref();
    let mut found = 0;
    for part in key.split('.') {
        let Some((k, value)) = table.get_key_value(part) else {
            break;
        };
        found = k.span().start;
        match value.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line:column an error starts with.
    fn at(text: &str) -> String {
        let err = Config::parse(Path::new("c.toml"), text).expect_err("refused");
        let message = err.to_string();
        message
            .split(": ")
            .next()
            .unwrap_or_default()
            .trim_start_matches("c.toml:")
            .to_string()
    }

    /// A bad `volume_spike.factor` is reported on its own line, not on the
    /// line of the first `factor` in the file (`rate_spike.factor`'s).
    #[test]
    fn a_bad_key_is_reported_where_it_is_not_where_its_leaf_name_first_appears() {
        let text = "[anomaly.rate_spike]\nfactor = 3\n\n[anomaly.volume_spike]\nfactor = 0\n";
        assert_eq!(at(text), "5:1");
        // The same in dotted keys under one table: at `factor` itself.
        let text = "[anomaly]\nrate_spike.factor = 3\nvolume_spike.factor = 0\n";
        assert_eq!(at(text), "3:14");
    }

    /// A key of another section with the same leaf name, or a comment that
    /// names it, is not taken for it.
    #[test]
    fn a_nested_bad_key_is_found_past_comments_and_namesakes() {
        let text = "# udp_replies.per_service: pinholes per service\n[anomaly.new_destination]\nipv4_prefix = 24\nipv6_prefix = 129\n[udp_replies]\nper_service = 0\n";
        // The first problem reported is anomaly.new_destination.ipv6_prefix.
        assert_eq!(at(text), "4:1");
        let text = "# ring_buffer_bytes: a power of two\n[events]\nring_buffer_bytes = 5000\n";
        assert_eq!(at(text), "3:1");
    }

    /// A key left to its default (the problem is another key's value)
    /// points at its table.
    #[test]
    fn a_default_key_points_at_its_table() {
        let text = "bpf_log = false\n\n[export]\nbatch_size = 100\nqueue_capacity = 10\n";
        assert_eq!(at(text), "5:1");
        let text = "bpf_log = false\n\n[export]\nqueue_capacity = 10\nbatch_size = 100\n";
        assert_eq!(at(text), "4:1");
        let text = "bpf_log = false\n[anomaly]\nfan_out.max_hosts = 5000\n";
        assert_eq!(at(text), "2:2");
    }

    #[test]
    fn parses_and_resolves_relative_policy_dir() {
        let c = Config::parse(
            Path::new("/etc/x/bulkhead.toml"),
            "policy_dir = \"p\"\nbpf_log = true\n",
        )
        .expect("valid config");
        assert_eq!(c.policy_dir, PathBuf::from("/etc/x/p"));
        assert!(c.bpf_log);
    }

    #[test]
    fn the_shipped_config_parses_with_its_metrics_defaults() {
        let text = include_str!("../../policies/config/bulkhead.toml");
        let c = Config::parse(Path::new(DEFAULT_CONFIG), text).expect("the shipped config parses");
        assert_eq!(c.metrics, MetricsConfig::default());
    }

    #[test]
    fn sections_parse_and_default() {
        let c = Config::parse(
            Path::new("/c.toml"),
            "[events]\nsink = \"-\"\nobserve_unmanaged = true\n[metrics]\nlisten = \"127.0.0.1:9999\"\nallowed_hosts = [\"metrics.example\"]\n",
        )
        .expect("valid config");
        assert_eq!(c.events.sink, "-");
        assert!(c.events.observe_unmanaged);
        assert_eq!(
            c.events.ring_buffer_bytes,
            agent_common::DEFAULT_EVENTS_BYTES
        );
        assert_eq!(c.metrics.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(c.metrics.allowed_hosts, ["metrics.example"]);
        assert_eq!(c.control.socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
    }

    #[test]
    fn flow_settings_out_of_bounds_are_refused_at_their_line() {
        let err = Config::parse(
            Path::new("c.toml"),
            "[flows]\ninterval_secs = 30\nidle_timeout_secs = 10\n",
        )
        .expect_err("an idle timeout shorter than the interval");
        assert!(err.to_string().starts_with("c.toml:3:1:"), "{err}");
        assert!(
            err.to_string().contains("flows.idle_timeout_secs = 10"),
            "{err}"
        );
        let err = Config::parse(Path::new("c.toml"), "[flows]\ntable_size = 8\n")
            .expect_err("a table of 8 flows");
        assert!(err.to_string().starts_with("c.toml:2:1:"), "{err}");
        let ok = Config::parse(Path::new("c.toml"), "[flows]\ntable_size = 16\n")
            .expect("16 flows is the smallest table");
        assert_eq!(ok.flows.table_size, 16);
        assert_eq!(ok.flows.interval_secs, 10);
        let err = Config::parse(Path::new("c.toml"), "[flows]\n\ntcp_table_size = 0\n")
            .expect_err("a table of no connections");
        assert!(err.to_string().starts_with("c.toml:3:1:"), "{err}");
        assert!(
            err.to_string().contains("flows.tcp_table_size = 0"),
            "{err}"
        );
    }

    #[test]
    fn ring_buffer_size_must_be_a_power_of_two() {
        let err = Config::parse(Path::new("c.toml"), "[events]\nring_buffer_bytes = 5000\n")
            .expect_err("5000 is not a power of two");
        assert!(err.to_string().starts_with("c.toml:2:1:"), "{err}");
    }

    #[test]
    fn self_check_interval_defaults_to_a_minute_and_must_be_positive() {
        let c = Config::parse(Path::new("c.toml"), "").expect("defaults");
        assert_eq!(c.self_check.interval_secs, 60);
        let c =
            Config::parse(Path::new("c.toml"), "[self_check]\ninterval_secs = 5\n").expect("valid");
        assert_eq!(c.self_check.interval_secs, 5);
        let err = Config::parse(Path::new("c.toml"), "[self_check]\ninterval_secs = 0\n")
            .expect_err("0 is refused");
        assert!(err.to_string().starts_with("c.toml:2:1:"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let err = Config::parse(Path::new("c.toml"), "bpf_log = false\npolicy_dri = \"x\"\n")
            .expect_err("typo must be refused");
        let text = err.to_string();
        assert!(text.starts_with("c.toml:2:1:"), "{text}");
        assert!(text.contains("policy_dri"), "{text}");
    }

    #[test]
    fn the_anomaly_section_parses_and_refuses_bad_values() {
        let c = Config::parse(
            std::path::Path::new("/c.toml"),
            "[anomaly]\ninterval_s = 5\n[anomaly.fan_out]\nmax_ports = 10\n",
        )
        .expect("valid");
        assert_eq!(c.anomaly.interval_s, 5);
        assert_eq!(c.anomaly.fan_out.max_ports, 10);
        assert!(c.anomaly.rate_spike.enabled);
        let err = Config::parse(
            std::path::Path::new("/c.toml"),
            "[anomaly]\ninterval_s = 0\n",
        )
        .expect_err("zero interval");
        assert!(err.to_string().contains("interval_s"), "{err}");
        assert!(Config::parse(
            std::path::Path::new("/c.toml"),
            "[anomaly.rate_spike]\nfactr = 3\n"
        )
        .is_err());
    }

    /// The shipped file spells the ring buffer out: it must say the
    /// default, whose memory cost docs/config.md gives.
    #[test]
    fn the_shipped_config_has_the_default_ring_buffer() {
        let text = include_str!("../../policies/config/bulkhead.toml");
        let c = Config::parse(Path::new(DEFAULT_CONFIG), text).expect("the shipped config parses");
        assert_eq!(
            c.events.ring_buffer_bytes,
            agent_common::DEFAULT_EVENTS_BYTES
        );
    }

    #[test]
    fn the_shipped_config_has_the_anomaly_defaults() {
        let text = include_str!("../../policies/config/bulkhead.toml");
        let c = Config::parse(std::path::Path::new("/etc/bulkhead/bulkhead.toml"), text)
            .expect("shipped config parses");
        assert_eq!(c.anomaly, crate::anomaly::AnomalyConfig::default());
    }

    #[test]
    fn export_needs_an_http_or_https_url_and_is_off_by_default() {
        let off =
            crate::export::settings::resolve(&crate::export::ExportConfig::default(), &|_| None);
        assert_eq!(off, Ok(None));
        let parse = |text: &str| Config::parse(std::path::Path::new("/c.toml"), text);
        let c = parse(
            "[export]\notlp_endpoint = \"http://127.0.0.1:4318\"\nevents = \"anomalies\"\nprotocol = \"http/protobuf\"\ncompression = \"gzip\"\n[export.headers]\napi-key = \"k\"\n",
        )
        .expect("valid");
        assert_eq!(c.export.events, crate::export::ExportEvents::Anomalies);
        assert_eq!(
            c.export.protocol,
            Some(crate::export::Protocol::HttpProtobuf)
        );
        assert_eq!(c.export.compression, Some(crate::export::Compression::Gzip));
        parse("[export]\notlp_endpoint = \"https://collector.example\"\n").expect("https is fine");
        let err = parse("[export]\notlp_endpoint = \"ftp://collector.example/v1/logs\"\n")
            .expect_err("ftp is refused");
        assert!(err.to_string().contains("http:// or https://"), "{err}");
        let err = parse(
            "[export]\notlp_endpoint = \"http://c:4318\"\n[export.headers]\n\"bad name\" = \"v\"\n",
        )
        .expect_err("a bad header name is refused");
        assert!(err.to_string().contains("not a header name"), "{err}");
        assert!(parse("[export]\nprotocol = \"grpc\"\n").is_err());
        assert!(parse("[export]\nqueue_capacity = 1\n").is_err());
    }
}
