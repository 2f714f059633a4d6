//! The human form of `hindsight history`: the window, the journal, the stretches that are no
//! consistent point, bookmarks, volumes and running exports, sizes as people read them.

use hindsight_consistency::time::format_rfc3339;
use hindsight_target::failover::{FailoverState, Stage};

use crate::progress::human;

/// The human form of `hindsight history`.
pub fn format_history(h: &hindsight_target::History) -> String {
    use hindsight_target::spans::SpanKind;
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "group {} (shipped by {})", h.group, h.engine);
    let _ = writeln!(
        s,
        "  recoverable: seq {} ({}) .. seq {} ({})",
        h.first_seq,
        format_rfc3339(h.first_time_ns),
        h.last_seq,
        format_rfc3339(h.last_time_ns)
    );
    let mut limits = Vec::new();
    if let Some(r) = h.retention_ns {
        limits.push(format!("retention {}", humanize_duration(r)));
    }
    if let Some(j) = h.journal_size {
        limits.push(format!("journal_size {}", human(j)));
    }
    let _ =
        writeln!(s, "  journal: {} segments, {} ({} bytes); {}", h.segments, human(h.journal_bytes), h.journal_bytes, limits.join(", "));
    if h.journal_size.is_some_and(|max| h.journal_bytes >= max) {
        let _ = writeln!(
            s,
            "  journal FULL: the group's on_journal_full decides: trim_history folds the oldest points away (even inside \
             retention); block and pause_and_track take nothing more until they leave the retention (hindsight status)"
        );
    }
    if !h.tiers.is_empty() {
        let _ = writeln!(s, "  tiers (docs/retention-tiers.md):");
        let mut from = "0s".to_owned();
        for t in &h.tiers {
            let every = if t.every == "write" { "every write".to_owned() } else { format!("a point per {}", t.every) };
            let span = match (t.oldest, t.newest) {
                (Some(o), Some(n)) => format!("seq {}..{} ({} .. {})", o.0, n.0, format_rfc3339(o.1), format_rfc3339(n.1)),
                _ => "no points yet".to_owned(),
            };
            let _ = writeln!(s, "    {every:<20} {from:>6} to {:<6} {:>8} points  {:>10}  {span}", t.until, t.points, human(t.bytes));
            from.clone_from(&t.until);
        }
    }
    let _ = writeln!(s, "  replicas applied up to seq {}", h.applied_seq);
    if !h.inconsistent.is_empty() {
        let spans: Vec<String> = h
            .inconsistent
            .iter()
            .map(|sp| match (sp.to, sp.kind) {
                (Some(t), kind) => format!("{}..{} ({})", sp.from, t - 1, kind.as_str()),
                (None, SpanKind::Delta) => format!("{}.. (async delta, arriving)", sp.from),
                (None, SpanKind::Resync) => format!("{}.. (resync, not completed yet)", sp.from),
            })
            .collect();
        let _ = writeln!(s, "  not consistent: seq {}; newest consistent point: seq {}", spans.join(", "), h.last_consistent_seq);
    }
    for b in &h.bookmarks {
        let note = if b.note.is_empty() { String::new() } else { format!(" ({})", b.note) };
        let _ = writeln!(s, "  bookmark {:<20} seq {:<10} {}  {}{note}", b.name, b.seq, format_rfc3339(b.time_ns), b.consistency);
    }
    for v in &h.volumes {
        let _ = writeln!(s, "  volume {:<24} vm {:<16} {} ({} bytes)", v.name, v.vm, human(v.size), v.size);
    }
    for e in &h.exports {
        let overlay = if e.writable { format!(", overlay {}", human(e.overlay_bytes)) } else { String::new() };
        let _ = writeln!(
            s,
            "  exported: seq {} ({}) on {} by pid {} since {}: {}; {} client(s){overlay}; pinned: retention folds nothing meanwhile",
            e.seq,
            format_rfc3339(e.time_ns),
            e.listen,
            e.pid,
            format_rfc3339(e.started_ns),
            e.volumes.join(", "),
            e.clients
        );
    }
    s
}

/// How long one tier would cover within the budget, at the rates measured now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TierEstimate {
    pub every: String,
    /// The span the tier is configured to cover, in seconds (`for` less the tier before's).
    pub wants_seconds: u64,
    /// Bytes per second of history it takes: measured, or assumed as the tier before's.
    pub bytes_per_second: Option<u64>,
    pub measured: bool,
    /// Bytes it needs for its whole span.
    pub needs_bytes: Option<u64>,
    /// The span it would cover within what the finer tiers leave of the budget.
    pub covers_seconds: Option<u64>,
}

