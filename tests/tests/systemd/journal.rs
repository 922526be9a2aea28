//! The agent's log in the journal, under a real systemd and journald: every
//! line at its level's syslog priority (ERROR 3, WARN 4, INFO 6, DEBUG and
//! TRACE 7), so `journalctl -p warning -u bulkhead` shows warnings only.

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{eventually, free_port_block};

use super::{
    namespace::{boot_ns_systemd, ns_systemd_prerequisites, AgentOutput, NsSystemd},
    section, text, tool, unit_text,
};

/// The unit's journal lines: (PRIORITY, MESSAGE) in order, `-p` `priority`
/// and above (`None`: all).
fn journal(ns: &NsSystemd, priority: Option<&str>) -> Vec<(String, String)> {
    let mut args = vec![
        "journalctl",
        "--no-pager",
        "-u",
        "bulkhead.service",
        "-o",
        "json",
    ];
    if let Some(p) = priority {
        args.extend(["-p", p]);
    }
    let out = ns.run(&args);
    assert!(out.status.success(), "journalctl: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("journalctl -o json gave {line:?}: {e}"));
            let field = |k: &str| entry[k].as_str().unwrap_or_default().to_owned();
            (field("PRIORITY"), field("MESSAGE"))
        })
        .collect()
}

/// Waits until a journal line of the unit contains `needle`; returns it
/// as (PRIORITY, MESSAGE).
fn wait_for_line(ns: &NsSystemd, needle: &str) -> (String, String) {
    eventually(Duration::from_secs(15), Duration::from_millis(200), || {
        journal(ns, None)
            .into_iter()
            .find(|(_, m)| m.contains(needle))
            .ok_or(())
    })
    .unwrap_or_else(|()| panic!("no journal line with {needle:?}:\n{:#?}", journal(ns, None)))
}

#[test]
fn journal_shows_warnings_at_their_priority() {
    let Some(systemd) = ns_systemd_prerequisites() else {
        return;
    };
    if tool("journalctl", "systemd").is_none() {
        return;
    }
    // The prefixes are read with systemd's default SyslogLevelPrefix=yes.
    let unit = unit_text();
    assert!(
        section(&unit, "Service")
            .get("SyslogLevelPrefix")
            .is_none_or(|v| v.iter().all(|v| v == "yes")),
        "the unit must keep SyslogLevelPrefix=yes"
    );
    let port = free_port_block(Ipv4Addr::LOCALHOST.into(), 1);
    let ns = boot_ns_systemd(
        &systemd,
        "cgroup = \"/svc\"\nmode = \"audit\"\n",
        port,
        &|c| c,
        AgentOutput::Journal,
    );
    ns.wait_state("active", Duration::from_secs(30));

    // An info line: logrotate's signal, as its postrotate sends it.
    let out = ns.run(&[
        "systemctl",
        "kill",
        "--kill-whom=main",
        "--signal=SIGUSR1",
        "bulkhead.service",
    ]);
    assert!(out.status.success(), "systemctl kill: {}", text(&out));
    let reopened = wait_for_line(&ns, "SIGUSR1: decision log re-opened");
    assert_eq!(reopened.0, "6", "{reopened:?}");
    let warnings_before = journal(&ns, Some("warning"));
    assert!(
        warnings_before
            .iter()
            .all(|(p, m)| matches!(p.as_str(), "0" | "1" | "2" | "3" | "4") && !m.contains("INFO")),
        "journalctl -p warning shows lower priorities: {warnings_before:#?}"
    );

    // A warning: a reload refused (the watch sees the file change).
    let out = ns.run(&[
        "/bin/sh",
        "-c",
        "printf 'cgroup = \"/svc\"\\nmode = \"sideways\"\\n' > /etc/bulkhead/policies/svc.toml",
    ]);
    assert!(out.status.success(), "write the bad policy: {}", text(&out));
    wait_for_line(&ns, "policy reload refused");
    let warnings = journal(&ns, Some("warning"));
    let new: Vec<&(String, String)> = warnings.iter().skip(warnings_before.len()).collect();
    assert_eq!(
        warnings[..warnings_before.len()],
        warnings_before[..],
        "earlier warnings changed"
    );
    // Exactly the refusal (once per reload the watch made of the write):
    // its first line, then the error on its own line, same priority.
    assert!(
        !new.is_empty() && new.len().is_multiple_of(2),
        "journalctl -p warning after the bad policy: {new:#?}"
    );
    for pair in new.chunks(2) {
        let [first, error] = pair else {
            unreachable!("chunks of 2")
        };
        assert_eq!(first.0, "4", "{first:?}");
        assert!(
            first
                .1
                .contains("WARN policy reload refused; the policy in force is unchanged:"),
            "{first:?}"
        );
        assert_eq!(error.0, "4", "{error:?}");
        assert!(error.1.contains("svc.toml"), "{error:?}");
    }
    assert!(
        !warnings.iter().any(|(_, m)| m.contains("SIGUSR1")),
        "an info line passed -p warning: {warnings:#?}"
    );
}
