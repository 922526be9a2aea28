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
/// When the file exists but cannot be read or parsed, or has another version.
pub fn load(dir: &Path) -> io::Result<Option<Saved>> {
    let bytes = match std::fs::read(dir.join(STATE_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let saved: Saved = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
    if saved.version != VERSION {
        return Err(io::Error::other(format!(
            "{STATE_FILE}: version {} (expected {VERSION})",
            saved.version
        )));
    }
    Ok(Some(saved))
}
