//! Units found where systemd puts them: a template's instances in their
//! own slice, units with `Slice=`, a user manager's units, each managed
//! from the moment its cgroup is made (the kernel's `cgroup_mkdir` watcher,
//! so the first connect is already judged) and at start (the daemon's
//! walk). A cgroup a process may make inside another unit never passes for
//! a unit. Services that could not be found or enforced say so, and the
//! kernel forgets a cgroup when it goes, however often units restart.

use std::time::Duration;

use integration_tests::{
    cgroup2_mount,
    control::{status, status_service, wait_status},
    http::metrics_addr,
    pinned_map::pinned_map_len,
    probe,
    prometheus::{sample_count, scrape},
    require_bpf, unique_name, unit_policy, CgroupGuard, Daemon, Egress, PolicyDir, Targets,
};

/// How long `status` may take to show a cgroup made meanwhile (the daemon
/// rescans every 200 ms; the kernel enforces it at once).
const RESCAN_GRACE: Duration = Duration::from_secs(3);

/// A policy directory holding one enforcing policy per `(file, unit,
/// rules)`, for units of `user`'s manager (`None`: the system's).
fn unit_policies(user: Option<u32>, files: &[(&str, &str, &[Egress])]) -> PolicyDir {
    let texts: Vec<(&str, String)> = files
        .iter()
        .map(|(file, unit, rules)| (*file, unit_policy(unit, user, "enforce", rules)))
        .collect();
    let files: Vec<(&str, &str)> = texts.iter().map(|(f, t)| (*f, t.as_str())).collect();
    PolicyDir::with(&files)
}

/// The slice systemd makes for a template's instances: `system-` and the
/// escaped template name (`-` is `\x2d`).
fn instance_slice(template: &str) -> String {
    format!(
        "system.slice/system-{}.slice",
        template.replace('-', "\\x2d")
    )
}

