//! `bulkhead fleet services`: every service instance the fleet's tables
//! name, with its host, mode and when it was last seen.

use std::{fmt::Write as _, process::ExitCode};

use super::{client, describe, fail, runtime};
use crate::{
    cli::args::FleetServicesArgs,
    fleet::{
        read::{self, ServiceInstance},
        time::rfc3339,
    },
    visible::visible as v,
};

pub fn services(args: &FleetServicesArgs) -> ExitCode {
    let listed = client(&args.clickhouse).and_then(|client| {
        let text = runtime()?
            .block_on(client.query(&read::services_sql(client.database())))
            .map_err(|e| format!("read the service instances: {}", describe(&e)))?;
        read::parse_services(&text).map_err(|e| format!("{e:#}"))
    });
    let services = match listed {
        Ok(s) => s,
        Err(e) => return fail("services", &e),
    };
    if args.json {
        match serde_json::to_string(&services) {
            Ok(text) => println!("{text}"),
            Err(e) => return fail("services", &format!("cannot write JSON: {e}")),
        }
    } else {
        print!("{}", table(&services));
    }
    ExitCode::SUCCESS
}

/// One line per instance under a header; names reach a terminal, so they
/// are written visibly. `-`: no policy snapshot.
fn table(services: &[ServiceInstance]) -> String {
    let rows: Vec<[String; 4]> = services
        .iter()
        .map(|s| {
            [
                v(&s.service).into_owned(),
                v(&s.host).into_owned(),
                s.mode
                    .as_deref()
                    .map_or_else(|| "-".to_string(), |m| v(m).into_owned()),
                rfc3339(s.last_seen),
            ]
        })
        .collect();
    let header = ["SERVICE", "HOST", "MODE", "LAST SEEN"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let mut out = String::new();
    for r in std::iter::once(header.map(str::to_string)).chain(rows) {
        let _ = writeln!(out, "{:<w0$}  {:<w1$}  {:<w2$}  {}", r[0], r[1], r[2], r[3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_marks_a_service_without_a_snapshot() {
        let services = [
            ServiceInstance {
                service: "api".to_string(),
                host: "h2".to_string(),
                mode: None,
                last_seen: 0,
            },
            ServiceInstance {
                service: "web\u{1b}".to_string(),
                host: "host-one".to_string(),
                mode: Some("enforce".to_string()),
                last_seen: 86_400,
            },
        ];
        assert_eq!(
            table(&services),
            "SERVICE    HOST      MODE     LAST SEEN\n\
             api        h2        -        1970-01-01T00:00:00Z\n\
             web\\u{1b}  host-one  enforce  1970-01-02T00:00:00Z\n"
        );
    }
}
