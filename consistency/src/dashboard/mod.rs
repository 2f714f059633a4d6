//! The dashboard both daemons serve beside their metrics (docs/dashboard.md): the document
//! the page draws, and the page itself, embedded in the binary (plain HTML, CSS and
//! JavaScript, no build step).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::sync::lock;

/// The version of the document; raised when a field is removed or retyped.
pub const VERSION: u32 = 1;

/// `/api/dashboard`: what one daemon knows of its groups.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    pub version: u32,
    /// `target` or `engine`.
    pub daemon: &'static str,
    /// The engine's name, or the target's listen address.
    pub name: String,
    /// The daemon's clock, seconds since the epoch.
    pub now: f64,
    pub groups: Vec<Group>,
}

/// One group as the page draws it. `None` is a field this daemon cannot know.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub name: String,
    pub mode: Option<String>,
    /// One word of docs/dashboard.md's table (see [`State`]).
    pub state: &'static str,
    pub state_words: String,
    pub rpo_seconds: Option<f64>,
    pub lag_seconds: Option<f64>,
    /// `[time, lag]`, oldest first, the last hour.
    pub lag_history: Vec<(f64, f64)>,
    pub window: Option<Window>,
    pub bookmarks: Option<Vec<Bookmark>>,
    pub spans: Option<Vec<Span>>,
    pub exports: Option<Vec<Export>>,
    pub journal: Journal,
    pub resync: Vec<Resync>,
    pub volumes: Vec<Volume>,
}

/// The recoverable window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Window {
    pub oldest: f64,
    pub newest: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bookmark {
    pub name: String,
    pub seq: u64,
    pub time: f64,
}

/// A stretch of history whose points are not consistent; `to` is `None` while open.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    pub from: f64,
    pub to: Option<f64>,
    pub reason: String,
}

/// A running `hindsight export` of the group.
#[derive(Debug, Clone, Serialize)]
pub struct Export {
    pub seq: u64,
    pub time: f64,
    pub address: String,
    pub writable: bool,
    pub clients: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Journal {
    pub bytes: u64,
    pub limit: Option<u64>,
}

/// A resync or initial sync under way: regions of 1 MiB.
#[derive(Debug, Clone, Serialize)]
pub struct Resync {
    pub volume: String,
    pub done: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    pub vm: String,
    pub name: String,
    pub size: u64,
}

/// What holds of a group, from which its `state` word follows (the first that holds).
#[derive(Debug, Clone, Copy, Default)]
pub struct State {
    /// Failed over (target), or handed over for a planned failover (engine).
    pub failed_over: bool,
    pub stopped: bool,
    pub paused: bool,
    pub disconnected: bool,
    pub resyncing: bool,
    pub degraded: bool,
    pub regulating: bool,
    pub lagging: bool,
}

impl State {
    /// The state's word (docs/dashboard.md).
    pub fn word(&self) -> &'static str {
        [
            (self.failed_over, "failed-over"),
            (self.stopped, "stopped"),
            (self.paused, "paused"),
            (self.disconnected, "disconnected"),
            (self.resyncing, "resyncing"),
            (self.degraded, "degraded"),
            (self.regulating, "regulating"),
            (self.lagging, "lagging"),
        ]
        .into_iter()
        .find_map(|(holds, word)| holds.then_some(word))
        .unwrap_or("protected")
    }
}

/// How often the lag is sampled for `lag_history`, and how long samples are kept.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
pub const HISTORY_SPAN: Duration = Duration::from_secs(3600);

/// Each group's lag over the last hour, sampled every [`SAMPLE_EVERY`] (in memory: it starts
/// empty with the daemon). A run of equal samples is kept as its first and last (a line on the
/// chart all the same), so an idle group's hour is two samples, not 720.
#[derive(Debug, Default)]
pub struct LagHistory {
    groups: Mutex<HashMap<String, VecDeque<(f64, f64)>>>,
}

