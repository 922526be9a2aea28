//! The set-up most tests start from: a service (a new cgroup), its policy
//! in a policy directory, the daemon enforcing it ([`Enforced`]), and two
//! loopback listeners, one the policy allows and one it does not list
//! ([`Targets`]).

use std::{net::SocketAddr, path::Path};

use crate::{
    cgroup::CgroupGuard,
    daemon::Daemon,
    policy::{Egress, PolicyDir},
    probe::{Listener, Probe, Proto},
};

/// A service, the policy directory holding its one policy file, and the
/// daemon enforcing it (ready). Fields drop in order: the daemon first,
/// the cgroup last.
pub struct Enforced {
    /// The daemon, started on [`Self::policies`].
    pub daemon: Daemon,
    /// The policy directory: the service's file, and whatever a test
    /// writes there later.
    pub policies: PolicyDir,
    /// The service.
    pub svc: CgroupGuard,
}

impl Enforced {
    /// A new cgroup, the policy file `file` (say `web.toml`) holding
    /// `policy(&cgroup)`, and [`Daemon::start`] on that directory.
    #[must_use]
    pub fn start(file: &str, policy: impl FnOnce(&CgroupGuard) -> String) -> Self {
        Self::start_with(file, policy, Daemon::start)
    }

    /// [`Self::start`], the daemon started by `start` (for a config file,
    /// or a fault seam: `|p| Daemon::start_with_config(p, CONFIG)`).
    #[must_use]
    pub fn start_with(
        file: &str,
        policy: impl FnOnce(&CgroupGuard) -> String,
        start: impl FnOnce(&PolicyDir) -> Daemon,
    ) -> Self {
        let svc = CgroupGuard::new();
        let policies = PolicyDir::with(&[(file, &policy(&svc))]);
        let daemon = start(&policies);
        Self {
            daemon,
            policies,
            svc,
        }
    }

    /// `probe`, run inside the service's cgroup.
    #[must_use]
    pub fn client(&self, probe: &Probe) -> Probe {
        probe.in_cgroup(self.svc.path())
    }
}

/// Two TCP listeners on `127.0.0.1`, each on a port of its own, run
/// outside any service: one a policy allows ([`Self::rule`]), one it does
/// not list.
pub struct Targets {
    /// The listener [`Self::rule`] allows.
    pub allowed: Listener,
    /// The listener no rule lists.
    pub denied: Listener,
    /// The probe that runs the clients of the `assert_*` methods.
    probe: Probe,
}

impl Targets {
    /// Both listeners, run by `probe`.
    #[must_use]
    pub fn loopback(probe: &Probe) -> Self {
        let at = SocketAddr::from(([127, 0, 0, 1], 0));
        Self {
            allowed: probe.listen(Proto::Tcp, at),
            denied: probe.listen(Proto::Tcp, at),
            probe: probe.clone(),
        }
    }

    /// The rule allowing [`Self::allowed`]: `127.0.0.1`, its port.
    #[must_use]
    pub fn rule(&self) -> Egress {
        Egress::to(["127.0.0.1"]).ports([self.allowed.port()])
    }

    /// The allowed port connects and the other gets EPERM, on the first
    /// try, from `cgroup` (an absolute path).
    pub fn assert_enforced(&self, cgroup: &Path, what: &str) {
        let client = self.probe.in_cgroup(cgroup);
        assert_enforced(
            &client,
            (&self.allowed, &format!("{what}: the allowed port")),
            (
                &self.denied,
                &format!("{what}: a port the policy does not list"),
            ),
        );
    }

    /// The port no rule lists connects: nothing restricts `cgroup`.
    pub fn assert_unmanaged(&self, cgroup: &Path, what: &str) {
        self.probe
            .in_cgroup(cgroup)
            .tcp_connect(self.denied.addr())
            .assert_ok(&format!("{what}: not this policy's cgroup"));
    }
}

/// `client` connects to the first listener over TCP and gets EPERM from
/// the second, each on the first try; each failure says its own `why`.
pub fn assert_enforced(
    client: &Probe,
    (allowed, why_allowed): (&Listener, &str),
    (denied, why_denied): (&Listener, &str),
) {
    client.tcp_connect(allowed.addr()).assert_ok(why_allowed);
    client.tcp_connect(denied.addr()).assert_eperm(why_denied);
}
