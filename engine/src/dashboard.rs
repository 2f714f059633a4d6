//! The source site's dashboard document (docs/dashboard.md): each group's lag over the last
//! hour against its RPO, its journal against the budget, its resyncs, and its state in words.
//! The window, its bookmarks and exports are the recovery site's: the target's page draws
//! them. The page itself is `hindsight_consistency::dashboard`'s.

use hindsight_consistency::dashboard::{self as page, seconds, Document, LagHistory, State};

use crate::metrics::Scrape;

/// The document for these groups at `now_ns`; `name` is the engine's.
pub(crate) fn document(name: &str, groups: &[Scrape], lag: &LagHistory, now_ns: u64) -> Document {
    Document {
        version: page::VERSION,
        daemon: "engine",
        name: name.to_owned(),
        now: seconds(now_ns),
        groups: groups.iter().map(|s| group(s, lag)).collect(),
    }
}

fn group(s: &Scrape, lag: &LagHistory) -> page::Group {
    let g = &s.status;
    let lag_s = g.lag_ms as f64 / 1e3;
    let rpo = (g.rpo_ms > 0).then(|| g.rpo_ms as f64 / 1e3);
    let state = State {
        failed_over: g.handed_over || !g.target_refused.is_empty(),
        stopped: g.poisoned,
        paused: g.paused,
        disconnected: !g.target_connected,
        resyncing: !g.resyncing.is_empty(),
        degraded: g.mode != g.effective_mode,
        regulating: g.regulating,
        lagging: !g.rpo_ok,
    };
    let word = state.word();
    let rpo_words = rpo.map_or_else(|| "no RPO set".to_owned(), |r| format!("RPO {r:.1} s"));
    let state_words = match word {
        "failed-over" if !g.target_refused.is_empty() => format!("the target refuses the group: {}", g.target_refused),
        "failed-over" => "handed over for a planned failover: no more writes are acknowledged until the engine restarts".to_owned(),
        "stopped" => "stopped after a journal failure: restart the engine (its log says why)".to_owned(),
        "paused" => format!("paused: {}", g.journal_state),
        "disconnected" => {
            let (records, wait) = if g.lag_writes == 1 { ("record", "waits") } else { ("records", "wait") };
            format!("the target at {} is not connected: {} {records} ({} bytes) {wait} to be shipped", g.target, g.lag_writes, g.lag_bytes)
        }
        "resyncing" => format!("resyncing {} volume(s): points in the resync are not consistent until it ends", g.resyncing.len()),
        "degraded" => format!("degraded: running {} instead of {}: {}", g.effective_mode, g.mode, g.reason),
        "regulating" => format!("lag {lag_s:.1} s: acknowledgements are slowed to keep the {rpo_words}"),
        "lagging" => format!("lag {lag_s:.1} s exceeds the {rpo_words}"),
        _ => format!("protected: lag {lag_s:.1} s, {rpo_words}, mode {}", g.effective_mode),
    };
    page::Group {
        name: g.name.clone(),
        mode: Some(g.effective_mode.clone()),
        state: word,
        state_words,
        rpo_seconds: rpo,
        lag_seconds: Some(lag_s),
        lag_history: lag.of(&g.name),
        window: None,
        bookmarks: None,
        spans: None,
        exports: None,
        journal: page::Journal { bytes: g.journal_bytes, limit: (g.journal_size > 0).then_some(g.journal_size) },
        resync: g.resyncing.iter().map(|r| page::Resync { volume: r.volume.clone(), done: r.done, total: r.total }).collect(),
        volumes: s.volumes.iter().map(|(v, _, _)| page::Volume { vm: v.vm.clone(), name: v.name.clone(), size: v.size }).collect(),
    }
}
