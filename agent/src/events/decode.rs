//! Raw kernel records -> [`FlowEvent`], naming what the kernel only numbers.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use agent_common::{
    Event, FlowKey, FlowValue, DIRECTION_INGRESS, HOOK_BIND, HOOK_CONNECT, HOOK_EGRESS_PACKET,
    HOOK_INGRESS, HOOK_LSM_SOCKET, HOOK_SENDMSG, HOOK_SETSOCKOPT, HOOK_SOCK_CREATE, HOOK_SOCK_OPS,
    KIND_TCP_CLOSED, KIND_TCP_ESTABLISHED, KIND_VERDICT, RULE_BIND, RULE_DEFAULT_DENY,
    RULE_SOURCE_ROUTE, RULE_UDP_REPLY, RULE_UNREADABLE, SERVICE_NONE, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};

use super::model::{Direction, EventType, FlowEvent, Verdict, SCHEMA};
use crate::{kernel::CompiledPolicy, policy::Mode};

/// Names for the numbers in kernel records, from one placed policy. Kept
/// in the state directory too, to name records a previous agent's programs
/// left in the ring buffer.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Names {
    /// Service id of `services[0]`, rule id of `rules[0]`.
    pub service_base: u32,
    pub rule_base: u32,
    /// By service id - base: (name, file name).
    pub services: Vec<(Arc<str>, String)>,
    /// By rule id - base: `file#egress[i]`.
    pub rules: Vec<Arc<str>>,
}

impl Names {
    pub fn from_policy(policy: &CompiledPolicy) -> Self {
        Self {
            service_base: policy.service_base,
            rule_base: policy.rule_base,
            services: policy
                .services
                .iter()
                .map(|s| (Arc::from(s.name.as_str()), s.file_name.clone()))
                .collect(),
            rules: policy
                .rules
                .iter()
                .map(|r| Arc::from(r.to_string()))
                .collect(),
        }
    }

    /// Whether `id` is a service of this policy (or no service: an
    /// observed unmanaged process).
    pub fn is_live(&self, id: u32) -> bool {
        id == SERVICE_NONE || self.service(id).is_some()
    }

    fn service(&self, id: u32) -> Option<&(Arc<str>, String)> {
        self.services
            .get(id.checked_sub(self.service_base)? as usize)
    }

    fn rule(&self, id: u32) -> Option<&Arc<str>> {
        self.rules.get(id.checked_sub(self.rule_base)? as usize)
    }
}

pub struct Decoder {
    names: Arc<Names>,
    /// The policy before the last reload: records made just before the
    /// switch still carry its ids.
    previous: Option<Arc<Names>>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to turn kernel times into wall time.
    boot_offset_ns: i128,
}

impl Decoder {
    pub fn new(names: Arc<Names>) -> Self {
        Self {
            names,
            previous: None,
            boot_offset_ns: boot_offset_ns(),
        }
    }

    /// After a reload: new ids are named by `names`, the old ones still by
    /// the previous policy.
    pub fn set_names(&mut self, names: Arc<Names>) {
        self.previous = Some(std::mem::replace(&mut self.names, names));
    }

    fn service(&self, id: u32) -> Option<&(Arc<str>, String)> {
        self.names
            .service(id)
            .or_else(|| self.previous.as_ref()?.service(id))
    }

    fn rule(&self, id: u32) -> Option<&Arc<str>> {
        self.names
            .rule(id)
            .or_else(|| self.previous.as_ref()?.rule(id))
    }

