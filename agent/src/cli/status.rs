//! `bulkhead status`: the running agent's state, as a few readable lines
//! or as its JSON answer.

use std::process::ExitCode;

use serde_json::Value;

use super::{args::StatusArgs, ask::ask};
use crate::control::protocol::{Request, StatusRequest};

pub fn status(args: &StatusArgs) -> ExitCode {
    match ask("status", &args.socket, &Request::Status(StatusRequest {})) {
        Ok(result) if args.json => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(result) => {
            print!("{}", render_status(&result));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The self-check's line(s) of the status: drift left now, and the last
/// drift found.
fn self_check_line(c: &Value) -> String {
    let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out = match n("drift") {
        0 => format!(
            "self-check: no drift ({} checks, every {} s; the last read {} entries in {} ms)\n",
            n("checks"),
            n("interval_secs"),
            n("last_entries_read"),
            n("last_duration_us") / 1000
        ),
        left => format!(
            "self-check: DRIFT, {left} differences left after the repair ({})\n",
            c.get("drift_by_kind")
                .map(Value::to_string)
                .unwrap_or_default()
        ),
    };
    if let Some(f) = c.get("last_found").filter(|f| !f.is_null()) {
        let s = |k: &str| f.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let repaired = match f.get("repaired").and_then(Value::as_bool) {
            Some(true) => "repaired",
            _ => "NOT repaired",
        };
        out.push_str(&format!(
            "last drift found: {} ({}, {repaired}); {} found in all, {} repairs\n",
            s("kinds"),
            s("trigger"),
            n("found_total"),
            n("repairs")
        ));
    }
    out
}

/// The status as a few readable lines.
pub fn render_status(v: &Value) -> String {
    // Cgroup paths and unit names may hold anything a local user chose.
    let s = |v: &Value, k: &str| {
        crate::visible::visible(v.get(k).and_then(Value::as_str).unwrap_or("-")).into_owned()
    };
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut out =
        format!(
        "policy: {} ({} services)\nreloads: {} applied, {} refused{}\npins: {}\ncgroup v2: {}\n",
        s(v, "policy_dir"),
        v.get("services").and_then(Value::as_array).map_or(0, Vec::len),
        n(v, "reloads_applied"),
        n(v, "reloads_refused"),
        v.get("last_reload_error")
            .and_then(Value::as_str)
            .map(|e| {
                let first = e.lines().next().unwrap_or("");
                format!(" (last refused: {})", crate::visible::visible(first))
            })
            .unwrap_or_default(),
        s(v, "pins"),
        s(v, "cgroup2"),
    );
    for f in v
        .get("kernel_features")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("{}: {}\n", s(f, "feature"), s(f, "status")));
    }
    if let Some(check) = v.get("self_check") {
        out.push_str(&self_check_line(check));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<20} {:<10} {:<8} {:>5} {:>9} {:>9} {:>9}  {}\n",
        "SERVICE", "STATE", "MODE", "RULES", "ALLOWED", "DENIED", "AUDITED", "CGROUP"
    ));
    for svc in v
        .get("services")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let state = if svc.get("quarantined").and_then(Value::as_bool) == Some(true) {
            "QUARANTINE".to_string()
        } else {
            s(svc, "state")
        };
        out.push_str(&format!(
            "{:<20} {:<10} {:<8} {:>5} {:>9} {:>9} {:>9}  {}\n",
            s(svc, "name"),
            state,
            s(svc, "mode"),
            n(svc, "rules"),
            n(svc, "allowed"),
            n(svc, "denied"),
            n(svc, "audited"),
            s(svc, "cgroup"),
        ));
        // A template's other instances, then what is wrong, if anything.
        let cgroups = svc.get("cgroups").and_then(Value::as_array);
        for c in cgroups.into_iter().flatten().skip(1) {
            out.push_str(&format!("{:<76}  {}\n", "", s(c, "path")));
        }
        let detail = s(svc, "detail");
        if !detail.is_empty() && detail != "-" {
            out.push_str(&format!("  {}: {detail}\n", s(svc, "name")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn status_lists_every_instance_and_says_what_is_wrong() {
        let text = render_status(&json!({
            "policy_dir": "/etc/bulkhead/policies",
            "cgroup2": "/sys/fs/cgroup",
            "services": [
                {"name": "worker", "state": "managed", "mode": "enforce", "detail": "",
                 "cgroup": "/system.slice/system-worker.slice/worker@a.service",
                 "cgroups": [
                    {"path": "/system.slice/system-worker.slice/worker@a.service"},
                    {"path": "/system.slice/system-worker.slice/worker@b.service"}]},
                {"name": "db", "state": "waiting", "mode": "audit", "cgroup": "unit db.service",
                 "detail": "waiting: no cgroup for db.service in the slices under /sys/fs/cgroup",
                 "cgroups": []},
            ],
        }));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"cgroup v2: /sys/fs/cgroup"), "{text}");
        assert!(
            lines.iter().any(|l| l.starts_with("worker ")
                && l.ends_with("/system.slice/system-worker.slice/worker@a.service")),
            "{text}"
        );
        assert!(
            lines.contains(
                &format!(
                    "{:<76}  /system.slice/system-worker.slice/worker@b.service",
                    ""
                )
                .as_str()
            ),
            "{text}"
        );
        assert!(
            lines.contains(
                &"  db: waiting: no cgroup for db.service in the slices under /sys/fs/cgroup"
            ),
            "{text}"
        );
    }

    #[test]
    fn status_writes_cgroup_paths_and_names_visibly() {
        let v = json!({
            "policy_dir": "/etc/bulkhead/policies",
            "services": [{
                "name": "web",
                "state": "managed",
                "mode": "enforce",
                "cgroup": "/user.slice/evil\u{1b}]0;owned\u{7}.scope",
                "detail": "waiting\nweb  managed  enforce"
            }]
        });
        let text = render_status(&v);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        assert!(text.contains("evil\\u{1b}]0;owned\\u{7}.scope"), "{text}");
        assert!(
            text.contains("  web: waiting\\u{a}web  managed  enforce\n"),
            "{text}"
        );
    }
}
