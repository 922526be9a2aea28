//! What `bulkhead check` found, written as text (for people), JSON (for
//! tools) or GitHub Actions workflow commands (annotations on the files).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::{
    control::protocol::Problem,
    policy::{PolicyError, PolicyErrors, Service},
    reload::Loaded,
};

/// The rules of one service's policy, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rules {
    /// `[[egress]]` entries.
    pub egress: usize,
    /// `[[ingress]]` entries.
    pub ingress: usize,
    /// 1 when the file has a `[bind]` table.
    pub bind: usize,
    /// What `[sockets]` allows: `raw`, `packet`, each protocol named.
    pub sockets: usize,
}

impl Rules {
    fn of(s: &Service) -> Self {
        Self {
            egress: s.egress.len(),
            ingress: s.ingress.as_ref().map_or(0, Vec::len),
            bind: usize::from(s.bind.is_some()),
            sockets: usize::from(s.sockets.raw)
                + usize::from(s.sockets.packet)
                + s.sockets.protocols.len(),
        }
    }

    fn add(self, o: Self) -> Self {
        Self {
            egress: self.egress + o.egress,
            ingress: self.ingress + o.ingress,
            bind: self.bind + o.bind,
            sockets: self.sockets + o.sockets,
        }
    }

    fn total(self) -> usize {
        self.egress + self.ingress + self.bind + self.sockets
    }

    fn json(self) -> Value {
        json!({
            "egress": self.egress,
            "ingress": self.ingress,
            "bind": self.bind,
            "sockets": self.sockets,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    /// `unit web.service`, `cgroup /batch`.
    pub selector: String,
    pub mode: String,
    pub file: PathBuf,
    pub rules: Rules,
}

/// A valid set's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub rules: Rules,
    pub v4_prefixes: usize,
    pub v6_prefixes: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Empty when valid.
    pub errors: Vec<PolicyError>,
    /// Accepted anyway: policy warnings, and with
    /// `--allow-insecure-policy-files` the owner and mode problems.
    pub warnings: Vec<PolicyError>,
    pub services: Vec<ServiceSummary>,
    /// `None` when invalid.
    pub totals: Option<Totals>,
}

/// What to print: each format decides which stream gets what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

impl Report {
    pub fn new(result: &Result<Loaded, PolicyErrors>) -> Self {
        let loaded = match result {
            Err(errors) => {
                return Self {
                    errors: errors.0.clone(),
                    ..Self::default()
                }
            }
            Ok(loaded) => loaded,
        };
        let services: Vec<ServiceSummary> = loaded
            .set
            .services
            .iter()
            .map(|s| ServiceSummary {
                name: s.name.clone(),
                selector: s.selector.to_string(),
                mode: s.mode.to_string(),
                file: s.file.clone(),
                rules: Rules::of(s),
            })
            .collect();
        let rules = services
            .iter()
            .fold(Rules::default(), |sum, s| sum.add(s.rules));
        let mut warnings = loaded.warnings.clone();
        warnings.extend(loaded.set.warnings.iter().cloned());
        Self {
            errors: Vec::new(),
            warnings,
            services,
            totals: Some(Totals {
                rules,
                v4_prefixes: loaded.compiled.v4.len() + loaded.compiled.ingress_v4.len(),
                v6_prefixes: loaded.compiled.v6.len() + loaded.compiled.ingress_v6.len(),
            }),
        }
    }

    pub fn valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// The last line: what was found in all, or how many errors.
    fn summary(&self) -> String {
        match &self.totals {
            Some(t) if self.valid() => format!(
                "{} services, {} rules ({} egress, {} ingress, {} bind, {} socket), {} IPv4 and {} IPv6 prefixes: valid",
                self.services.len(),
                t.rules.total(),
                t.rules.egress,
                t.rules.ingress,
                t.rules.bind,
                t.rules.sockets,
                t.v4_prefixes,
                t.v6_prefixes
            ),
            _ => format!("{} error(s); nothing was loaded", self.errors.len()),
        }
    }

    /// Errors and warnings on stderr (`FILE:LINE:COL: message`), one `ok:`
    /// line per service and the summary on stdout (the summary of an
    /// invalid set on stderr, after its errors).
    pub fn text(&self) -> Output {
        let mut out = Output::default();
        for w in &self.warnings {
            out.stderr.push_str(&format!("warning: {w}\n"));
        }
        if !self.valid() {
            for e in &self.errors {
                out.stderr.push_str(&format!("{e}\n"));
            }
            out.stderr.push_str(&self.summary());
            out.stderr.push('\n');
            return out;
        }
        for s in &self.services {
            let r = s.rules;
            out.stdout.push_str(&format!(
                "ok: {} ({}, {}): {} egress, {} ingress, {} bind and {} socket rules, from {}\n",
                s.name,
                s.selector,
                s.mode,
                r.egress,
                r.ingress,
                r.bind,
                r.sockets,
                s.file.display()
            ));
        }
        out.stdout.push_str(&self.summary());
        out.stdout.push('\n');
        out
    }

    /// One JSON object on stdout: `valid`, `errors` and `warnings` (each
    /// `file`, `line`, `column`, `message`, as `bulkhead reload` answers),
    /// `services` (each with its `rules` by kind) and `totals` (`null`
    /// when invalid).
    pub fn json(&self) -> Output {
        let problems =
            |list: &[PolicyError]| -> Vec<Problem> { list.iter().map(Problem::from).collect() };
        let services: Vec<Value> = self
            .services
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "selector": s.selector,
                    "mode": s.mode,
                    "file": s.file.display().to_string(),
                    "rules": s.rules.json(),
                })
            })
            .collect();
        let totals = self.totals.filter(|_| self.valid()).map(|t| {
            json!({
                "services": self.services.len(),
                "rules": t.rules.json(),
                "ipv4_prefixes": t.v4_prefixes,
                "ipv6_prefixes": t.v6_prefixes,
            })
        });
        let v = json!({
            "valid": self.valid(),
            "errors": problems(&self.errors),
            "warnings": problems(&self.warnings),
            "services": services,
            "totals": totals,
        });
        Output {
            stdout: format!("{v}\n"),
            stderr: String::new(),
        }
    }

    /// GitHub Actions workflow commands on stdout, one per problem
    /// (`::error file=F,line=L,col=C::message`, `::warning ...`; no line
    /// or column for a problem with a whole file), then the summary line.
    pub fn github(&self) -> Output {
        let mut stdout = String::new();
        for (level, list) in [("warning", &self.warnings), ("error", &self.errors)] {
            for p in list {
                stdout.push_str(&annotation(level, p));
                stdout.push('\n');
            }
        }
        stdout.push_str(&self.summary());
        stdout.push('\n');
        Output {
            stdout,
            stderr: String::new(),
        }
    }
}