/// The cgroup paths `status` lists for `service`.
fn status_cgroups(daemon: &Daemon, service: &str) -> Vec<String> {
    let st = status(daemon);
    let svc = status_service(&st, service);
    let mut paths: Vec<String> = svc["cgroups"]
        .as_array()
        .unwrap_or_else(|| panic!("no cgroups in {svc:#}"))
        .iter()
        .map(|c| {
            assert_eq!(c["enforced"], true, "{svc:#}");
            c["path"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_instance_of_a_template_is_managed_from_its_start() {
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-tmpl");
    let slice = instance_slice(&name);
    let targets = Targets::loopback(&probe!());
    let before = CgroupGuard::at(&format!("{slice}/{name}@a.service"));
    let policies = unit_policies(
        None,
        &[("tmpl.toml", &format!("{name}@.service"), &[targets.rule()])],
    );
    let daemon = Daemon::start(&policies);
    targets.assert_enforced(before.path(), "an instance running at start");

    // Made while the agent runs: judged from the first connect, before
    // any rescan could have seen it.
    let after = CgroupGuard::at(&format!("{slice}/{name}@b.service"));
    targets.assert_enforced(after.path(), "an instance started later");

    let st = wait_status(&daemon, "both instances in status", RESCAN_GRACE, |st| {
        status_service(st, "tmpl")["cgroups"]
            .as_array()
            .map_or(0, Vec::len)
            == 2
    });
    let svc = status_service(&st, "tmpl");
    assert_eq!(svc["state"], "managed", "{svc:#}");
    assert_eq!(
        status_cgroups(&daemon, "tmpl"),
        [
            format!("/{slice}/{name}@a.service"),
            format!("/{slice}/{name}@b.service")
        ]
    );
}

#[test]
fn an_instance_policy_takes_its_instance_from_the_template_policy() {
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-inst");
    let slice = instance_slice(&name);
    let for_template = Targets::loopback(&probe!());
    let for_instance = Targets::loopback(&probe!());
    let policies = unit_policies(
        None,
        &[
            (
                "template.toml",
                &format!("{name}@.service"),
                &[for_template.rule()],
            ),
            (
                "special.toml",
                &format!("{name}@special.service"),
                &[for_instance.rule()],
            ),
        ],
    );
    let _daemon = Daemon::start(&policies);
    let special = CgroupGuard::at(&format!("{slice}/{name}@special.service"));
    let plain = CgroupGuard::at(&format!("{slice}/{name}@plain.service"));
    for_instance.assert_enforced(special.path(), "the instance with its own policy");
    probe!()
        .in_cgroup(special.path())
        .tcp_connect(for_template.allowed.addr())
        .assert_eperm("the template's port from the instance with its own policy");
    for_template.assert_enforced(plain.path(), "another instance");
}

#[test]
fn a_unit_in_a_slice_of_its_own_is_managed() {
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-slice");
    let targets = Targets::loopback(&probe!());
    let policies = unit_policies(
        None,
        &[("sliced.toml", &format!("{name}.service"), &[targets.rule()])],
    );
    let _daemon = Daemon::start(&policies);
    // Slice=bhx-inner.slice: systemd nests it in bhx.slice.
    let cgroup = CgroupGuard::at(&format!("{name}x.slice/{name}x-inner.slice/{name}.service"));
    targets.assert_enforced(cgroup.path(), "a unit with Slice= set");
}

#[test]
fn a_user_unit_is_managed_in_its_users_manager_only() {
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-user");
    let uid = 4_242_000 + std::process::id() % 1000;
    let targets = Targets::loopback(&probe!());
    let policies = unit_policies(
        Some(uid),
        &[("mine.toml", &format!("{name}.service"), &[targets.rule()])],
    );
    let _daemon = Daemon::start(&policies);
    let manager = format!("user.slice/user-{uid}.slice/user@{uid}.service");
    let unit = CgroupGuard::at(&format!("{manager}/app.slice/{name}.service"));
    targets.assert_enforced(unit.path(), "the user's unit");
    // The same name as a system unit, or under another user, is not it.
    let system = CgroupGuard::at(&format!("system.slice/{name}.service"));
    targets.assert_unmanaged(system.path(), "a system unit of the same name");
    let other = uid + 1;
    let elsewhere = CgroupGuard::at(&format!(
        "user.slice/user-{other}.slice/user@{other}.service/app.slice/{name}.service"
    ));
    targets.assert_unmanaged(elsewhere.path(), "another user's unit of the same name");
}

/// The attack: a process in a restricted service makes a cgroup below its
/// own, names it after a unit whose policy allows more, and moves in. It
/// stays its own service (only root makes cgroups whose parents are all
/// slices, so a path like this never names a unit).
#[test]
fn a_cgroup_named_after_a_unit_inside_another_service_gets_nothing_of_it() {
    if !require_bpf() {
        return;
    }
    let restricted_name = unique_name("bh-jail");
    let generous_name = unique_name("bh-open");
    let targets = Targets::loopback(&probe!());
    let restricted = CgroupGuard::at(&format!("system.slice/{restricted_name}.service"));
    let policies = unit_policies(
        None,
        &[
            ("jail.toml", &format!("{restricted_name}.service"), &[]),
            (
                "open.toml",
                &format!("{generous_name}.service"),
                &[targets.rule()],
            ),
        ],
    );
    let _daemon = Daemon::start(&policies);
    for inside in [
        format!("{generous_name}.service"),
        format!("x.slice/{generous_name}.service"),
    ] {
        let hidden = restricted.child(&inside);
        probe!()
            .in_cgroup(&hidden)
            .tcp_connect(targets.allowed.addr())
            .assert_eperm(&format!(
                "from {inside} inside the restricted unit: its own policy allows nothing"
            ));
    }
}

#[test]
fn a_unit_not_found_says_where_it_was_looked_for() {
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-absent");
    let unit = format!("{name}.service");
    let policies = unit_policies(None, &[("absent.toml", &unit, &[])]);
    let daemon = Daemon::start(&policies);
    let st = status(&daemon);
    let svc = status_service(&st, "absent");
    assert_eq!(svc["state"], "waiting", "{svc:#}");
    assert_eq!(
        svc["detail"].as_str(),
        Some(
            format!(
                "waiting: no cgroup for {unit} in the slices under {}",
                cgroup2_mount().display()
            )
            .as_str()
        ),
        "{svc:#}"
    );
    let waiting = |daemon: &Daemon| {
        sample_count(
            &scrape(metrics_addr(daemon)),
            "bulkhead_services",
            &[("state", "waiting")],
        )
    };
    assert_eq!(waiting(&daemon), Some(1));

    let _unit = CgroupGuard::at(&format!("system.slice/{unit}"));
    let _ = wait_status(
        &daemon,
        "the unit managed once it starts",
        RESCAN_GRACE,
        |st| status_service(st, "absent")["state"] == "managed",
    );
    assert_eq!(waiting(&daemon), Some(0));
}

/// 5,000 restarts of a managed unit while the agent runs, 5,000 more while
/// it is stopped (enforcement pinned): the kernel holds the live cgroup
/// only, and the unit's next cgroup is enforced at once. Without the
/// removal at rmdir the SERVICES map fills and later cgroups run unmanaged.
#[test]
fn the_kernel_forgets_every_cgroup_that_goes() {
    const RESTARTS: usize = 5_000;
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-churn");
    let targets = Targets::loopback(&probe!());
    let unit = CgroupGuard::at(&format!("system.slice/{name}.service"));
    let policies = unit_policies(
        None,
        &[("churn.toml", &format!("{name}.service"), &[targets.rule()])],
    );
    let mut daemon = Daemon::start(&policies);
    let services = daemon.pin_dir().join("current/maps/SERVICES");
    let restart = |n: usize| {
        for _ in 0..n {
            unit.remove();
            unit.create_again();
        }
    };
    restart(RESTARTS);
    targets.assert_enforced(unit.path(), "after 5,000 restarts with the agent running");

    let stopped = daemon.stop();
    assert!(stopped.success(), "the agent's stop: {stopped}");
    restart(RESTARTS);
    targets.assert_enforced(unit.path(), "after 5,000 more with the agent stopped");
    assert_eq!(
        pinned_map_len(&services),
        1,
        "SERVICES must hold the one live cgroup of the unit"
    );
    daemon.detach();
}

/// A cgroup the kernel's service map has no room for is reported as such
/// (never as managed) and enforced once there is room again.
#[test]
fn a_cgroup_that_does_not_fit_is_reported_unenforced_and_retried() {
    const ROOM: usize = 64;
    if !require_bpf() {
        return;
    }
    let name = unique_name("bh-full");
    let slice = instance_slice(&name);
    let targets = Targets::loopback(&probe!());
    let policies = unit_policies(
        None,
        &[("full.toml", &format!("{name}@.service"), &[targets.rule()])],
    );
    let daemon =
        Daemon::start_with_config(&policies, &format!("[services]\nmax_cgroups = {ROOM}\n"));
    let fitting: Vec<CgroupGuard> = (0..ROOM)
        .map(|i| CgroupGuard::at(&format!("{slice}/{name}@{i}.service")))
        .collect();
    let extra = CgroupGuard::at(&format!("{slice}/{name}@extra.service"));
    let st = wait_status(&daemon, "the service unenforced", RESCAN_GRACE, |st| {
        status_service(st, "full")["state"] == "unenforced"
    });
    let svc = status_service(&st, "full");
    let detail = svc["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(&format!(
            "cgroup /{slice}/{name}@extra.service is NOT enforced: cannot write the SERVICES map"
        )),
        "{svc:#}"
    );
    let unenforced = |daemon: &Daemon| {
        sample_count(
            &scrape(metrics_addr(daemon)),
            "bulkhead_services",
            &[("state", "unenforced")],
        )
    };
    assert_eq!(unenforced(&daemon), Some(1));
    assert!(
        daemon
            .log()
            .contains("the kernel does NOT enforce this service's cgroup"),
        "the log must say so"
    );

    drop(fitting);
    let _ = wait_status(&daemon, "the retry to succeed", RESCAN_GRACE, |st| {
        status_service(st, "full")["state"] == "managed"
    });
    targets.assert_enforced(
        extra.path(),
        "the instance that did not fit, once there is room",
    );
    assert_eq!(unenforced(&daemon), Some(0));
}
