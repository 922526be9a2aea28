//! OTLP export configured the OpenTelemetry way, end to end: the agent
//! started with the `OTEL_EXPORTER_OTLP_*` environment (a base endpoint,
//! protobuf, gzip, a header) delivers a managed service's denied connect to
//! a real OTLP/HTTP receiver on loopback (`tests/src/otlp.rs`), as an
//! `ExportLogsServiceRequest` whose record carries the semantic-convention
//! attributes and the host; and a bad variable refuses the start, naming
//! it, before READY.

use std::{ffi::OsStr, net::SocketAddr, time::Duration};

use integration_tests::{
    events::kernel_hostname, otlp::OtlpReceiver, probe, require_bpf, service_policy, CgroupGuard,
    Daemon, PolicyDir,
};

#[test]
fn the_otel_environment_sets_endpoint_protocol_compression_and_headers() {
    if !require_bpf() {
        return;
    }
    let receiver = OtlpReceiver::start();
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("shop.toml", &service_policy(&svc, "enforce", &[]))]);
    let endpoint = format!("http://{}", receiver.addr);
    let env: [(&str, &OsStr); 4] = [
        // A base URL: the agent adds /v1/logs, as the specification says.
        ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new(&endpoint)),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", OsStr::new("http/protobuf")),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", OsStr::new("gzip")),
        // Percent-encoded value: "t0k=en".
        ("OTEL_EXPORTER_OTLP_HEADERS", OsStr::new("api-key=t0k%3Den")),
    ];
    let daemon = Daemon::start_with_env(&policies, "[export]\nflush_interval_ms = 100\n", &env);
    // No rule allows it: EPERM, and a verdict event.
    let target: SocketAddr = "127.0.0.1:9".parse().expect("address");
    probe!()
        .in_cgroup(svc.path())
        .tcp_connect(target)
        .assert_eperm("shop has no egress rule");
    let (request, record) = receiver.wait_record(|r| {
        r.event["type"] == "verdict" && r.event["service"] == "shop" && r.event["dst_port"] == 9
    });
    assert_eq!(request.path, "/v1/logs");
    assert_eq!(
        request.header("content-type"),
        Some("application/x-protobuf")
    );
    assert_eq!(request.header("content-encoding"), Some("gzip"));
    assert_eq!(request.header("api-key"), Some("t0k=en"));
    let host = kernel_hostname();
    assert_eq!(record.resource.get("host.name"), Some(&host));
    assert_eq!(record.event["host"], host.as_str());
    let attr = |k: &str| record.attributes.get(k).map(String::as_str);
    assert_eq!(attr("bulkhead.service"), Some("shop"));
    assert_eq!(attr("bulkhead.verdict"), Some("deny"));
    assert_eq!(attr("bulkhead.rule"), Some("shop.toml#default-deny"));
    assert_eq!(attr("bulkhead.traffic_direction"), Some("egress"));
    assert_eq!(attr("network.transport"), Some("tcp"));
    assert_eq!(attr("network.type"), Some("ipv4"));
    assert_eq!(attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(attr("network.peer.port"), Some("9"));
    assert_eq!(attr("process.executable.name"), Some("bulkhead-probe"));
    let pid = record.event["pid"].as_u64().expect("a pid").to_string();
    assert_eq!(attr("process.pid"), Some(pid.as_str()));
    assert_eq!(attr("user.id"), Some("0"));
    drop(daemon);
}

#[test]
fn a_bad_otel_variable_refuses_the_start_naming_it() {
    if !require_bpf() {
        return;
    }
    let svc = CgroupGuard::new();
    let policies = PolicyDir::with(&[("shop.toml", &service_policy(&svc, "enforce", &[]))]);
    let mut daemon = Daemon::spawn_with_env(
        &[OsStr::new("--policy-dir"), policies.path().as_os_str()],
        "# defaults\n",
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                OsStr::new("http://127.0.0.1:4318"),
            ),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", OsStr::new("zstd")),
        ],
    );
    let status = daemon.wait_exit(Duration::from_secs(20));
    let log = daemon.log();
    assert_eq!(status.code(), Some(1), "exit status {status}; log:\n{log}");
    assert!(
        log.contains("OTEL_EXPORTER_OTLP_COMPRESSION = \"zstd\": must be gzip or none"),
        "the log names the variable:\n{log}"
    );
    assert!(
        !daemon
            .notifications()
            .iter()
            .any(|n| n.lines().any(|l| l == "READY=1")),
        "READY=1 was sent"
    );
}
