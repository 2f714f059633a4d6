//! What the group's unit tests share: records, frames, the image they should make, and
//! groups on a plain, a faulty or a size-limited file system.

use std::sync::Arc;
use std::time::Duration;

use hindsight_consistency::config::{JournalFull, NO_TIERS};
use hindsight_consistency::faults::{FaultPlan, FaultyStorage};
use hindsight_consistency::record::encode_record;
use hindsight_consistency::storage::{StdStorage, Storage};
use hindsight_consistency::time::now_ns;
use hindsight_consistency::{RecordHeader, Seq, WriteKind};

use super::{Group, GroupOptions};
use crate::layout::GroupPaths;
use crate::meta::GroupMeta;
use crate::model::Volume;

pub(super) const SIZE: u64 = 256 << 10;

pub(super) fn us(x: u64) -> usize {
    usize::try_from(x).unwrap()
}

pub(super) fn opts() -> GroupOptions {
    GroupOptions { segment_size: 1 << 20, retention: None, journal_size: None, direct_io: true, tiers: &NO_TIERS }
}

/// Records 1..=n, each a 4 KiB write of its own pattern at an overlapping offset.
pub(super) fn records(n: u64) -> Vec<(RecordHeader, Vec<u8>)> {
    (1..=n)
        .map(|seq| {
            let h = RecordHeader { seq, time_ns: 1_000 + seq, kind: WriteKind::Data, offset: (seq * 7919) % (SIZE - 4096), length: 4096 };
            (h, vec![u8::try_from(seq % 251).unwrap() + 1; 4096])
        })
        .collect()
}

pub(super) fn frame(recs: &[(RecordHeader, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, d) in recs {
        encode_record(h, "v", d, &mut out);
    }
    out
}

pub(super) fn model(recs: &[(RecordHeader, Vec<u8>)], upto: u64) -> Vec<u8> {
    let mut img = vec![0u8; us(SIZE)];
    for (h, d) in recs.iter().filter(|(h, _)| h.seq <= upto) {
        img[us(h.offset)..us(h.offset) + d.len()].copy_from_slice(d);
    }
    img
}

/// A blank image with only the given records written, in the given order.
pub(super) fn apply_some(recs: &[(RecordHeader, Vec<u8>)], seqs: &[u64]) -> Vec<u8> {
    let mut img = vec![0u8; us(SIZE)];
    for &s in seqs {
        let (h, d) = &recs[us(s) - 1];
        img[us(h.offset)..us(h.offset) + d.len()].copy_from_slice(d);
    }
    img
}

/// Waits for the applier to apply everything committed; the seq it reached.
pub(super) fn applied(g: &Group) -> Seq {
    g.with_replicas(|_, seq| seq).unwrap()
}

pub(super) fn new_group(dir: &std::path::Path) -> (Arc<dyn Storage>, GroupPaths, Group) {
    let fs = StdStorage::shared();
    let paths = GroupPaths::new(dir, "g");
    let meta = GroupMeta::new("e".into(), vec![Volume { name: "v".into(), vm: "vm".into(), size: SIZE }]);
    let g = Group::create(Arc::clone(&fs), paths.clone(), "g", meta, opts()).unwrap();
    (fs, paths, g)
}

/// Records 1..=n of 64 KiB each, stamped now.
pub(super) fn big_records(n: u64) -> Vec<(RecordHeader, Vec<u8>)> {
    let t0 = now_ns();
    (1..=n)
        .map(|seq| {
            let h = RecordHeader { seq, time_ns: t0 + seq, kind: WriteKind::Data, offset: (seq * 4096) % (SIZE - 65536), length: 65536 };
            (h, vec![u8::try_from(seq % 251).unwrap() + 1; 65536])
        })
        .collect()
}

pub(super) fn full_group(dir: &std::path::Path, policy: JournalFull) -> (GroupPaths, Group) {
    let paths = GroupPaths::new(dir, "g");
    let opts = GroupOptions {
        segment_size: 1 << 20,
        retention: Some(Duration::from_secs(3600)),
        journal_size: Some(2 << 20),
        direct_io: true,
        tiers: &NO_TIERS,
    };
    let vols = [Volume { name: "v".into(), vm: "vm".into(), size: SIZE }];
    let g = Group::create(StdStorage::shared(), paths.clone(), "g", GroupMeta::new("e".into(), vols.to_vec()), opts).unwrap();
    assert_eq!(g.accept_hello("e", &vols, policy, (0, 0)), Ok(0));
    (paths, g)
}

/// A group on a file system that fails where its plan says.
pub(super) fn faulty_group(dir: &std::path::Path) -> (Arc<FaultPlan>, GroupPaths, Group) {
    let plan = Arc::new(FaultPlan::default());
    let fs: Arc<dyn Storage> = Arc::new(FaultyStorage::new(StdStorage::shared(), Arc::clone(&plan)));
    let paths = GroupPaths::new(dir, "g");
    let meta = GroupMeta::new("e".into(), vec![Volume { name: "v".into(), vm: "vm".into(), size: SIZE }]);
    let g = Group::create(Arc::clone(&fs), paths.clone(), "g", meta, opts()).unwrap();
    (plan, paths, g)
}

/// The replica file of volume "v".
pub(super) fn replica(paths: &GroupPaths) -> Vec<u8> {
    std::fs::read(paths.replica_dir().join("v.img")).unwrap()
}