/// `history --estimate`: from the bytes per second each tier takes now, how much of its span
/// each one covers within `journal_size`, finest first (the finer tiers take their share
/// first, as thinning does). A tier with nothing measured yet is assumed to take what the tier
/// before it takes (more than it will: a coarser tier keeps less).
pub fn estimate(h: &hindsight_target::History) -> Vec<TierEstimate> {
    let mut remaining = h.journal_size;
    let mut before = 0u64;
    let mut rate: Option<u64> = None;
    let mut out = Vec::new();
    for t in &h.tiers {
        let until = hindsight_consistency::config::parse_duration(&t.until).map_or(0, |d| d.as_secs());
        let wants = until.saturating_sub(before);
        before = until;
        let measured = t.bytes_per_second.is_some();
        rate = t.bytes_per_second.or(rate);
        let needs = rate.map(|r| r.saturating_mul(wants));
        let covers = match (rate, needs, remaining) {
            (Some(_), Some(n), Some(left)) if n <= left => Some(wants),
            (Some(r), Some(_), Some(left)) => Some(left / r.max(1)),
            (Some(_), _, None) => Some(wants),
            _ => None,
        };
        if let (Some(left), Some(n)) = (remaining, needs) {
            remaining = Some(left.saturating_sub(n));
        }
        out.push(TierEstimate {
            every: t.every.clone(),
            wants_seconds: wants,
            bytes_per_second: rate,
            measured,
            needs_bytes: needs,
            covers_seconds: covers,
        });
    }
    out
}

/// The human form of [`estimate`].
pub fn format_estimate(h: &hindsight_target::History, est: &[TierEstimate]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let budget = h.journal_size.map_or("no journal_size (no limit)".to_owned(), |b| format!("journal_size {}", human(b)));
    let _ = writeln!(s, "  estimate within {budget}, at the rates measured now:");
    for e in est {
        let every = if e.every == "write" { "every write".to_owned() } else { format!("a point per {}", e.every) };
        let span = |secs: u64| hindsight_consistency::time::format_duration(std::time::Duration::from_secs(secs));
        let wants = span(e.wants_seconds);
        let line = match (e.bytes_per_second, e.needs_bytes, e.covers_seconds) {
            (Some(r), Some(n), Some(c)) => {
                let rate = if e.measured { format!("{}/s", human(r)) } else { format!("{}/s, assumed as the tier before", human(r)) };
                let covers = if c >= e.wants_seconds { "covered".to_owned() } else { format!("covers {} of {wants}", span(c)) };
                format!("needs {} for {wants} ({rate}): {covers}", human(n))
            }
            _ => format!("{wants}: not measured yet (no writes in it)"),
        };
        let _ = writeln!(s, "    {every:<20} {line}");
    }
    s
}

/// Which site is production for the group, from its failover state (docs/failover.md).
pub fn format_role(cfg: &hindsight_consistency::config::TargetConfig, group: &str, state: Option<&FailoverState>) -> String {
    match state {
        None => "  production: the source site (this target holds a replica)\n".to_owned(),
        Some(s) if s.state == Stage::FailedOver => format!(
            "  production: THE RECOVERY SITE, since {} (failed over to seq {}, epoch {}); volumes in {}\n",
            format_rfc3339(s.promoted_ns.unwrap_or(s.requested_ns)),
            s.seq.unwrap_or(0),
            s.epoch,
            hindsight_target::failover::promoted_dir(cfg, group).display()
        ),
        Some(s) => format!(
            "  production: a failover is under way since {} ({:?}); the target takes nothing more of the group: run hindsight failover again to finish it\n",
            format_rfc3339(s.requested_ns),
            s.state
        ),
    }
}

