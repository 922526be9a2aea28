//! Host set-ups in which a service's lookups never leave it on port 53,
//! so the proxy learns nothing from them and its connects by name are
//! denied (docs/dns-names.md, Failure modes). Checked when the proxy
//! starts (some service has name rules), each found one logged as a
//! warning saying what and why:
//!
//! - `/etc/nsswitch.conf` has `resolve` (nss-resolve) on its `hosts:` line
//!   before `dns`: glibc asks systemd-resolved over varlink, not over DNS.
//! - an nscd socket exists: glibc asks nscd, which looks names up for
//!   every process, from its own cgroup (and caches them).

use std::{fs, io, path::Path};

/// Where the host's resolver configuration is (injectable for tests).
#[derive(Debug, Clone, Copy)]
pub struct HostFiles<'a> {
    pub nsswitch: &'a Path,
    /// nscd's socket, at either of its usual places.
    pub nscd_sockets: &'a [&'a Path],
}

/// The host's `nsswitch.conf`.
pub const NSSWITCH: &str = "/etc/nsswitch.conf";
/// nscd's socket on the host, at either of its usual places.
pub const NSCD_SOCKETS: [&str; 2] = ["/var/run/nscd/socket", "/run/nscd/socket"];

/// What in `files` keeps lookups from reaching the proxy, one sentence
/// each (empty: nothing found).
#[must_use]
pub fn bypasses(files: &HostFiles<'_>) -> Vec<String> {
    let mut found = Vec::new();
    match fs::read_to_string(files.nsswitch) {
        Ok(text) => {
            if let Some(line) = resolve_before_dns(&text) {
                found.push(format!(
                    "{} has nss-resolve before dns (`{line}`): glibc asks systemd-resolved over \
                     varlink instead of sending the service's own port-53 query, so the DNS proxy \
                     learns nothing and connects by name are denied; put `dns` before `resolve` \
                     (resolv.conf's nameserver, e.g. resolved's stub 127.0.0.53, is then asked \
                     over port 53)",
                    files.nsswitch.display()
                ));
            }
        }
        // No nsswitch.conf: glibc's default, `dns` then `files`.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => found.push(format!(
            "cannot read {} ({e}): whether lookups go through nss-resolve (which bypasses the \
             DNS proxy) is unknown",
            files.nsswitch.display()
        )),
    }
    for socket in files.nscd_sockets {
        if socket.exists() {
            found.push(format!(
                "nscd's socket {} exists: glibc asks nscd, which looks names up on behalf of \
                 every process from its own cgroup, so the services' lookups do not reach the \
                 DNS proxy and their connects by name are denied; stop nscd or disable its \
                 hosts cache (`enable-cache hosts no`)",
                socket.display()
            ));
            break;
        }
    }
    found
}

/// A `hosts:` line that lists `resolve` with no `dns` before it (any
/// such line: a file with two is broken anyway, and a warning costs
/// nothing).
fn resolve_before_dns(nsswitch: &str) -> Option<String> {
    nsswitch
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .find(|l| {
            l.split_once(':')
                .is_some_and(|(db, services)| db.trim() == "hosts" && resolve_first(services))
        })
        .map(str::to_owned)
}

/// Whether the services of a `hosts:` line have `resolve` before `dns`.
fn resolve_first(services: &str) -> bool {
    // Services, without their `[STATUS=ACTION]` criteria.
    let mut in_criteria = false;
    for word in services.split_whitespace() {
        if in_criteria || word.starts_with('[') {
            in_criteria = !word.ends_with(']');
            continue;
        }
        match word {
            "dns" => return false,
            "resolve" => return true,
            _ => {}
        }
    }
    false
}

/// Logs each of [`bypasses`] of the host's own files as a warning.
pub fn warn_host_bypasses() {
    let sockets = NSCD_SOCKETS.map(Path::new);
    let files = HostFiles {
        nsswitch: Path::new(NSSWITCH),
        nscd_sockets: &sockets,
    };
    for problem in bypasses(&files) {
        tracing::warn!("name rules: {problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(nsswitch: Option<&str>, nscd: bool) -> Vec<String> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ns = dir.path().join("nsswitch.conf");
        if let Some(text) = nsswitch {
            fs::write(&ns, text).expect("write nsswitch.conf");
        }
        let sock = dir.path().join("socket");
        if nscd {
            fs::write(&sock, "").expect("write socket stand-in");
        }
        let absent = dir.path().join("absent");
        let sockets = [absent.as_path(), sock.as_path()];
        bypasses(&HostFiles {
            nsswitch: &ns,
            nscd_sockets: &sockets,
        })
    }

    #[test]
    fn resolve_before_dns_is_found_and_named() {
        let systemd = "passwd: files systemd\n\
                       hosts: mymachines resolve [!UNAVAIL=return] files myhostname dns\n";
        let found = check(Some(systemd), false);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("nss-resolve before dns"), "{found:?}");
        assert!(
            found[0].contains("hosts: mymachines resolve [!UNAVAIL=return]"),
            "{found:?}"
        );
        // resolve with no dns at all is the same.
        assert_eq!(check(Some("hosts: files resolve\n"), false).len(), 1);
    }

    #[test]
    fn dns_first_or_no_resolve_is_fine() {
        for ok in [
            "hosts: files dns\n",
            "hosts:          files mdns4_minimal [NOTFOUND=return] dns\n",
            "hosts: files dns resolve\n",
            "hosts: files [resolve=x] dns\n",
            "# hosts: resolve dns\nhosts: files dns # resolve\n",
            "passwd: resolve\n",
            "",
        ] {
            assert_eq!(check(Some(ok), false), Vec::<String>::new(), "{ok:?}");
        }
        // No nsswitch.conf: glibc's default (dns, files).
        assert_eq!(check(None, false), Vec::<String>::new());
    }

    #[test]
    fn any_hosts_line_with_resolve_first_counts() {
        assert_eq!(
            check(Some("hosts: dns\nhosts: resolve dns\n"), false).len(),
            1
        );
        assert_eq!(check(Some("hosts: resolve\nhosts: dns\n"), false).len(), 1);
    }

    #[test]
    fn an_nscd_socket_is_found_and_named() {
        let found = check(Some("hosts: files dns\n"), true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("nscd's socket "), "{found:?}");
        assert!(found[0].contains("/socket exists"), "{found:?}");
        assert_eq!(check(Some("hosts: resolve\n"), true).len(), 2);
    }
}
