//! Which points the tiers keep: every point in an `every = "write"` tier, and in a tier of
//! interval `E` the last consistent point of each interval `[k·E, (k+1)·E)` of record time
//! (docs/retention-tiers.md, "Kept points").

use hindsight_consistency::config::{Every, Tier};
use hindsight_consistency::Seq;

/// A point a tier keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeptPoint {
    pub seq: Seq,
    pub time_ns: u64,
    /// The tier it is in now (by its age).
    pub tier: usize,
}

/// The tier a point of record time `time_ns` is in at `now_ns`; `None` past the last one. A
/// time after `now_ns` (another clock) is of age 0.
pub fn tier_of(tiers: &[Tier], now_ns: u64, time_ns: u64) -> Option<usize> {
    let age = u128::from(now_ns.saturating_sub(time_ns));
    tiers.iter().position(|t| age < t.until.as_nanos())
}

/// The points of `points` (the consistent points of a stretch of history, ascending by
/// sequence number, times never decreasing) that the tiers keep at `now_ns`. The caller adds
/// what is kept whatever the tiers say (bookmarks, pinned points, the base).
///
/// The last point of `points` is kept if it is in a tier: it is the last of its interval as
/// far as anyone can know, so `points` must reach the newest consistent point (a stretch cut
/// short would keep a point its interval's later points make redundant).
pub fn kept_points(tiers: &[Tier], now_ns: u64, points: &[(Seq, u64)]) -> Vec<KeptPoint> {
    let mut kept = Vec::new();
    for (i, &(seq, time_ns)) in points.iter().enumerate() {
        let Some(tier) = tier_of(tiers, now_ns, time_ns) else { continue };
        let keep = match tiers[tier].every {
            Every::Write => true,
            Every::Interval(e) => {
                let e = e.as_nanos();
                points.get(i + 1).is_none_or(|&(_, next)| u128::from(next) / e != u128::from(time_ns) / e)
            }
        };
        if keep {
            kept.push(KeptPoint { seq, time_ns, tier });
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;

    const S: u64 = 1_000_000_000;

    /// Every write for 10 s, one point per 2 s to 60 s, one per 10 s to 120 s.
    fn tiers() -> Vec<Tier> {
        vec![
            Tier { every: Every::Write, until: Duration::from_secs(10) },
            Tier { every: Every::Interval(Duration::from_secs(2)), until: Duration::from_secs(60) },
            Tier { every: Every::Interval(Duration::from_secs(10)), until: Duration::from_secs(120) },
        ]
    }

    /// Points at pseudo-random gaps of 0-700 ms over about 150 s, from time 1,000 s.
    fn points(seed: u64) -> Vec<(Seq, u64)> {
        let mut x = seed | 1;
        let mut t = 1_000 * S;
        (1..=400)
            .map(|seq| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t += (x % 700) * 1_000_000;
                (seq, t)
            })
            .collect()
    }

    #[test]
    fn each_tier_keeps_every_write_or_the_last_point_of_each_interval() {
        let pts = points(7);
        let now = pts.last().unwrap().1 + 5 * S;
        let kept = kept_points(&tiers(), now, &pts);
        let by_seq: BTreeSet<Seq> = kept.iter().map(|k| k.seq).collect();
        for (i, &(seq, t)) in pts.iter().enumerate() {
            let age = now - t;
            let next = pts.get(i + 1).map(|p| p.1);
            let want = if age < 10 * S {
                true
            } else if age < 60 * S {
                next.is_none_or(|n| n / (2 * S) != t / (2 * S))
            } else if age < 120 * S {
                next.is_none_or(|n| n / (10 * S) != t / (10 * S))
            } else {
                false
            };
            assert_eq!(by_seq.contains(&seq), want, "seq {seq} of age {} ms", age / 1_000_000);
        }
        let in_tier = |n| kept.iter().filter(|k| k.tier == n).count();
        assert!(in_tier(0) > 10 && in_tier(1) >= 20 && in_tier(2) >= 4, "{} {} {}", in_tier(0), in_tier(1), in_tier(2));
        assert!(pts.iter().any(|p| now - p.1 >= 120 * S), "some points are past the last tier");
    }

    #[test]
    fn thinning_only_ever_removes_points() {
        for seed in [1, 2, 3, 99, 12345] {
            let pts = points(seed);
            let start = pts.last().unwrap().1;
            let mut before: Option<BTreeSet<Seq>> = None;
            for step in 0..50 {
                let now = start + step * 3 * S + step * 7_777_777;
                let kept: BTreeSet<Seq> = kept_points(&tiers(), now, &pts).iter().map(|k| k.seq).collect();
                if let Some(b) = &before {
                    let new: Vec<&Seq> = kept.difference(b).collect();
                    assert!(new.is_empty(), "seed {seed}: at step {step} points {new:?} came back");
                }
                before = Some(kept);
            }
            assert!(before.unwrap().is_empty(), "seed {seed}: everything ages past the last tier");
        }
    }
}
