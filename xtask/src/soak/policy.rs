//! The soak's policies: what each service may reach, the two variants a
//! good reload switches between, and the broken file a bad reload writes.
//! Every verdict the workers check follows from these texts.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// Cgroups, pins and the namespace the soak makes start with this, so a
/// killed soak is cleaned up by the next one.
pub const PREFIX: &str = "bulkhead-soak-";

/// The service the traffic and the denial flood run in; its worker cgroups
/// come and go below it.
pub const SERVICE_CGROUP: &str = "bulkhead-soak-svc";
/// A service whose own cgroup is made and removed over and over (a unit
/// that restarts).
pub const CHURN_CGROUP: &str = "bulkhead-soak-churn";

/// Ports on 127.0.0.1 in the soak's namespace.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    /// Allowed TCP; an echo listener answers there.
    pub tcp_allowed: u16,
    /// Allowed UDP (no listener: an unconnected send succeeds).
    pub udp_allowed: u16,
    /// Never allowed, TCP or UDP.
    pub denied: u16,
    /// Allowed by variant A only: each good reload flips it.
    pub toggle: u16,
}

pub const PORTS: Ports = Ports {
    tcp_allowed: 7001,
    udp_allowed: 7002,
    denied: 7003,
    toggle: 7004,
};

/// The variants of the service's policy a good reload switches between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The toggle port is allowed (3 rules).
    A,
    /// The toggle port is denied (2 rules).
    B,
}

impl Variant {
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    pub fn toggle_allowed(self) -> bool {
        self == Self::A
    }

    /// The rule count `bulkhead status` shows for the service in force.
    pub fn rules(self) -> u64 {
        match self {
            Self::A => 3,
            Self::B => 2,
        }
    }
}

fn common_rules(p: Ports) -> String {
    format!(
        "[[egress]]\nto = [\"127.0.0.1\"]\nports = [{}]\nprotocol = \"tcp\"\n\n\
         [[egress]]\nto = [\"127.0.0.1\"]\nports = [{}]\nprotocol = \"udp\"\n",
        p.tcp_allowed, p.udp_allowed
    )
}

pub fn service(variant: Variant) -> String {
    let mut text = format!(
        "name = \"soak-svc\"\ncgroup = \"/{SERVICE_CGROUP}\"\nmode = \"enforce\"\n\n{}",
        common_rules(PORTS)
    );
    if variant.toggle_allowed() {
        text.push_str(&format!(
            "\n[[egress]]\nto = [\"127.0.0.1\"]\nports = [{}]\nprotocol = \"tcp\"\n",
            PORTS.toggle
        ));
    }
    text
}

/// Refused by the policy check (host bits set in a prefix), so a reload
/// with it must leave the policy in force untouched.
pub fn broken_service() -> String {
    format!(
        "name = \"soak-svc\"\ncgroup = \"/{SERVICE_CGROUP}\"\nmode = \"enforce\"\n\n\
         [[egress]]\nto = [\"127.0.0.1/8\"]\nports = [{}]\nprotocol = \"tcp\"\n",
        PORTS.toggle
    )
}

fn churn() -> String {
    format!(
        "name = \"soak-churn\"\ncgroup = \"/{CHURN_CGROUP}\"\nmode = \"enforce\"\n\n{}",
        common_rules(PORTS)
    )
}

/// The policy directory and how its service file is replaced: written
/// beside it and renamed in, so the agent's directory watch sees one
/// complete file, never a half-written one.
pub struct PolicyDir {
    pub dir: PathBuf,
    scratch: PathBuf,
}

impl PolicyDir {
    pub fn create(work: &Path, variant: Variant) -> Result<Self> {
        let dir = work.join("policies");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let this = Self {
            dir,
            scratch: work.join("policy.next"),
        };
        fs::write(this.dir.join("churn.toml"), churn()).context("write churn.toml")?;
        this.write_service(&service(variant))?;
        Ok(this)
    }

    pub fn write_service(&self, text: &str) -> Result<()> {
        fs::write(&self.scratch, text)
            .with_context(|| format!("write {}", self.scratch.display()))?;
        let target = self.dir.join("svc.toml");
        fs::rename(&self.scratch, &target)
            .with_context(|| format!("rename into {}", target.display()))
    }
}
