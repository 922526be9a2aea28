//! The daemon's own configuration (`/etc/bulkhead/bulkhead.toml`). A bad
//! config stops the daemon: a security agent never falls back to defaults.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/bulkhead/bulkhead.toml";
pub const DEFAULT_POLICY_DIR: &str = "/etc/bulkhead/policies";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of policy files, one `*.toml` per service.
    pub policy_dir: PathBuf,
    /// Kernel-side diagnostics through aya-log (off: zero cost on the hot path).
    pub bpf_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            policy_dir: PathBuf::from(DEFAULT_POLICY_DIR),
            bpf_log: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// Reads `path`; with no path, the default file if it exists, else the
    /// built-in defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = crate::policy::position(text, e.span().map_or(0, |s| s.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        // A relative policy_dir is relative to the config file.
        if config.policy_dir.is_relative() {
            if let Some(dir) = path.parent() {
                config.policy_dir = dir.join(&config.policy_dir);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_relative_policy_dir() {
        let c = Config::parse(
            Path::new("/etc/x/bulkhead.toml"),
            "policy_dir = \"p\"\nbpf_log = true\n",
        )
        .expect("valid config");
        assert_eq!(c.policy_dir, PathBuf::from("/etc/x/p"));
        assert!(c.bpf_log);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let err = Config::parse(Path::new("c.toml"), "bpf_log = false\npolicy_dri = \"x\"\n")
            .expect_err("typo must be refused");
        let text = err.to_string();
        assert!(text.starts_with("c.toml:2:1:"), "{text}");
        assert!(text.contains("policy_dri"), "{text}");
    }
}
