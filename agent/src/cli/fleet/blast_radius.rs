//! `bulkhead fleet blast-radius SERVICE[@HOST]`: what a service could
//! reach across hosts if compromised, as text in the style of
//! `bulkhead blast-radius`, or as JSON.

use std::{fmt::Write as _, process::ExitCode};

use super::{client, fail, load};
use crate::{
    cli::args::FleetBlastRadiusArgs,
    fleet::{model::FleetBlastRadius, time::rfc3339},
    visible::visible as v,
};

pub fn blast_radius(args: &FleetBlastRadiusArgs) -> ExitCode {
    let fleet = match client(&args.clickhouse).and_then(|c| load(&c)) {
        Ok(f) => f,
        Err(e) => return fail("blast-radius", &e),
    };
    let b = match fleet.blast_radius(&args.service) {
        Ok(b) => b,
        Err(e) => return fail("blast-radius", &e),
    };
    if args.json {
        match serde_json::to_string(&b) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail("blast-radius", &format!("cannot write JSON: {e}")),
        }
    } else {
        print!("{}", render(&b));
    }
    ExitCode::SUCCESS
}

/// The report as text: the host report's four parts, each line naming the
/// instance it is about. Names come from the agents' rows and reach a
/// terminal: written visibly.
fn render(b: &FleetBlastRadius) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blast radius of {} across the fleet: {} instance(s): {}",
        v(&b.service),
        b.instances.len(),
        v(&b.instances.join(", "))
    );
    let _ = writeln!(out, "\n1. its policies allow:");
    if b.allows.is_empty() {
        let _ = writeln!(out, "   nothing (no [[egress]] rule)");
    }
    for a in &b.allows {
        let services = if a.services.is_empty() {
            "no service listening there".to_string()
        } else {
            format!("services listening there: {}", v(&a.services.join(", ")))
        };
        let _ = writeln!(
            out,
            "   {} {} {} ports {} {}  ({services})",
            v(&a.instance),
            v(&a.rule),
            v(&a.to),
            a.ports,
            a.protocol
        );
    }
    let _ = writeln!(out, "\n2. it actually reached:");
    if b.reached.is_empty() {
        let _ = writeln!(out, "   nothing observed");
    }
    for r in &b.reached {
        let to = crate::graph::report::destination(&r.to, &r.dest, &r.addresses);
        let denied = if r.denied > 0 {
            format!(", {} denied", r.denied)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "   {} → {to}: {} connections{denied}, last {} (via {})",
            v(&r.from),
            r.calls,
            rfc3339(r.last_seen),
            v(r.rule.as_deref().unwrap_or("no rule"))
        );
    }
    let _ = writeln!(out, "\n3. allowed but never used (candidates to remove):");
    if b.unused.is_empty() {
        let _ = writeln!(out, "   none");
    }
    for a in &b.unused {
        let _ = writeln!(
            out,
            "   {} {} {} ports {} {}",
            v(&a.instance),
            v(&a.rule),
            v(&a.to),
            a.ports,
            a.protocol
        );
    }
    crate::graph::report::lateral_section(&mut out, &b.lateral, "service instance(s)");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fleet::model::{Allowance, Reached},
        graph::blast::{Hop, Lateral},
    };

    #[test]
    fn every_part_names_its_instance_names_and_paths_show_each_hop() {
        let allow = Allowance {
            instance: "web@h1".to_string(),
            rule: "web.toml#egress[0]".to_string(),
            to: "198.51.100.0/24".to_string(),
            ports: "8080".to_string(),
            protocol: "tcp".to_string(),
            description: None,
            services: vec!["api@h2".to_string()],
            used: true,
        };
        let b = FleetBlastRadius {
            service: "web".to_string(),
            instances: vec!["web@h1".to_string()],
            allows: vec![allow],
            reached: vec![
                Reached {
                    from: "web@h1".to_string(),
                    to: "api@h2".to_string(),
                    dest: "198.51.100.20:8080/tcp".to_string(),
                    addresses: Vec::new(),
                    calls: 7,
                    denied: 1,
                    first_seen: 0,
                    last_seen: 60,
                    rule: Some("web.toml#egress[0]".to_string()),
                },
                Reached {
                    from: "web@h1".to_string(),
                    to: "api.example.test:443/tcp".to_string(),
                    dest: "api.example.test:443/tcp".to_string(),
                    addresses: vec!["203.0.113.5".to_string(), "203.0.113.6".to_string()],
                    calls: 2,
                    denied: 0,
                    first_seen: 0,
                    last_seen: 60,
                    rule: Some("web.toml#egress[1]".to_string()),
                },
            ],
            unused: Vec::new(),
            lateral: Lateral {
                services: vec![
                    Hop {
                        target: "api@h2".to_string(),
                        kind: "service".to_string(),
                        hops: 1,
                        path: "web@h1 → api@h2:8080".to_string(),
                    },
                    Hop {
                        target: "db@h3\u{1b}".to_string(),
                        kind: "service".to_string(),
                        hops: 2,
                        path: "web@h1 → api@h2:8080 → db@h3\u{1b}:5432".to_string(),
                    },
                ],
                destinations: Vec::new(),
                size: 2,
            },
        };
        assert_eq!(
            render(&b),
            "blast radius of web across the fleet: 1 instance(s): web@h1\n\
             \n1. its policies allow:\n   \
             web@h1 web.toml#egress[0] 198.51.100.0/24 ports 8080 tcp  \
             (services listening there: api@h2)\n\
             \n2. it actually reached:\n   \
             web@h1 → api@h2 (198.51.100.20:8080/tcp): 7 connections, 1 denied, \
             last 1970-01-01T00:01:00Z (via web.toml#egress[0])\n   \
             web@h1 → api.example.test:443/tcp (203.0.113.5, 203.0.113.6): 2 connections, \
             last 1970-01-01T00:01:00Z (via web.toml#egress[1])\n\
             \n3. allowed but never used (candidates to remove):\n   none\n\
             \n4. lateral reach: 2 service instance(s), 0 destination(s)\n   \
             1 hop(s): web@h1 → api@h2:8080\n   \
             2 hop(s): web@h1 → api@h2:8080 → db@h3\\u{1b}:5432\n"
        );
    }
}