/// `::LEVEL file=F,line=L,col=C::message`, escaped as the runner expects:
/// in the message `%`, CR and LF; in a property also `:` and `,`.
fn annotation(level: &str, p: &PolicyError) -> String {
    let mut props = format!("file={}", property(&p.file.display().to_string()));
    if p.line > 0 {
        props.push_str(&format!(",line={}", p.line));
        if p.column > 0 {
            props.push_str(&format!(",col={}", p.column));
        }
    }
    format!("::{level} {props}::{}", data(&p.message))
}

fn data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

fn property(s: &str) -> String {
    data(s).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(file: &str, line: usize, column: usize, message: &str) -> PolicyError {
        PolicyError {
            file: file.into(),
            line,
            column,
            message: message.to_string(),
        }
    }

    fn invalid() -> Report {
        Report {
            errors: vec![
                err("policies/web.toml", 6, 9, "egress[0]: port 0 is not a port"),
                err(
                    "policies/db.toml",
                    0,
                    0,
                    "mode 0666 is group- or world-writable: refused (chmod go-w)",
                ),
            ],
            ..Report::default()
        }
    }

    fn valid() -> Report {
        Report {
            errors: vec![],
            warnings: vec![err(
                "policies/batch.toml",
                2,
                10,
                "shadows unit batch.service",
            )],
            services: vec![
                ServiceSummary {
                    name: "batch".into(),
                    selector: "cgroup /batch".into(),
                    mode: "enforce".into(),
                    file: "policies/batch.toml".into(),
                    rules: Rules {
                        egress: 1,
                        ..Rules::default()
                    },
                },
                ServiceSummary {
                    name: "web".into(),
                    selector: "unit web.service".into(),
                    mode: "audit".into(),
                    file: "policies/web.toml".into(),
                    rules: Rules {
                        egress: 2,
                        ingress: 3,
                        bind: 1,
                        sockets: 2,
                    },
                },
            ],
            totals: Some(Totals {
                rules: Rules {
                    egress: 3,
                    ingress: 3,
                    bind: 1,
                    sockets: 2,
                },
                v4_prefixes: 4,
                v6_prefixes: 1,
            }),
        }
    }

    #[test]
    fn text_counts_every_kind_of_rule() {
        assert_eq!(
            valid().text(),
            Output {
                stdout: "ok: batch (cgroup /batch, enforce): 1 egress, 0 ingress, 0 bind and 0 socket rules, from policies/batch.toml\n\
                         ok: web (unit web.service, audit): 2 egress, 3 ingress, 1 bind and 2 socket rules, from policies/web.toml\n\
                         2 services, 9 rules (3 egress, 3 ingress, 1 bind, 2 socket), 4 IPv4 and 1 IPv6 prefixes: valid\n"
                    .into(),
                stderr: "warning: policies/batch.toml:2:10: shadows unit batch.service\n".into(),
            }
        );
    }

    #[test]
    fn text_errors_are_file_line_col_on_stderr() {
        assert_eq!(
            invalid().text(),
            Output {
                stdout: String::new(),
                stderr: "policies/web.toml:6:9: egress[0]: port 0 is not a port\n\
                         policies/db.toml:0:0: mode 0666 is group- or world-writable: refused (chmod go-w)\n\
                         2 error(s); nothing was loaded\n"
                    .into(),
            }
        );
    }

    #[test]
    fn github_annotations_point_at_the_line_and_column() {
        assert_eq!(
            invalid().github().stdout,
            "::error file=policies/web.toml,line=6,col=9::egress[0]: port 0 is not a port\n\
             ::error file=policies/db.toml::mode 0666 is group- or world-writable: refused (chmod go-w)\n\
             2 error(s); nothing was loaded\n"
        );
        assert_eq!(
            valid().github().stdout,
            "::warning file=policies/batch.toml,line=2,col=10::shadows unit batch.service\n\
             2 services, 9 rules (3 egress, 3 ingress, 1 bind, 2 socket), 4 IPv4 and 1 IPv6 prefixes: valid\n"
        );
    }

    #[test]
    fn github_escapes_what_would_end_the_command() {
        let report = Report {
            errors: vec![err("a,b:c%.toml", 1, 2, "50% bad\nsecond line\r")],
            ..Report::default()
        };
        assert_eq!(
            report.github().stdout.lines().next(),
            Some("::error file=a%2Cb%3Ac%25.toml,line=1,col=2::50%25 bad%0Asecond line%0D")
        );
    }

    #[test]
    fn json_is_one_object_with_located_errors_and_rule_counts() {
        let out = invalid().json();
        assert!(out.stderr.is_empty());
        assert_eq!(
            serde_json::from_str::<Value>(&out.stdout).expect("JSON"),
            json!({
                "valid": false,
                "errors": [
                    {"file": "policies/web.toml", "line": 6, "column": 9,
                     "message": "egress[0]: port 0 is not a port"},
                    {"file": "policies/db.toml", "line": 0, "column": 0,
                     "message": "mode 0666 is group- or world-writable: refused (chmod go-w)"},
                ],
                "warnings": [],
                "services": [],
                "totals": null,
            })
        );
        let v: Value = serde_json::from_str(&valid().json().stdout).expect("JSON");
        assert_eq!(v["valid"], true);
        assert_eq!(
            v["services"][1],
            json!({"name": "web", "selector": "unit web.service", "mode": "audit",
                   "file": "policies/web.toml",
                   "rules": {"egress": 2, "ingress": 3, "bind": 1, "sockets": 2}})
        );
        assert_eq!(
            v["totals"],
            json!({"services": 2, "rules": {"egress": 3, "ingress": 3, "bind": 1, "sockets": 2},
                   "ipv4_prefixes": 4, "ipv6_prefixes": 1})
        );
        assert_eq!(v["warnings"][0]["line"], 2);
    }
}
