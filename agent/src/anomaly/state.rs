//! Baselines survive restarts: `anomaly.json` in the state directory,
//! written atomically (temporary file, then rename).

use std::{collections::BTreeMap, io, path::Path};

use serde::{Deserialize, Serialize};

use super::{
    dest::{Bounded, DestKey},
    detector::Detector,
    ewma::Ewma,
    service::ServiceState,
};

pub const STATE_FILE: &str = "anomaly.json";
const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved {
    pub version: u32,
    pub services: BTreeMap<String, SavedService>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SavedService {
    pub intervals: u64,
    pub rate: Ewma,
    pub volume: Ewma,
    pub known: Vec<DestKey>,
}

impl Detector {
    #[must_use]
    pub fn save_state(&self) -> Saved {
        let services = self
            .services
            .iter()
            .map(|(name, s)| {
                let mut known: Vec<DestKey> = s.known.iter().copied().collect();
                known.sort_by_key(|d| (d.ip, d.prefix, d.port, d.proto));
                let saved = SavedService {
                    intervals: s.intervals,
                    rate: s.rate,
                    volume: s.volume,
                    known,
                };
                (name.clone(), saved)
            })
            .collect();
        Saved {
            version: VERSION,
            services,
        }
    }

    /// Takes baselines from `saved` (within this config's caps).
    pub fn restore(&mut self, saved: Saved) {
        for (name, from) in saved.services {
            if self.services.len() >= self.cfg.max_services {
                break;
            }
            let mut s = ServiceState::new(&self.cfg);
            s.intervals = from.intervals;
            s.rate = from.rate;
            s.volume = from.volume;
            let mut known = Bounded::new(self.cfg.max_known_destinations);
            for d in from.known {
                known.insert(d);
            }
            s.known = known;
            self.services.insert(name, s);
        }
    }
}

/// Writes the detector's baselines to `dir/anomaly.json`.
///
/// # Errors
/// When the directory or file cannot be written.
pub fn save(dir: &Path, detector: &Detector) -> io::Result<()> {
    write(dir, &detector.save_state())
}

/// Writes a snapshot taken by [`Detector::save_state`] (so the detectors
/// need not stay locked while the file is written).
///
/// # Errors
/// The state directory cannot be written.
pub fn write(dir: &Path, saved: &Saved) -> io::Result<()> {
    let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
    crate::state_file::write_atomic(dir, STATE_FILE, &bytes, 0o644)
}

/// Reads `dir/anomaly.json`: `Ok(None)` when there is none.
///
/// # Errors
/// When the file exists but cannot be read (a link, not the agent's own,
/// ...) or parsed, or has another version: the problem, for the caller to
/// set it aside.
pub fn load(dir: &Path) -> Result<Option<Saved>, String> {
    match crate::state_file::read(dir, STATE_FILE) {
        Ok(Some(bytes)) => parse(&bytes).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses the file's bytes.
///
/// # Errors
/// Not JSON, not baselines, or another version.
pub fn parse(bytes: &[u8]) -> Result<Saved, String> {
    let saved: Saved =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid baselines: {e}"))?;
    if saved.version != VERSION {
        return Err(format!("version {} (expected {VERSION})", saved.version));
    }
    Ok(saved)
}
