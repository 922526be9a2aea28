//! Policy parsing and validation, on inline files.

use std::{fs, path::PathBuf};

use super::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, text).expect("write test policy");
    path
}

fn errors_of(result: Result<PolicySet, PolicyErrors>) -> Vec<(String, usize, String)> {
    let errors = result.expect_err("policy must be refused");
    errors
        .0
        .into_iter()
        .map(|e| {
            let file = e
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (file, e.line, e.message)
        })
        .collect()
}

#[test]
fn the_documented_shape_parses_into_the_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "billing.toml",
        r#"
unit = "billing.service"
mode = "enforce"

[[egress]]
to = ["192.0.2.0/24", "2001:db8::/64", "127.0.0.1"]
ports = [5432, "8000-8100"]
protocol = "tcp"
"#,
    );
    let set = load_dir(dir.path()).expect("valid policy");
    assert_eq!(set.services.len(), 1);
    let s = &set.services[0];
    assert_eq!(s.name, "billing");
    assert_eq!(
        s.selector,
        Selector::Unit(UnitName {
            name: "billing.service".into(),
            user: None
        })
    );
    assert_eq!(
        s.selector.names("system.slice/billing.service"),
        Some(Closeness::Unit)
    );
    assert_eq!(s.mode, Mode::Enforce);
    let rule = &s.egress[0];
    assert_eq!(rule.line, 5);
    assert_eq!(rule.protocol, Protocol::Tcp);
    assert_eq!(
        rule.to.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["192.0.2.0/24", "2001:db8::/64", "127.0.0.1/32"]
    );
    assert_eq!(
        rule.ports,
        [
            PortRange { lo: 5432, hi: 5432 },
            PortRange { lo: 8000, hi: 8100 }
        ]
    );
}

#[test]
fn omitted_ports_and_protocol_mean_all_and_any() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir, "a.toml", "cgroup = \"/a/b\"\nmode = \"audit\"\nname = \"x\"\n[[egress]]\nto = [\"::ffff:192.0.2.0/120\"]\n");
    let set = load_dir(dir.path()).expect("valid policy");
    let s = &set.services[0];
    assert_eq!(s.name, "x");
    assert_eq!(s.selector, Selector::Cgroup("a/b".into()));
    assert_eq!(s.mode, Mode::Audit);
    assert_eq!(s.egress[0].ports, [PortRange::ALL]);
    assert_eq!(s.egress[0].protocol, Protocol::Any);
    // An IPv4-mapped network is kept as the IPv4 network it means.
    assert_eq!(s.egress[0].to[0].to_string(), "192.0.2.0/24");
}

#[test]
fn observe_lookups_is_read_and_a_wrong_type_is_an_error_at_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "a.toml",
        "cgroup = \"/a\"\nmode = \"audit\"\nobserve_lookups = true\n",
    );
    let set = load_dir(dir.path()).expect("valid policy");
    assert!(set.services[0].observe_lookups);
    assert!(set.services[0].through_proxy());
    write(
        &dir,
        "a.toml",
        "cgroup = \"/a\"\nmode = \"audit\"\nobserve_lookups = \"yes\"\n",
    );
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].1, 3, "{errors:?}");
    assert!(errors[0].2.contains("expected a boolean"), "{errors:?}");
}

#[test]
fn every_error_in_a_file_is_reported_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "bad.toml",
        "cgroup = \"/x\"\nmode = \"enforce\"\nfoo = 1\n[[egress]]\nto = [\"10.0.0.1/8\", \"bad\"]\nports = [0, \"9000-8000\", 70000]\nprotocol = \"icmp\"\n",
    );
    let errors = errors_of(load_dir(dir.path()));
    let lines: Vec<usize> = errors.iter().map(|e| e.1).collect();
    assert_eq!(lines, [3, 5, 5, 6, 6, 6, 6], "{errors:#?}");
    assert!(errors[0].2.contains("unknown key `foo`"));
    assert!(errors[1].2.contains("host bits set"));
    assert!(
        errors[2].2.contains("not an IP address or CIDR") && errors[2].2.contains("\"bad\""),
        "{}",
        errors[2].2
    );
    assert!(errors[3].2.contains("port 0 is out of range"));
    assert!(errors[4].2.contains("9000-8000 is inverted"));
    assert!(errors[5].2.contains("port 70000 is out of range"));
    assert!(
        errors[6].2.contains("`ports` with protocol \"icmp\""),
        "{errors:#?}"
    );
}

