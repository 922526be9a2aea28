//! Which systemd unit a cgroup is, from its path alone: the one rule that
//! both the kernel's `cgroup_mkdir` watcher and the daemon's walk of the
//! cgroup tree apply, so the two cannot disagree.
//!
//! systemd names a unit's cgroup after the unit and nests it in the cgroups
//! of its slices: `/system.slice/foo.service`,
//! `/system.slice/system-foo.slice/foo@a.service` (a template's instance),
//! `/custom.slice/bar.service` (`Slice=`), and for a user's own manager
//! `/user.slice/user-1000.slice/user@1000.service/app.slice/baz.service`.
//!
//! A path names a unit only when every ancestor is a slice, except at most
//! one `user@UID.service` (a user's manager: the units below it are that
//! user's). Only root creates a cgroup whose ancestors are all slices; what a
//! delegated subtree holds (a container's, or a user's manager's own
//! cgroups) sits below a `.service` or `.scope`, so a process that may make
//! cgroups cannot make one that passes for another unit and gain its rules.
//!
//! Names are compared by their 64-bit FNV-1a hash: the kernel program
//! cannot carry and compare a 256-byte name within its verifier budget, and
//! a hash is a value the verifier need not track precisely, so the loop
//! over the path verifies in linear time. Only root can choose the names
//! hashed (see above), so a collision cannot be aimed.

/// [`UnitKey::manager`] of the system manager's units.
pub const SYSTEM_MANAGER: u32 = u32::MAX;
/// [`UnitKey::kind`]: the unit's own name (`foo.service`, `foo@a.service`).
pub const UNIT_EXACT: u32 = 0;
/// [`UnitKey::kind`]: every instance of a template (`foo@.service`).
pub const UNIT_TEMPLATE: u32 = 1;

/// Key of the `UNIT_NAMES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnitKey {
    /// [`SYSTEM_MANAGER`], or the uid whose user manager runs the unit.
    pub manager: u32,
    /// [`UNIT_EXACT`] or [`UNIT_TEMPLATE`].
    pub kind: u32,
    /// [`name_hash`] of the unit or template name.
    pub hash: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline(always)]
const fn step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(FNV_PRIME)
}

/// 64-bit FNV-1a of `name`: how unit and template names are keyed.
#[must_use]
pub const fn name_hash(name: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut i = 0;
    while i < name.len() {
        hash = step(hash, name[i]);
        i += 1;
    }
    hash
}

const SLICE: u64 = name_hash(b"slice");
const SERVICE: u64 = name_hash(b"service");
const USER_AT: u64 = name_hash(b"user@");

/// What a cgroup path says about the unit it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnitPath {
    pub manager: u32,
    /// [`name_hash`] of the last component (the unit's name).
    pub exact: u64,
    /// [`name_hash`] of its template's name when it is an instance
    /// (`foo@a.service` gives that of `foo@.service`).
    pub template: Option<u64>,
}

/// Reads a cgroup path one byte at a time (the kernel program's loop),
/// keeping only what [`UnitPathScan::finish`] needs. A NUL byte is skipped,
/// so a NUL-padded buffer can be fed whole.
#[derive(Clone, Copy, Debug)]
pub struct UnitPathScan {
    manager: u32,
    /// Ancestors that are neither a slice nor the one user manager.
    foreign: u32,
    /// The component being read.
    len: u32,
    whole: u64,
    /// Up to and including the first `@`.
    before_at: u64,
    at: bool,
    /// `before_at`, then `.` and the bytes after the last `.` (the
    /// template's name when the component is an instance).
    template: u64,
    /// Bytes after the last `.`, and whether there was one.
    suffix: u64,
    dot: bool,
    /// Bytes since `@` in the instance before the last `.`.
    instance_len: u32,
    since_at: u32,
    /// The instance as a uid (`user@UID.service`), valid at the last `.`.
    number: u64,
    digits_only: bool,
    uid: u64,
    uid_ok: bool,
}

impl Default for UnitPathScan {
    fn default() -> Self {
        Self::new()
    }
}

impl UnitPathScan {
    #[must_use]
    pub const fn new() -> Self {
        Self {
            manager: SYSTEM_MANAGER,
            foreign: 0,
            len: 0,
            whole: FNV_OFFSET,
            before_at: FNV_OFFSET,
            at: false,
            template: FNV_OFFSET,
            suffix: FNV_OFFSET,
            dot: false,
            instance_len: 0,
            since_at: 0,
            number: 0,
            digits_only: false,
            uid: 0,
            uid_ok: false,
        }
    }

    /// Reads the next byte of the path.
    #[inline(always)]
    pub fn push(&mut self, byte: u8) {
        if byte == 0 {
            return;
        }
        if byte == b'/' {
            self.end_component();
            return;
        }
        self.len += 1;
        self.whole = step(self.whole, byte);
        if byte == b'.' {
            self.suffix = FNV_OFFSET;
            self.dot = true;
        } else {
            self.suffix = step(self.suffix, byte);
        }
        if !self.at {
            self.before_at = step(self.before_at, byte);
            if byte == b'@' {
                self.at = true;
                self.template = self.before_at;
                self.digits_only = true;
            }
            return;
        }
        if byte == b'.' {
            self.template = step(self.before_at, b'.');
            self.instance_len = self.since_at;
            self.uid = self.number;
            self.uid_ok = self.digits_only && self.since_at > 0 && self.number <= u32::MAX as u64;
            self.digits_only = false;
        } else {
            self.template = step(self.template, byte);
            if byte.is_ascii_digit() && self.since_at < 10 {
                self.number = self.number * 10 + (byte - b'0') as u64;
            } else {
                self.digits_only = false;
            }
        }
        self.since_at += 1;
    }

