//! The recovery site's dashboard document (docs/dashboard.md): each group's window with its
//! bookmarks, spans and exports, its journal against the budget, its lag over the last hour
//! as the target knows it, and its state in words. The page that draws it is
//! `hindsight_consistency::dashboard`'s.

use hindsight_consistency::dashboard::{self as page, seconds, Document, LagHistory, State};
use hindsight_consistency::time::format_rfc3339_seconds;

use crate::metrics::Scrape;

/// The document for these groups at `now_ns`; `name` is this target's listen address.
pub(crate) fn document(name: &str, groups: &[Scrape], lag: &LagHistory, now_ns: u64) -> Document {
    Document {
        version: page::VERSION,
        daemon: "target",
        name: name.to_owned(),
        now: seconds(now_ns),
        groups: groups.iter().map(|s| group(s, lag)).collect(),
    }
}

fn group(s: &Scrape, lag: &LagHistory) -> page::Group {
    let (g, m) = (&s.gauges, &s.marks);
    let open_resync = m.spans.iter().any(|sp| sp.to.is_none() && sp.kind == crate::spans::SpanKind::Resync);
    let state = State { stopped: g.stopped, disconnected: !g.engine_connected, resyncing: open_resync, ..State::default() };
    let word = state.word();
    let window = (g.newest_ns > 0).then(|| page::Window { oldest: seconds(g.oldest_ns), newest: seconds(g.newest_ns) });
    let state_words = match word {
        "stopped" => "stopped after an I/O failure: restart the target (its log says why)".to_owned(),
        "disconnected" => {
            format!("the engine is not connected: the newest point is {} (seq {})", format_rfc3339_seconds(g.newest_ns), g.last_seq)
        }
        "resyncing" => "a resync is under way: points after it started are not consistent until it ends".to_owned(),
        _ => format!("protected: the newest point is {} (seq {})", format_rfc3339_seconds(g.newest_ns), g.last_seq),
    };
    page::Group {
        name: s.name.clone(),
        mode: None,
        state: word,
        state_words,
        rpo_seconds: None,
        lag_seconds: g.lag_ns.map(seconds),
        lag_history: lag.of(&s.name),
        window,
        bookmarks: Some(
            m.bookmarks.iter().map(|b| page::Bookmark { name: b.name.clone(), seq: b.seq, time: seconds(b.time_ns) }).collect(),
        ),
        spans: Some(
            m.spans
                .iter()
                .map(|sp| page::Span {
                    // A span from a file written before spans held times starts at the window.
                    from: seconds(sp.from_time_ns.max(g.oldest_ns)),
                    to: sp.to_time_ns.map(seconds),
                    reason: format!("{} from seq {}", sp.kind.as_str(), sp.from),
                })
                .collect(),
        ),
        exports: Some(
            m.exports
                .iter()
                .map(|e| page::Export {
                    seq: e.seq,
                    time: seconds(e.time_ns),
                    address: e.listen.clone(),
                    writable: e.writable,
                    clients: e.clients as u64,
                })
                .collect(),
        ),
        journal: page::Journal { bytes: g.journal_bytes, limit: g.journal_size },
        resync: Vec::new(),
        volumes: g.volumes.iter().map(|(v, _)| page::Volume { vm: v.vm.clone(), name: v.name.clone(), size: v.size }).collect(),
    }
}