#[test]
fn missing_mode_and_selector_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir, "m.toml", "[[egress]]\nto = [\"192.0.2.1\"]\n");
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].2.contains("missing `unit"));
    assert!(errors[1].2.contains("missing `mode`"));
}

#[test]
fn a_service_named_twice_and_a_file_that_is_not_toml_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "a.toml",
        "name = \"db\"\ncgroup = \"/a\"\nmode = \"audit\"\n",
    );
    write(
        &dir,
        "b.toml",
        "name = \"db\"\ncgroup = \"/b\"\nmode = \"audit\"\n",
    );
    write(&dir, "c.toml", "this is [not toml\n");
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(errors[0].0, "c.toml");
    assert!(errors[0].2.contains("not a valid policy file"));
    assert_eq!(errors[1].0, "b.toml");
    assert!(errors[1].2.contains("service \"db\" is already defined in"));
}

#[test]
fn one_cgroup_cannot_belong_to_two_services() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir, "a.toml", "unit = \"x.service\"\nmode = \"audit\"\n");
    write(&dir, "b.toml", "unit = \"x.service\"\nmode = \"audit\"\n");
    write(&dir, "c.toml", "cgroup = \"/y\"\nmode = \"audit\"\n");
    write(&dir, "d.toml", "cgroup = \"/y/\"\nmode = \"audit\"\n");
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].2.contains("already managed by service \"a\""));
    assert!(errors[1].2.contains("already managed by service \"c\""));
}

#[test]
fn a_cgroup_path_that_is_also_a_policys_unit_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir, "a.toml", "unit = \"x.service\"\nmode = \"audit\"\n");
    write(
        &dir,
        "b.toml",
        "cgroup = \"/system.slice/x.service\"\nmode = \"audit\"\n",
    );
    let set = load_dir(dir.path()).expect("valid");
    assert_eq!(set.warnings.len(), 1, "{:#?}", set.warnings);
    assert!(
        set.warnings[0]
            .message
            .contains("takes it from service \"a\""),
        "{}",
        set.warnings[0]
    );
}

#[test]
fn templates_user_units_and_names_systemd_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "t.toml",
        "unit = \"worker@.service\"\nmode = \"audit\"\n",
    );
    write(
        &dir,
        "u.toml",
        "unit = \"sync.service\"\nuser = 1000\nmode = \"audit\"\n",
    );
    write(&dir, "w.toml", "unit = \"@.service\"\nmode = \"audit\"\n");
    write(
        &dir,
        "x.toml",
        "unit = \"a\\\\q.service\"\nmode = \"audit\"\n",
    );
    let set = load_dir(dir.path()).expect("valid");
    let t = &set.services[0];
    let Selector::Unit(u) = &t.selector else {
        panic!("{:?}", t.selector)
    };
    assert!(u.is_template());
    assert_eq!(
        t.selector
            .names("system.slice/system-worker.slice/worker@7.service"),
        Some(Closeness::Template)
    );
    assert_eq!(t.selector.names("system.slice/worker.service"), None);
    let user = &set.services[1];
    assert_eq!(
        user.selector
            .names("user.slice/user-1000.slice/user@1000.service/app.slice/sync.service"),
        Some(Closeness::Unit)
    );
    assert_eq!(user.selector.names("system.slice/sync.service"), None);
    let warned: Vec<String> = set.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warned.len(), 2, "{warned:#?}");
    assert!(warned[0].contains("w.toml:1:8: unit \"@.service\": the name before `@` is empty"));
    assert!(warned[1].contains("x.toml:1:8:") && warned[1].contains("backslash"));

    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "a.toml",
        "user = 5\ncgroup = \"/a\"\nmode = \"audit\"\n",
    );
    write(
        &dir,
        "b.toml",
        "unit = \"b.service\"\nuser = -1\nmode = \"audit\"\n",
    );
    let long = format!("cgroup = \"/{}\"\nmode = \"audit\"\n", "d".repeat(255));
    write(&dir, "c.toml", &long);
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0]
        .2
        .contains("`user` names the user manager of a `unit`"));
    assert!(errors[1].2.contains("user -1 is not a uid"));
    assert_eq!(errors[2].1, 1);
    assert!(errors[2].2.contains("holds paths of at most 255 bytes"));
}