    /// A `/`: the component read so far is an ancestor.
    #[inline(always)]
    fn end_component(&mut self) {
        if self.len > 0 {
            let slice = self.dot && self.suffix == SLICE;
            let user_manager = self.manager == SYSTEM_MANAGER
                && self.at
                && self.before_at == USER_AT
                && self.dot
                && self.suffix == SERVICE
                && self.uid_ok;
            if user_manager {
                self.manager = self.uid as u32;
            } else if !slice {
                self.foreign += 1;
            }
        }
        let (manager, foreign) = (self.manager, self.foreign);
        *self = Self::new();
        self.manager = manager;
        self.foreign = foreign;
    }

    /// Whether a cgroup below this path could still name a unit: every
    /// component so far is a slice or the one user manager.
    #[must_use]
    pub fn may_hold_units(&self) -> bool {
        let mut next = *self;
        next.end_component();
        next.foreign == 0
    }

    /// The unit the path names, if it names one.
    #[must_use]
    pub fn finish(&self) -> Option<UnitPath> {
        if self.len == 0 || self.foreign != 0 {
            return None;
        }
        let instance = self.at && self.dot && self.instance_len > 0;
        Some(UnitPath {
            manager: self.manager,
            exact: self.whole,
            template: if instance { Some(self.template) } else { None },
        })
    }
}

/// The unit `path` names (see the module's rule), if any.
#[must_use]
pub fn unit_of_path(path: &[u8]) -> Option<UnitPath> {
    let mut scan = UnitPathScan::new();
    for &b in path {
        scan.push(b);
    }
    scan.finish()
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), no padding (u32, u32, u64), every bit pattern valid.
    unsafe impl aya::Pod for super::UnitKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(manager: u32, name: &str) -> Option<UnitPath> {
        Some(UnitPath {
            manager,
            exact: name_hash(name.as_bytes()),
            template: None,
        })
    }

    fn instance(manager: u32, name: &str, template: &str) -> Option<UnitPath> {
        Some(UnitPath {
            manager,
            exact: name_hash(name.as_bytes()),
            template: Some(name_hash(template.as_bytes())),
        })
    }

    #[test]
    fn units_in_slices_are_found_by_name() {
        let s = SYSTEM_MANAGER;
        assert_eq!(
            unit_of_path(b"/system.slice/foo.service"),
            exact(s, "foo.service")
        );
        assert_eq!(
            unit_of_path(b"/custom.slice/custom-deep.slice/bar.service"),
            exact(s, "bar.service")
        );
        assert_eq!(unit_of_path(b"/x.scope"), exact(s, "x.scope"));
        assert_eq!(
            unit_of_path(b"/system.slice/system-foo.slice/foo@a.service"),
            instance(s, "foo@a.service", "foo@.service")
        );
        assert_eq!(
            unit_of_path(b"/system.slice/system-foo.slice/foo@a.b-c.service"),
            instance(s, "foo@a.b-c.service", "foo@.service")
        );
        // The user manager is itself a system unit.
        assert_eq!(
            unit_of_path(b"/user.slice/user-1000.slice/user@1000.service"),
            instance(s, "user@1000.service", "user@.service")
        );
    }

    #[test]
    fn user_units_belong_to_their_managers_uid() {
        assert_eq!(
            unit_of_path(b"/user.slice/user-1000.slice/user@1000.service/app.slice/baz.service"),
            exact(1000, "baz.service")
        );
        assert_eq!(
            unit_of_path(b"/user.slice/user-0.slice/user@0.service/baz@x.service"),
            instance(0, "baz@x.service", "baz@.service")
        );
    }

    #[test]
    fn cgroups_inside_units_name_none() {
        for path in [
            // A service's own sub-cgroups (Delegate=yes).
            &b"/system.slice/foo.service/worker"[..],
            b"/system.slice/foo.service/bar.service",
            // A container's systemd.
            b"/system.slice/docker-1.scope/system.slice/foo.service",
            // What a user may create in their manager's delegated subtree.
            b"/user.slice/user-1000.slice/user@1000.service/user@0.service/x.service",
            b"/user.slice/user-1000.slice/user@1000.service/app.slice/a.service/b.service",
            b"/user.slice/user-1000.slice/session-1.scope/foo.service",
            // Not a manager: the instance is not a number.
            b"/user.slice/user@x1.service/foo.service",
            b"/user.slice/user@1.2.service/foo.service",
            b"/user.slice/user@99999999999.service/foo.service",
            b"/",
            b"",
        ] {
            assert_eq!(
                unit_of_path(path),
                None,
                "{}",
                core::str::from_utf8(path).unwrap_or("?")
            );
        }
    }

    #[test]
    fn nul_padding_is_ignored_and_descent_is_limited_to_slices() {
        let mut padded = [0u8; 64];
        padded[..25].copy_from_slice(b"/system.slice/foo.service");
        assert_eq!(unit_of_path(&padded), exact(SYSTEM_MANAGER, "foo.service"));

        let scan = |p: &[u8]| {
            let mut s = UnitPathScan::new();
            p.iter().for_each(|&b| s.push(b));
            s
        };
        assert!(scan(b"/system.slice").may_hold_units());
        assert!(scan(b"/user.slice/user-1.slice/user@1.service").may_hold_units());
        assert!(!scan(b"/system.slice/foo.service").may_hold_units());
        assert!(!scan(b"/user.slice/user-1.slice/user@1.service/user@2.service").may_hold_units());
    }
}