impl LagHistory {
    /// Adds a sample of each group's lag taken at `now` (seconds since the epoch); groups not
    /// named are forgotten.
    pub fn record(&self, now: f64, lags: &[(String, f64)]) {
        let mut groups = lock(&self.groups);
        groups.retain(|name, _| lags.iter().any(|(n, _)| n == name));
        for (name, lag) in lags {
            let samples = groups.entry(name.clone()).or_default();
            let n = samples.len();
            match (n.checked_sub(2).and_then(|i| samples.get(i)).copied(), samples.back_mut()) {
                // The run goes on: its last sample moves to now.
                (Some((_, before)), Some(last)) if before == *lag && last.1 == *lag => last.0 = now,
                _ => samples.push_back((now, *lag)),
            }
            let oldest = now - HISTORY_SPAN.as_secs_f64();
            while let Some(&(t, l)) = samples.front() {
                if t >= oldest {
                    break;
                }
                // A run reaching into the hour starts where the hour does.
                match samples.get(1) {
                    Some(&(next_t, next_l)) if next_l == l && next_t > oldest => {
                        samples[0].0 = oldest;
                        break;
                    }
                    _ => {
                        samples.pop_front();
                    }
                }
            }
            if samples.capacity() > 4 * samples.len().max(8) {
                samples.shrink_to_fit();
            }
        }
    }

    /// A group's samples, oldest first.
    pub fn of(&self, group: &str) -> Vec<(f64, f64)> {
        lock(&self.groups).get(group).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }
}

/// The document as JSON.
pub fn to_json(doc: &Document) -> String {
    serde_json::to_string(doc).expect("a dashboard document always encodes")
}

/// The page's files: `(content type, body)` of a path, or `None`.
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", include_str!("page/index.html"))),
        "/dashboard.js" => Some(("text/javascript; charset=utf-8", include_str!("page/dashboard.js"))),
        "/dashboard.css" => Some(("text/css; charset=utf-8", include_str!("page/dashboard.css"))),
        _ => None,
    }
}

/// Seconds since the epoch, as the document gives times.
pub fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_the_first_that_holds() {
        assert_eq!(State::default().word(), "protected");
        assert_eq!(State { lagging: true, regulating: true, ..State::default() }.word(), "regulating");
        assert_eq!(State { paused: true, disconnected: true, ..State::default() }.word(), "paused");
        assert_eq!(State { stopped: true, paused: true, ..State::default() }.word(), "stopped");
    }

    #[test]
    fn unknown_fields_are_null_in_the_json() {
        let doc = Document {
            version: VERSION,
            daemon: "target",
            name: "t".into(),
            now: 1.5,
            groups: vec![Group { name: "erp".into(), state: "protected", ..Group::default() }],
        };
        let json = to_json(&doc);
        assert!(json.contains("\"rpo_seconds\":null") && json.contains("\"journal\":{\"bytes\":0,\"limit\":null}"), "{json}");
    }

    #[test]
    fn lag_history_keeps_the_last_hour_of_the_groups_that_remain() {
        let h = LagHistory::default();
        h.record(1000.0, &[("a".into(), 1.0), ("b".into(), 2.0)]);
        h.record(3000.0, &[("a".into(), 3.0), ("b".into(), 4.0)]);
        h.record(4700.0, &[("a".into(), 5.0)]);
        assert_eq!(h.of("a"), vec![(3000.0, 3.0), (4700.0, 5.0)]);
        assert!(h.of("b").is_empty(), "a group gone is forgotten");
    }

    #[test]
    fn lag_history_keeps_a_run_of_equal_samples_as_its_ends() {
        let h = LagHistory::default();
        for i in 0..720 {
            h.record(1000.0 + 5.0 * f64::from(i), &[("idle".into(), 0.0)]);
        }
        assert_eq!(h.of("idle"), vec![(1000.0, 0.0), (4595.0, 0.0)]);
        h.record(4600.0, &[("idle".into(), 2.0)]);
        h.record(4605.0, &[("idle".into(), 0.0)]);
        assert_eq!(h.of("idle"), vec![(1005.0, 0.0), (4595.0, 0.0), (4600.0, 2.0), (4605.0, 0.0)], "the run starts where the hour does");
        // An hour later the run is cut where the hour starts.
        h.record(5200.0, &[("idle".into(), 0.0)]);
        h.record(5300.0, &[("idle".into(), 0.0)]);
        assert_eq!(h.of("idle"), vec![(1700.0, 0.0), (4595.0, 0.0), (4600.0, 2.0), (4605.0, 0.0), (5300.0, 0.0)]);
    }

    #[test]
    fn the_page_and_its_files_are_embedded() {
        for path in ["/", "/dashboard.js", "/dashboard.css"] {
            assert!(asset(path).is_some_and(|(_, body)| !body.is_empty()), "{path}");
        }
        assert!(asset("/etc/passwd").is_none());
    }
}