#[test]
fn bad_selectors_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir, "a.toml", "cgroup = \"/\"\nmode = \"audit\"\n");
    write(&dir, "b.toml", "cgroup = \"/x/../y\"\nmode = \"audit\"\n");
    write(&dir, "c.toml", "unit = \"x.timer\"\nmode = \"audit\"\n");
    write(
        &dir,
        "d.toml",
        "unit = \"x.service\"\ncgroup = \"/x\"\nmode = \"audit\"\n",
    );
    let errors = errors_of(load_dir(dir.path()));
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].2.contains("root of the whole host"));
    assert!(errors[1].2.contains("`..` component"));
    assert!(errors[2].2.contains("not a systemd service or scope name"));
    assert!(errors[3].2.contains("not both"));
}

#[test]
fn icmp_outside_egress_and_unknown_socket_protocols_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "bad.toml",
        "cgroup = \"/b\"\nmode = \"enforce\"\ningress = [{ from = [\"198.51.100.0/24\"], protocol = \"icmp\" }]\n[bind]\nports = [80]\nprotocol = \"icmp\"\n[sockets]\nprotocols = [\"quic\"]\n",
    );
    let errors = errors_of(load_dir(dir.path()));
    let lines: Vec<usize> = errors.iter().map(|e| e.1).collect();
    assert_eq!(lines, [3, 6, 8], "{errors:#?}");
    assert!(errors[0]
        .2
        .contains("ingress[0]: protocol \"icmp\" is for egress rules only"));
    assert!(errors[1]
        .2
        .contains("[bind]: protocol \"icmp\" is for egress rules only"));
    assert!(
        errors[2].2.contains(
            "unknown protocol \"quic\": expected one of sctp, mptcp, dccp, udplite, l2tp"
        ),
        "{errors:#?}"
    );
}

/// docs/policy.md's "Errors" example is what `bulkhead check` prints for
/// its files: the unknown-key message lists every top-level key (it once
/// lacked `user`, `ingress`, `bind` and `sockets`), positions included.
#[test]
fn the_docs_error_example_is_what_check_prints() {
    let docs = include_str!("../../../docs/policy.md");
    let start = docs
        .find("$ bulkhead check --policy-dir policies\n")
        .expect("docs/policy.md has the check example");
    let printed: Vec<&str> = docs[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "bad.toml",
        "unit = \"bad.service\"\nmode = \"enforce\"\nfoo = 1\n[[egress]]\nto = [\"10.0.0.1/8\"]\nports = [\"9000-8000\"]\n",
    );
    write(
        &dir,
        "db.toml",
        "name = \"db\"\nunit = \"db.service\"\nmode = \"enforce\"\n",
    );
    write(
        &dir,
        "other.toml",
        "name = \"db\"\nunit = \"other.service\"\nmode = \"enforce\"\n",
    );
    let errors = load_dir(dir.path()).expect_err("the example is refused");
    let prefix = format!("{}/", dir.path().display());
    let mut expected: Vec<String> = errors
        .0
        .iter()
        .map(|e| e.to_string().replace(&prefix, "policies/"))
        .collect();
    expected.push(format!("{} error(s); nothing was loaded", errors.0.len()));
    assert_eq!(printed, expected, "docs/policy.md's check example");
}

