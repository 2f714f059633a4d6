//! Resolving a range of a volume at a point: each byte from the newest extent at or before
//! the point that covers it, else from the base image (docs/point-index.md, "Resolving a read
//! at point N").

use hindsight_consistency::Seq;

use super::{Extent, Run};

/// Where the bytes of a piece come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The base image, at the same offset.
    Base,
    /// Zeroes (a zero write or a trim).
    Zero,
    /// The segment starting at `segment`, from byte `pos` of its file.
    Journal { segment: Seq, pos: u64 },
}

/// A stretch of the range and where its bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// The sequence numbers a resolution looks at: after the base (whose image holds every record
/// through `after`) and through the point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub after: Seq,
    pub point: Seq,
}

/// The pieces of `[from, to)` of `volume` at `w.point`, in offset order, from `runs` (oldest
/// first, as the journal's segments are); records through `w.after` are in the base image and
/// are left out. Every byte of the range is in exactly one piece.
pub fn resolve(runs: &[&Run], volume: &str, from: u64, to: u64, w: Window) -> Vec<Piece> {
    let point = w.point;
    let mut unfilled = vec![(from, to)];
    let mut pieces = Vec::new();
    for run in runs.iter().rev() {
        if unfilled.is_empty() {
            break;
        }
        if run.first_seq > point {
            continue;
        }
        if run.last_seq <= w.after {
            break;
        }
        let Some(v) = run.volume_number(volume) else { continue };
        let (lo, hi) = (unfilled[0].0, unfilled[unfilled.len() - 1].1);
        let mut candidates = run.candidates(v, lo, hi, point);
        candidates.retain(|e| e.seq > w.after);
        candidates.sort_unstable_by_key(|e| std::cmp::Reverse(e.seq));
        for e in candidates {
            paint(&mut unfilled, &mut pieces, run.first_seq, &e);
            if unfilled.is_empty() {
                break;
            }
        }
    }
    pieces.extend(unfilled.into_iter().map(|(a, b)| Piece { offset: a, len: b - a, source: Source::Base }));
    pieces.sort_unstable_by_key(|p| p.offset);
    debug_assert!(pieces.windows(2).all(|w| w[0].offset + w[0].len == w[1].offset), "pieces leave a gap or overlap");
    pieces
}

/// Fills the parts of `unfilled` (sorted, disjoint) that `e` covers, as pieces.
fn paint(unfilled: &mut Vec<(u64, u64)>, pieces: &mut Vec<Piece>, segment: Seq, e: &Extent) {
    let mut rest = Vec::with_capacity(unfilled.len() + 1);
    for &(a, b) in unfilled.iter() {
        let (s, t) = (a.max(e.offset), b.min(e.end()));
        if s >= t {
            rest.push((a, b));
            continue;
        }
        let source = if e.reads_zero() { Source::Zero } else { Source::Journal { segment, pos: e.data_pos + (s - e.offset) } };
        pieces.push(Piece { offset: s, len: t - s, source });
        if a < s {
            rest.push((a, s));
        }
        if t < b {
            rest.push((t, b));
        }
    }
    *unfilled = rest;
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use hindsight_consistency::WriteKind;
    use rand::{Rng, SeedableRng};

    /// Volume content by byte: (seq, position in the "journal") of the newest write, or none.
    fn model(writes: &[(u64, u32, Seq, bool)], size: u64, point: Seq) -> Vec<Option<(Seq, u64)>> {
        let mut m = vec![None; usize::try_from(size).unwrap()];
        for &(off, len, seq, zero) in writes.iter().filter(|w| w.2 <= point) {
            for i in 0..u64::from(len) {
                m[usize::try_from(off + i).unwrap()] = Some((seq, if zero { u64::MAX } else { seq * 1_000_000 + i }));
            }
        }
        m
    }

    /// What the pieces say each byte is, in the same terms as `model`.
    fn painted(pieces: &[Piece], from: u64, to: u64) -> Vec<Option<(Seq, u64)>> {
        let mut out = Vec::new();
        for p in pieces {
            for i in 0..p.len {
                out.push(match p.source {
                    Source::Base => None,
                    // Which zero write does not matter: zeroes are zeroes.
                    Source::Zero => Some((0, u64::MAX)),
                    Source::Journal { pos, .. } => Some((pos / 1_000_000, pos + i)),
                });
            }
        }
        assert_eq!(out.len() as u64, to - from);
        out
    }

    #[test]
    fn resolved_pieces_equal_a_byte_model_at_every_point() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let size = 16 * 1024;
        for _round in 0..10 {
            let mut writes = Vec::new();
            let mut runs = Vec::new();
            let mut seq = 1;
            for _seg in 0..4 {
                let first = seq;
                let mut extents = Vec::new();
                for _ in 0..rng.gen_range(1..30) {
                    let off = rng.gen_range(0..size - 1);
                    let len = rng.gen_range(1..=(size - off).min(5000));
                    let len = u32::try_from(len).unwrap();
                    let zero = rng.gen_ratio(1, 5);
                    writes.push((off, len, seq, zero));
                    let kind = if zero { WriteKind::Zeroes } else { WriteKind::Data };
                    let data_pos = if zero { 0 } else { seq * 1_000_000 };
                    extents.push(Extent { offset: off, seq, data_pos, length: len, volume: 0, kind });
                    seq += 1;
                }
                runs.push(Run::new(first, seq - 1, 0, vec!["v".into()], extents));
            }
            let refs: Vec<&Run> = runs.iter().collect();
            for point in 0..seq {
                let from = rng.gen_range(0..size);
                let to = rng.gen_range(from + 1..=size);
                let pieces = resolve(&refs, "v", from, to, Window { after: 0, point });
                let want = model(&writes, size, point);
                let got = painted(&pieces, from, to);
                let want = &want[usize::try_from(from).unwrap()..usize::try_from(to).unwrap()];
                // Zero pieces are compared by kind only (which zero write does not matter).
                for (i, (g, w)) in got.iter().zip(want).enumerate() {
                    match (g, w) {
                        (Some((_, u64::MAX)), Some((_, u64::MAX))) | (None, None) => {}
                        _ => assert_eq!(g, w, "byte {} at point {point}", from + i as u64),
                    }
                }
            }
        }
    }

    #[test]
    fn a_range_no_run_covers_comes_from_the_base() {
        let run = Run::new(
            1,
            1,
            0,
            vec!["v".into()],
            vec![Extent { offset: 100, seq: 1, data_pos: 5000, length: 10, volume: 0, kind: WriteKind::Data }],
        );
        let pieces = resolve(&[&run], "v", 0, 200, Window { after: 0, point: 1 });
        assert_eq!(
            pieces,
            vec![
                Piece { offset: 0, len: 100, source: Source::Base },
                Piece { offset: 100, len: 10, source: Source::Journal { segment: 1, pos: 5000 } },
                Piece { offset: 110, len: 90, source: Source::Base },
            ]
        );
        let all_base = vec![Piece { offset: 0, len: 200, source: Source::Base }];
        assert_eq!(resolve(&[&run], "other", 0, 200, Window { after: 0, point: 1 }), all_base);
        assert_eq!(resolve(&[&run], "v", 0, 200, Window { after: 1, point: 1 }), all_base, "seq 1 is in the base already");
    }
}
