//! The daemon's `/metrics` in the Prometheus text format, parsed: one
//! scrape ([`Scrape`], or the bare [`scrape`] map), the value of one series
//! ([`sample_count`]), and waiting for a value ([`wait_sample`]).

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use crate::{eventually::eventually, http::http_get};

/// A series: metric name and its labels, sorted.
pub type SeriesKey = (String, Vec<(String, String)>);

/// Parses one sample line, `name{k="v",...} value` or `name value`, into
/// its series and its value as written (our label values hold no quotes,
/// commas or braces).
#[must_use]
pub fn parse_sample(line: &str) -> Option<(SeriesKey, String)> {
    let (series, value) = line.rsplit_once(' ')?;
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => {
            let inner = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            for pair in inner.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=')?;
                let v = v.strip_prefix('"')?.strip_suffix('"')?;
                labels.push((k.to_owned(), v.to_owned()));
            }
            labels.sort();
            (name, labels)
        }
    };
    Some(((name.to_owned(), labels), value.to_owned()))
}

/// `name` and `labels` as the key of a series (labels sorted).
fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    (name.to_owned(), labels)
}

/// One scrape, parsed: series -> value as written, and the text it came
/// from (shown when an assertion on it fails).
#[derive(Debug)]
pub struct Scrape {
    text: String,
    series: BTreeMap<SeriesKey, String>,
}

impl Scrape {
    /// `GET /metrics` of the daemon at `addr` (see
    /// [`crate::http::metrics_addr`]); panics on a status other than 200 or
    /// a line it cannot parse.
    #[must_use]
    pub fn get(addr: SocketAddr) -> Self {
        let (status, _head, text) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "GET /metrics: {text}");
        let series = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|line| {
                parse_sample(line)
                    .unwrap_or_else(|| panic!("unparsable sample line {line:?} in\n{text}"))
            })
            .collect();
        Self { text, series }
    }

    /// Every sample, by series.
    #[must_use]
    pub fn series(&self) -> &BTreeMap<SeriesKey, String> {
        &self.series
    }

    /// The scrape as the daemon wrote it.
    #[must_use]
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Every sample, by series.
    #[must_use]
    pub fn into_series(self) -> BTreeMap<SeriesKey, String> {
        self.series
    }

    fn raw(&self, name: &str, labels: &[(&str, &str)]) -> &str {
        let key = key(name, labels);
        self.series
            .get(&key)
            .unwrap_or_else(|| panic!("no series {key:?} in the scrape:\n{}", self.text))
    }

    /// The value of the series `name{labels}` (exactly those labels), a
    /// whole number (counters and counts); panics showing the scrape if
    /// there is no such series.
    #[must_use]
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let raw = self.raw(name, labels);
        raw.parse()
            .unwrap_or_else(|e| panic!("{name}{labels:?} = {raw:?} is not a count: {e}"))
    }

    /// Like [`Self::count`], for a value that may have a fraction.
    #[must_use]
    pub fn real(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let raw = self.raw(name, labels);
        raw.parse()
            .unwrap_or_else(|e| panic!("{name}{labels:?} = {raw:?} is not a number: {e}"))
    }

    /// The label sets of every series of `name` whose labels include `filter`.
    #[must_use]
    pub fn label_sets(&self, name: &str, filter: (&str, &str)) -> Vec<Vec<(&str, &str)>> {
        self.series
            .keys()
            .filter(|(n, labels)| {
                n == name && labels.iter().any(|(k, v)| k == filter.0 && v == filter.1)
            })
            .map(|(_, labels)| {
                labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect()
            })
            .collect()
    }

    /// `count` now minus `count` in `before`.
    #[must_use]
    pub fn delta(&self, before: &Self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let (now, was) = (self.count(name, labels), before.count(name, labels));
        now.checked_sub(was)
            .unwrap_or_else(|| panic!("{name}{labels:?} went down: {was} -> {now}"))
    }
}

/// Every sample of one `GET /metrics` of the daemon at `addr`, by series
/// (a [`Scrape`] without its text).
#[must_use]
pub fn scrape(addr: SocketAddr) -> BTreeMap<SeriesKey, String> {
    Scrape::get(addr).into_series()
}

/// The value of the series `name{labels}` (exactly those labels, in any
/// order) in `samples`, if there is one and it is a whole number.
#[must_use]
pub fn sample_count(
    samples: &BTreeMap<SeriesKey, String>,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<u64> {
    samples.get(&key(name, labels))?.parse().ok()
}

/// Scrapes the daemon at `addr` until the series `name{labels}` has a
/// value `done` accepts, and returns it; panics after `timeout` with
/// `what` and the last value (for what a daemon counts on a timer).
pub fn wait_sample(
    addr: SocketAddr,
    (name, labels): (&str, &[(&str, &str)]),
    what: &str,
    timeout: Duration,
    done: impl Fn(u64) -> bool,
) -> u64 {
    eventually(timeout, Duration::from_millis(100), || {
        let value = sample_count(&scrape(addr), name, labels);
        value.filter(|v| done(*v)).ok_or(value)
    })
    .unwrap_or_else(|value| {
        panic!("{name}{labels:?} did not show {what} within {timeout:?}; last value: {value:?}")
    })
}