fn humanize_duration(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", ns / 1_000_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_target::spans::{Span, SpanKind};

    fn history(inconsistent: Vec<Span>, last_consistent_seq: u64) -> hindsight_target::History {
        hindsight_target::History {
            group: "erp".into(),
            engine: "engine-a".into(),
            volumes: vec![],
            first_seq: 0,
            first_time_ns: 0,
            last_seq: 30,
            last_time_ns: 0,
            applied_seq: 30,
            journal_bytes: 0,
            segments: 1,
            retention_ns: None,
            journal_size: None,
            bookmarks: vec![],
            inconsistent,
            last_consistent_seq,
            exports: vec![],
            tiers: vec![],
        }
    }

    #[test]
    fn the_estimate_gives_each_tier_its_share_of_the_budget_finest_first() {
        let mut h = history(vec![], 30);
        h.journal_size = Some(10 << 30);
        let tier = |every: &str, until: &str, rate: Option<u64>| hindsight_target::TierHistory {
            every: every.into(),
            until: until.into(),
            points: 0,
            oldest: None,
            newest: None,
            bytes: 0,
            kept: vec![],
            bytes_per_second: rate,
        };
        // 1 MiB/s for an hour (3.5 GiB), 100 KiB/s for 23 h (7.9 GiB: only 6.5 GiB are left),
        // then a tier with nothing measured.
        h.tiers = vec![tier("write", "1h", Some(1 << 20)), tier("1m", "1day", Some(100 << 10)), tier("1h", "7days", None)];
        let est = estimate(&h);
        assert_eq!(est[0].covers_seconds, Some(3600));
        assert_eq!(est[1].needs_bytes, Some((100 << 10) * 23 * 3600));
        assert_eq!(est[1].covers_seconds, Some(((10u64 << 30) - (3600 << 20)) / (100 << 10)));
        assert_eq!((est[2].measured, est[2].bytes_per_second, est[2].covers_seconds), (false, Some(100 << 10), Some(0)));
        let text = format_estimate(&h, &est);
        assert!(text.contains("  estimate within journal_size 10.0 GiB, at the rates measured now:\n"), "{text}");
        assert!(text.contains("    every write          needs 3.5 GiB for 1h (1.0 MiB/s): covered\n"), "{text}");
        assert!(text.contains("    a point per 1m       needs 7.9 GiB for 23h (100.0 KiB/s): covers 18h 53m 13s of 23h\n"), "{text}");
        assert!(text.contains("(100.0 KiB/s, assumed as the tier before): covers 0s of 6days\n"), "{text}");
    }

    #[test]
    fn history_shows_each_tier_with_its_span_points_and_bytes() {
        let mut h = history(vec![], 30);
        let tier = |every: &str, until: &str, points, span: Option<((u64, u64), (u64, u64))>, bytes| hindsight_target::TierHistory {
            every: every.into(),
            until: until.into(),
            points,
            oldest: span.map(|s| s.0),
            newest: span.map(|s| s.1),
            bytes,
            kept: vec![],
            bytes_per_second: None,
        };
        h.tiers = vec![tier("write", "1h", 12, Some(((19, 0), (30, 0))), 3 << 20), tier("1m", "1day", 0, None, 0)];
        let text = format_history(&h);
        assert!(text.contains("  tiers (docs/retention-tiers.md):\n"), "{text}");
        assert!(text.contains("    every write              0s to 1h           12 points     3.0 MiB  seq 19..30 ("), "{text}");
        assert!(text.contains("    a point per 1m           1h to 1day          0 points         0 B  no points yet\n"), "{text}");
    }

    #[test]
    fn history_names_the_kind_of_each_inconsistent_span() {
        let h = history(
            vec![
                Span { from: 5, to: Some(8), kind: SpanKind::Delta, from_time_ns: 0, to_time_ns: None },
                Span { from: 11, to: Some(18), kind: SpanKind::Resync, from_time_ns: 0, to_time_ns: None },
                Span { from: 25, to: None, kind: SpanKind::Resync, from_time_ns: 0, to_time_ns: None },
                Span { from: 27, to: None, kind: SpanKind::Delta, from_time_ns: 0, to_time_ns: None },
            ],
            24,
        );
        let text = format_history(&h);
        assert!(
            text.contains(
                "  not consistent: seq 5..7 (async delta), 11..17 (resync), 25.. (resync, not completed yet), 27.. (async delta, arriving); \
                 newest consistent point: seq 24\n"
            ),
            "{text}"
        );
        assert!(!format_history(&history(vec![], 30)).contains("not consistent"));
    }

    #[test]
    fn sizes_are_shown_for_people_with_the_exact_bytes() {
        let mut h = history(vec![], 30);
        h.journal_bytes = 1_503_238_554;
        h.journal_size = Some(20 << 30);
        h.volumes = vec![hindsight_target::Volume { name: "db".into(), vm: "vm1".into(), size: 1 << 30 }];
        let text = format_history(&h);
        assert!(text.contains("journal: 1 segments, 1.4 GiB (1503238554 bytes); journal_size 20.0 GiB"), "{text}");
        assert!(text.contains("1.0 GiB (1073741824 bytes)"), "{text}");
    }
}
