//! The recovery site's dashboard document (docs/dashboard.md): each group's window with its
//! bookmarks, spans and exports, its journal against the budget, its lag over the last hour
//! as the target knows it, and its state in words. The page that draws it is
//! `hindsight_consistency::dashboard`'s.

use hindsight_consistency::dashboard::{self as page, seconds, Document, LagHistory, State};
use hindsight_consistency::time::format_rfc3339_seconds;

use crate::failover::Stage;
use crate::metrics::{FailedOver, Scrape};

/// The document for these groups at `now_ns`; `name` is this target's listen address.
pub(crate) fn document(name: &str, groups: &[Scrape], failed_over: &[FailedOver], lag: &LagHistory, now_ns: u64) -> Document {
    let mut cards: Vec<page::Group> = groups.iter().map(|s| group(s, lag)).collect();
    cards.extend(failed_over.iter().map(failed_over_card));
    cards.sort_by(|a, b| a.name.cmp(&b.name));
    Document { version: page::VERSION, daemon: "target", name: name.to_owned(), now: seconds(now_ns), groups: cards }
}

/// The card of a group failed over here: production runs at this site.
fn failed_over_card(f: &FailedOver) -> page::Group {
    let state_words = match &f.state {
        Some(s) if s.state == Stage::FailedOver => format!(
            "failed over: production runs at this site since {} (seq {}, epoch {}), unprotected until a failback; the history \
             before it can still be recovered and exported",
            format_rfc3339_seconds(s.promoted_ns.unwrap_or(s.requested_ns)),
            s.seq.unwrap_or(0),
            s.epoch
        ),
        Some(s) => format!(
            "a failover is under way since {}: the target takes nothing more of the group; run hindsight failover again to finish it",
            format_rfc3339_seconds(s.requested_ns)
        ),
        None => "failed over (its failover.toml cannot be read: the target's log says why)".to_owned(),
    };
    page::Group {
        name: f.name.clone(),
        mode: None,
        state: State { failed_over: true, ..State::default() }.word(),
        state_words,
        rpo_seconds: None,
        lag_seconds: None,
        lag_history: Vec::new(),
        window: None,
        bookmarks: None,
        spans: None,
        exports: None,
        journal: page::Journal { bytes: 0, limit: None },
        resync: Vec::new(),
        volumes: Vec::new(),
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