    /// Decodes one ring buffer record; None if it is not a record we know
    /// (counted by the caller).
    pub fn decode(&self, bytes: &[u8]) -> Option<FlowEvent> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is plain old data and the slice is long enough;
        // read_unaligned copes with any alignment.
        let raw: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
        self.decode_record(&raw)
    }

    /// A `flow` summary of `calls` calls of the flow `key` (`value`: its
    /// entry), made at `ktime_ns`: named like the flow's first record.
    pub fn flow_summary(
        &self,
        key: &FlowKey,
        value: &FlowValue,
        calls: u64,
        ktime_ns: u64,
    ) -> Option<FlowEvent> {
        let raw = Event {
            kind: KIND_VERDICT,
            verdict: key.verdict,
            family: key.family,
            protocol: key.protocol,
            hook: key.hook,
            direction: key.direction,
            mode: value.mode,
            passive: 0,
            service_id: key.service_id,
            rule_id: key.rule_id,
            ts_ns: ktime_ns,
            cgroup_id: key.cgroup_id,
            // The process is the key's; the thread and the rest, whoever
            // made the flow's first call.
            pid_tgid: (u64::from(key.tgid) << 32) | (value.pid_tgid & 0xffff_ffff),
            uid_gid: value.uid_gid,
            socket_cookie: value.socket_cookie,
            comm: value.comm,
            src_addr: [0; 16],
            dst_addr: key.addr,
            src_port: key.local_port,
            dst_port: key.port,
            suppressed: 0,
            bytes_sent: 0,
            bytes_received: 0,
            duration_ns: 0,
            exe: value.exe,
        };
        let mut ev = self.decode_record(&raw)?;
        ev.kind = EventType::Flow;
        ev.suppressed = None;
        ev.calls = Some(calls);
        Some(ev)
    }

    fn decode_record(&self, raw: &Event) -> Option<FlowEvent> {
        let kind = match raw.kind {
            KIND_VERDICT => EventType::Verdict,
            KIND_TCP_ESTABLISHED => EventType::TcpEstablished,
            KIND_TCP_CLOSED => EventType::TcpClosed,
            _ => return None,
        };
        let managed = raw.service_id != SERVICE_NONE;
        let service = self.service(raw.service_id).filter(|_| managed);
        let verdict = match (kind, raw.verdict) {
            (EventType::Verdict, VERDICT_ALLOW) => Some(Verdict::Allow),
            (EventType::Verdict, VERDICT_DENY) => Some(Verdict::Deny),
            (EventType::Verdict, VERDICT_AUDIT) => Some(Verdict::Audit),
            (EventType::Verdict, _) => return None,
            _ => None,
        };
        let rule = match (verdict, service) {
            (Some(Verdict::Allow), Some((_, file))) if raw.rule_id == RULE_UDP_REPLY => {
                Some(Arc::from(format!("{file}#udp-reply")))
            }
            (Some(Verdict::Allow), Some(_)) if raw.rule_id != RULE_DEFAULT_DENY => {
                self.rule(raw.rule_id).cloned()
            }
            (Some(Verdict::Deny | Verdict::Audit), Some((_, file))) => {
                Some(Arc::from(match (raw.rule_id, raw.hook) {
                    (RULE_BIND, _) | (_, HOOK_BIND) => format!("{file}#bind"),
                    (RULE_UNREADABLE, _) => format!("{file}#unreadable-packet"),
                    (RULE_SOURCE_ROUTE, _) => format!("{file}#source-route"),
                    (_, HOOK_SOCK_CREATE | HOOK_LSM_SOCKET) => format!("{file}#sockets"),
                    (_, HOOK_INGRESS) => format!("{file}#ingress-default-deny"),
                    _ => format!("{file}#default-deny"),
                }))
            }
            _ => None,
        };
        // Which ends the record carries: lifecycle, inbound and packet
        // verdicts both ends, outbound verdicts the remote end, bind the
        // local end, socket creation and options neither; a packet that
        // could not be read none.
        let readable = raw.family == 4 || raw.family == 6;
        let has_local = readable
            && matches!(
                raw.hook,
                HOOK_SOCK_OPS | HOOK_INGRESS | HOOK_BIND | HOOK_EGRESS_PACKET
            );
        let has_remote = readable
            && !matches!(
                raw.hook,
                HOOK_BIND | HOOK_SOCK_CREATE | HOOK_LSM_SOCKET | HOOK_SETSOCKOPT
            );
        // Socket creation records carry the whole protocol number in
        // dst_port (MPTCP's 262 does not fit the one-byte field).
        let protocol = if matches!(raw.hook, HOOK_SOCK_CREATE | HOOK_LSM_SOCKET) {
            raw.dst_port
        } else {
            u16::from(raw.protocol)
        };
        Some(FlowEvent {
            schema: Cow::Borrowed(SCHEMA),
            kind,
            time: self.wall_time(raw.ts_ns),
            host: Cow::Borrowed(super::host::name()),
            ktime_ns: raw.ts_ns,
            service: service.map(|(name, _)| Arc::clone(name)),
            mode: managed.then_some(Cow::Borrowed(Mode::from_kernel(raw.mode).as_str())),
            cgroup_id: raw.cgroup_id,
            pid: (raw.pid_tgid >> 32) as u32,
            tid: raw.pid_tgid as u32,
            uid: raw.uid_gid as u32,
            gid: (raw.uid_gid >> 32) as u32,
            comm: comm(&raw.comm),
            // Named by a stage of the hub (process::names).
            exe: None,
            exe_file: raw.exe.is_known().then_some(raw.exe),
            traffic_direction: Some(if raw.direction == DIRECTION_INGRESS {
                Direction::Ingress
            } else {
                Direction::Egress
            }),
            hook: Cow::Borrowed(match raw.hook {
                HOOK_CONNECT => "connect",
                HOOK_SENDMSG => "sendmsg",
                HOOK_SOCK_OPS => "sock_ops",
                HOOK_BIND => "bind",
                HOOK_SOCK_CREATE => "sock_create",
                HOOK_LSM_SOCKET => "socket_create",
                HOOK_INGRESS => "ingress",
                HOOK_EGRESS_PACKET => "packet",
                HOOK_SETSOCKOPT => "setsockopt",
                _ => "unknown",
            }),
            protocol: Some(protocol_name(protocol)),
            src_ip: has_local.then(|| addr(raw.family, &raw.src_addr)),
            // A connect's or send's local port, when its socket was bound.
            src_port: (has_local || (has_remote && raw.src_port != 0)).then_some(raw.src_port),
            dst_ip: has_remote.then(|| addr(raw.family, &raw.dst_addr)),
            dst_port: has_remote.then_some(raw.dst_port),
            // Named later, by a stage of the hub (dns::serve::DstNames).
            dst_name: None,
            verdict,
            rule,
            suppressed: (kind == EventType::Verdict).then_some(raw.suppressed),
            calls: (kind == EventType::Verdict).then_some(1),
            socket_cookie: raw.socket_cookie,
            bytes_sent: (kind == EventType::TcpClosed).then_some(raw.bytes_sent),
            bytes_received: (kind == EventType::TcpClosed).then_some(raw.bytes_received),
            duration_ns: (kind == EventType::TcpClosed).then_some(raw.duration_ns),
            change: None,
            anomaly: None,
            bytes_base: (kind == EventType::TcpEstablished)
                .then_some((raw.bytes_sent, raw.bytes_received)),
            bytes_unsummarised: None,
        })
    }

    fn wall_time(&self, ktime_ns: u64) -> String {
        let ns = i128::from(ktime_ns) + self.boot_offset_ns;
        let ns = u64::try_from(ns.max(0)).unwrap_or(u64::MAX);
        humantime::format_rfc3339_nanos(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns))
            .to_string()
    }
}

