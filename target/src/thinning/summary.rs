//! What each retention tier of a group holds now, for `hindsight history` and `status`: its
//! points, their span and the bytes they take.

use std::os::unix::fs::MetadataExt;

use hindsight_consistency::config::{Every, Tier};
use hindsight_consistency::time::format_duration;

use super::kept::tier_of;
use crate::group_view::GroupView;
use crate::model::TierHistory;

/// The tiers of the group in `view` at `now_ns`, finest first (empty without tiers).
pub(crate) fn tiers_of(view: &GroupView, tiers: &[Tier], now_ns: u64) -> Vec<TierHistory> {
    let mut out: Vec<TierHistory> = tiers
        .iter()
        .map(|t| TierHistory {
            every: match t.every {
                Every::Write => "write".to_owned(),
                Every::Interval(d) => format_duration(d),
            },
            until: format_duration(t.until),
            points: 0,
            oldest: None,
            newest: None,
            bytes: 0,
            kept: Vec::new(),
            bytes_per_second: None,
        })
        .collect();
    let Some(first) = out.first_mut() else { return out };
    // The first tier is the journal: every record after thinned history is a point.
    if let Some(j) = view.journal_first {
        first.points = view.last.0.saturating_sub(j.0) + 1;
        (first.oldest, first.newest) = (Some(j), Some(view.last));
    }
    first.bytes = view.journal_bytes;
    for f in &view.thinned {
        for p in &f.table.points {
            // In the tier it was kept as, or a coarser one once its age took it there (a point
            // thinned early for room is young but kept as a coarser tier's).
            let Some(t) = tier_of(tiers, now_ns, p.time_ns).map(|t| t.max(usize::from(p.tier)).min(tiers.len() - 1)) else { continue };
            let tier = &mut out[t];
            tier.points += 1;
            tier.oldest = tier.oldest.or(Some((p.seq, p.time_ns)));
            tier.newest = Some((p.seq, p.time_ns));
            tier.kept.push((p.seq, p.time_ns));
        }
        let newest = f.table.points.last().map_or((f.table.run.last_time_ns, 0), |p| (p.time_ns, usize::from(p.tier)));
        let t = tier_of(tiers, now_ns, newest.0).map_or(tiers.len() - 1, |t| t.max(newest.1).min(tiers.len() - 1));
        // Allocated bytes: the blocks of dropped extents are punched out.
        out[t].bytes += std::fs::metadata(&f.data).map_or(f.table.run.segment_len, |m| m.blocks() * 512);
    }
    for t in &mut out {
        if let (Some(o), Some(n)) = (t.oldest, t.newest) {
            let secs = n.1.saturating_sub(o.1) / 1_000_000_000;
            t.bytes_per_second = (secs > 0).then(|| t.bytes / secs);
        }
    }
    out
}
