//! Which records the kept points still need (docs/retention-tiers.md, "Thinning"): the record
//! of sequence number `s` is needed if some byte it wrote is not written again by a record in
//! `(s, K(s)]`, `K(s)` being the first kept point at or after `s`; otherwise no kept point
//! shows any byte of it.

use std::collections::{BTreeMap, HashMap};

use hindsight_consistency::Seq;

use crate::point_index::Extent;

/// For each of `extents` (any order), whether a kept point still shows some byte of it.
/// `kept` are the kept points up to `horizon`, ascending; every sequence number after
/// `horizon` is a point (the first tier). `extents` must hold every extent of the records
/// from the first of them through `horizon + 1`.
pub fn needed(extents: &[Extent], kept: &[Seq], horizon: Seq) -> Vec<bool> {
    debug_assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept.last().is_none_or(|&k| k <= horizon));
    // The first kept point at or after `s`.
    let point_of = |s: Seq| -> Seq {
        if s > horizon {
            return s;
        }
        kept.get(kept.partition_point(|&k| k < s)).copied().unwrap_or(horizon + 1)
    };
    let mut order: Vec<usize> = (0..extents.len()).collect();
    order.sort_unstable_by_key(|&i| std::cmp::Reverse(extents[i].seq));
    let mut out = vec![false; extents.len()];
    let mut painted: HashMap<u16, Painted> = HashMap::new();
    let mut bucket = None;
    for i in order {
        let e = &extents[i];
        let point = point_of(e.seq);
        if bucket != Some(point) {
            // Newer records of another point's stretch hide nothing from this one.
            painted.clear();
            bucket = Some(point);
        }
        let p = painted.entry(e.volume).or_default();
        if !p.covers(e.offset, e.end()) {
            out[i] = true;
            p.paint(e.offset, e.end());
        }
    }
    out
}

/// Disjoint, non-adjacent byte ranges of a volume, by start.
#[derive(Default)]
struct Painted(BTreeMap<u64, u64>);

impl Painted {
    fn covers(&self, from: u64, to: u64) -> bool {
        self.0.range(..=from).next_back().is_some_and(|(_, &end)| end >= to)
    }

    fn paint(&mut self, mut from: u64, mut to: u64) {
        if let Some((&s, &e)) = self.0.range(..=from).next_back() {
            if e >= from {
                from = s;
                to = to.max(e);
            }
        }
        let inside: Vec<u64> = self.0.range(from..=to).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.0.remove(&s).expect("listed");
            to = to.max(e);
        }
        self.0.insert(from, to);
    }
}

#[cfg(test)]
mod tests {
    use hindsight_consistency::WriteKind;

    use super::*;

    const BLOCKS: u64 = 64;

    fn rng(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Records 1..=n on two volumes: one to eight 512-byte blocks each, some of them zeroes.
    fn extents(seed: u64, n: u64) -> Vec<Extent> {
        let mut x = seed | 1;
        (1..=n)
            .map(|seq| {
                let blocks = 1 + rng(&mut x) % 8;
                let offset = rng(&mut x) % (BLOCKS - blocks) * 512;
                let kind = if rng(&mut x).is_multiple_of(7) { WriteKind::Zeroes } else { WriteKind::Data };
                let volume = u16::from(rng(&mut x).is_multiple_of(3));
                Extent { offset, seq, data_pos: 0, length: u32::try_from(blocks * 512).unwrap(), volume, kind }
            })
            .collect()
    }

    /// Each 512-byte block of a volume at `point`: the seq of the record it shows (0: base).
    fn image(extents: &[Extent], keep: &[bool], volume: u16, point: Seq) -> Vec<Seq> {
        let mut img = vec![0; usize::try_from(BLOCKS).unwrap()];
        let mut by_seq: Vec<(usize, &Extent)> = extents.iter().enumerate().filter(|(i, e)| keep[*i] && e.volume == volume).collect();
        by_seq.sort_by_key(|(_, e)| e.seq);
        for (_, e) in by_seq.into_iter().filter(|(_, e)| e.seq <= point) {
            for b in e.offset / 512..e.end() / 512 {
                img[usize::try_from(b).unwrap()] = e.seq;
            }
        }
        img
    }

    #[test]
    fn every_kept_point_shows_the_same_bytes_from_the_survivors_alone() {
        for seed in [1, 5, 42, 777, 2026] {
            let exts = extents(seed, 400);
            let mut x = seed;
            let horizon = 300;
            let kept: Vec<Seq> = (1..=horizon).filter(|_| rng(&mut x).is_multiple_of(25)).collect();
            let keep = needed(&exts, &kept, horizon);
            let all = vec![true; exts.len()];
            let points = kept.iter().copied().chain(horizon + 1..=400);
            for point in points {
                for volume in [0, 1] {
                    assert_eq!(image(&exts, &keep, volume, point), image(&exts, &all, volume, point), "seed {seed}: point {point}");
                }
            }
            let dropped = keep.iter().filter(|k| !**k).count();
            assert!(dropped > 40, "seed {seed}: only {dropped} of 400 records dropped");
            assert!(keep[usize::try_from(horizon).unwrap()..].iter().all(|k| *k), "seed {seed}: the first tier keeps every record");
        }
    }

    #[test]
    fn a_record_is_dropped_only_when_newer_ones_before_its_point_cover_it_whole() {
        let e = |seq, offset, length| Extent { offset, seq, data_pos: 0, length, volume: 0, kind: WriteKind::Data };
        // 1 is covered by 2 and 3 together before point 3; 4 is covered only after point 4.
        let exts = [e(1, 0, 8192), e(2, 0, 4096), e(3, 4096, 4096), e(4, 0, 4096), e(5, 0, 8192)];
        assert_eq!(needed(&exts, &[3, 4], 4), [false, true, true, true, true]);
        assert_eq!(needed(&exts, &[1, 3], 4), [true, true, true, false, true], "4 is hidden by 5, the first point after it");
        assert_eq!(needed(&exts, &[], 0), [true; 5], "with every record a point nothing is dropped");
    }
}