#[test]
fn names_and_networks_mix_in_to_and_a_bad_name_is_reported_at_its_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        &dir,
        "named.toml",
        "cgroup = \"/x\"\nmode = \"enforce\"\n[[egress]]\nto = [\"198.51.100.0/24\", \"API.Example.com.\", \"**.cdn.example.org\"]\nports = [443]\n",
    );
    let set = load_dir(dir.path()).expect("valid");
    let rule = &set.services[0].egress[0];
    assert_eq!(rule.to.len(), 1);
    let names: Vec<String> = rule.names.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["**.cdn.example.org", "api.example.com"]);

    write(
        &dir,
        "named.toml",
        "cgroup = \"/x\"\nmode = \"enforce\"\n[[egress]]\nto = [\"api.exa_mple.com\"]\n",
    );
    let errors = load_dir(dir.path()).expect_err("refused").0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // Line 4: `to = ["api.exa_mple.com"]`; the `_` is column 15.
    assert_eq!((errors[0].line, errors[0].column), (4, 15), "{errors:#?}");
    assert!(
        errors[0].message.contains("as a DNS name"),
        "{}",
        errors[0].message
    );
}

#[test]
fn at_most_four_rules_of_a_service_list_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = String::from("cgroup = \"/x\"\nmode = \"enforce\"\n");
    for i in 0..5 {
        text.push_str(&format!(
            "[[egress]]\nto = [\"n{i}.example.com\"]\nports = [{}]\n",
            400 + i
        ));
    }
    write(&dir, "many.toml", &text);
    let errors = load_dir(dir.path()).expect_err("refused").0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].line, 15, "the fifth rule's line: {errors:#?}");
    assert!(
        errors[0]
            .message
            .contains("at most 4 [[egress]] rules may list names"),
        "{}",
        errors[0].message
    );
}

#[test]
fn exe_and_uid_qualifiers_are_checked_and_resolved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = write(&dir, "tool", "#!/bin/sh\n");
    let link = dir.path().join("tool-link");
    std::os::unix::fs::symlink(&bin, &link).expect("symlink");
    write(
        &dir,
        "svc.toml",
        &format!(
            "cgroup = \"/s\"\nmode = \"enforce\"\n[[egress]]\nto = [\"127.0.0.1\"]\nports = [5432]\nexe = [{:?}, {:?}]\nuid = [33, 33]\n",
            bin.display().to_string(),
            link.display().to_string()
        ),
    );
    let set = load_dir(dir.path()).expect("valid policy");
    let rule = &set.services[0].egress[0];
    // The link names the same file: one executable, by its real path.
    assert_eq!(rule.exe.len(), 1);
    assert_eq!(rule.exe[0].real, fs::canonicalize(&bin).expect("canonical"));
    assert_eq!(rule.uid, vec![33]);

    let bad = tempfile::tempdir().expect("tempdir");
    write(
        &bad,
        "svc.toml",
        "cgroup = \"/s\"\nmode = \"enforce\"\n[[egress]]\nto = [\"127.0.0.1\"]\nexe = [\"bin/tool\"]\n[[egress]]\nto = [\"127.0.0.2\"]\nexe = [\"/no/such/bulkhead-binary\"]\n[[egress]]\nto = [\"127.0.0.3\"]\nuid = [-1]\n[[egress]]\nto = [\"127.0.0.4\"]\nexe = []\n",
    );
    let errors = errors_of(load_dir(bad.path()));
    let at = |line: usize| {
        errors
            .iter()
            .find(|(f, l, _)| f == "svc.toml" && *l == line)
            .map(|(_, _, m)| m.clone())
            .unwrap_or_else(|| panic!("no error at line {line}: {errors:?}"))
    };
    assert!(
        at(5).contains("egress[0]: exe: bin/tool is not an absolute path"),
        "{}",
        at(5)
    );
    assert!(
        at(8).contains("egress[1]: exe: /no/such/bulkhead-binary: No such file"),
        "{}",
        at(8)
    );
    assert!(
        at(11).contains("egress[2]: uid -1 is not a user id"),
        "{}",
        at(11)
    );
    assert!(
        at(14).contains("egress[3]: `exe = []` allows no caller"),
        "{}",
        at(14)
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
}