/// The name of an IP protocol number, or the number.
fn protocol_name(number: u16) -> Cow<'static, str> {
    use agent_common::{
        PROTO_DCCP, PROTO_ICMP, PROTO_ICMPV6, PROTO_L2TP, PROTO_MPTCP, PROTO_SCTP, PROTO_TCP,
        PROTO_UDP, PROTO_UDPLITE,
    };
    let name = match u32::from(number) {
        n if n == u32::from(PROTO_ICMP) => "icmp",
        n if n == u32::from(PROTO_TCP) => "tcp",
        n if n == u32::from(PROTO_UDP) => "udp",
        n if n == u32::from(PROTO_ICMPV6) => "icmpv6",
        PROTO_DCCP => "dccp",
        PROTO_L2TP => "l2tp",
        PROTO_SCTP => "sctp",
        PROTO_UDPLITE => "udplite",
        PROTO_MPTCP => "mptcp",
        _ => return Cow::Owned(number.to_string()),
    };
    Cow::Borrowed(name)
}

fn addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

fn comm(bytes: &[u8; 16]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn boot_offset_ns() -> i128 {
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> Event {
        // SAFETY: all-zero is a valid Event.
        let mut e: Event = unsafe { std::mem::zeroed() };
        e.kind = KIND_VERDICT;
        e.family = 4;
        e.protocol = 6;
        e.hook = HOOK_CONNECT;
        e.pid_tgid = (42u64 << 32) | 43;
        e.uid_gid = (7u64 << 32) | 5;
        e.comm[..4].copy_from_slice(b"curl");
        e.dst_addr[..4].copy_from_slice(&[192, 0, 2, 9]);
        e.dst_port = 5432;
        e
    }

    fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec()
    }

    fn decoder() -> Decoder {
        Decoder::new(Arc::new(Names {
            service_base: 0,
            rule_base: 0,
            services: vec![("billing".into(), "billing.toml".into())],
            rules: vec![
                "billing.toml#egress[0]".into(),
                "billing.toml#egress[1]".into(),
            ],
        }))
    }

    #[test]
    fn names_the_service_rule_and_process() {
        let mut e = raw();
        e.verdict = VERDICT_ALLOW;
        e.rule_id = 1;
        let ev = decoder().decode(&bytes(&e)).expect("decodes");
        assert_eq!(ev.service.as_deref(), Some("billing"));
        assert_eq!(ev.rule.as_deref(), Some("billing.toml#egress[1]"));
        assert_eq!((ev.pid, ev.tid, ev.uid, ev.gid), (42, 43, 5, 7));
        assert_eq!(ev.comm, "curl");
        assert_eq!(
            ev.dst_ip.map(|a| a.to_string()).as_deref(),
            Some("192.0.2.9")
        );
        assert_eq!(ev.verdict, Some(Verdict::Allow));
        assert_eq!(ev.src_ip, None);
    }

    #[test]
    fn a_denial_names_the_default_deny_of_its_file() {
        let mut e = raw();
        e.verdict = VERDICT_DENY;
        e.rule_id = RULE_DEFAULT_DENY;
        let ev = decoder().decode(&bytes(&e)).expect("decodes");
        assert_eq!(ev.rule.as_deref(), Some("billing.toml#default-deny"));
        assert_eq!(ev.verdict, Some(Verdict::Deny));
    }

    #[test]
    fn lifecycle_records_carry_both_ends_and_byte_counts() {
        let mut e = raw();
        e.kind = agent_common::KIND_TCP_CLOSED;
        e.verdict = agent_common::VERDICT_NONE;
        e.hook = HOOK_SOCK_OPS;
        e.src_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.src_port = 40000;
        e.bytes_sent = 10;
        e.bytes_received = 20;
        e.duration_ns = 30;
        let ev = decoder().decode(&bytes(&e)).expect("decodes");
        assert_eq!(ev.kind, EventType::TcpClosed);
        assert_eq!(ev.verdict, None);
        assert_eq!(ev.rule, None);
        assert_eq!(
            ev.src_ip.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(ev.src_port, Some(40000));
        assert_eq!(
            (ev.bytes_sent, ev.bytes_received, ev.duration_ns),
            (Some(10), Some(20), Some(30))
        );
    }

    #[test]
    fn unknown_kinds_and_short_records_are_refused() {
        let mut e = raw();
        e.kind = 99;
        assert!(decoder().decode(&bytes(&e)).is_none());
        assert!(decoder().decode(&[0u8; 8]).is_none());
    }
}
