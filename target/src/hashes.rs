//! Region hashes of a replica, for an engine comparing an initial sync
//! (docs/wire-protocol.md, "Sessions", item 6; docs/consistency.md says why the prefix makes it exact).
//!
//! ```text
//! engine → target:  TargetHashRequest { id | volume | region_shift | regions | through_seq }
//! target → engine:  TargetHashReply   { id | status | seq | hashes | message }   (HashReply)
//! ```
//!
//! The connection thread answers between two batches of records, once the group's applier has
//! applied every record received before the request, holding the replicas while it reads
//! (the applier holds them for a whole batch): the hashes are of the replicas at exactly the
//! prefix `seq`.

use hindsight_consistency::region_hash::{region_hash, zero_hash, MAX_HASH_REGIONS};
use hindsight_consistency::wire::{HashReply, HashStatus, TargetHashRequest};

use crate::group::Group;

/// Smallest and largest region sizes accepted (512 bytes to 64 MiB, as powers of two).
const REGION_SHIFTS: std::ops::RangeInclusive<u8> = 9..=26;

/// Answers a hash request: the hashes, or why they cannot be given (never a guess).
pub(crate) fn answer(group: &Group, req: &TargetHashRequest) -> HashReply {
    let id = req.id;
    if req.regions.is_empty() || req.regions.len() > MAX_HASH_REGIONS {
        return HashReply::unavailable(id, format!("a hash request names 1 to {MAX_HASH_REGIONS} regions, not {}", req.regions.len()));
    }
    if !REGION_SHIFTS.contains(&req.region_shift) {
        return HashReply::unavailable(id, format!("region_shift {} is not supported", req.region_shift));
    }
    let region = 1u64 << req.region_shift;
    let hashed = group.with_replicas(|replicas, seq| {
        let Some(img) = replicas.image(&req.volume) else {
            return HashReply::unavailable(id, format!("group {:?} has no volume {:?} here", group.name, req.volume));
        };
        if seq < req.through_seq {
            // The engine sends the request only after the records; this would be a bug there.
            return HashReply::unavailable(id, format!("the replica holds seq {seq}, the request needs seq {}", req.through_seq));
        }
        let mut buf = vec![0u8; usize::try_from(region).expect("region of at most 64 MiB")];
        let mut hashes = Vec::with_capacity(req.regions.len());
        for &r in &req.regions {
            let Some(start) = r.checked_mul(region).filter(|&s| s < img.size) else {
                return HashReply::unavailable(id, format!("region {r} lies past the end of volume {:?} ({} bytes)", req.volume, img.size));
            };
            let end = (start + region).min(img.size);
            let part = &mut buf[..usize::try_from(end - start).expect("within the region")];
            if !img.file.may_hold_data(start, end) {
                // A hole, or space reserved and never written: zeroes, without reading.
                hashes.push(zero_hash(part.len()));
                continue;
            }
            if let Err(e) = img.file.read_exact_at(part, start) {
                log::warn!("group {:?}: reading region {r} of the replica of {:?} to hash it: {e}", group.name, req.volume);
                return HashReply::unavailable(id, format!("reading the replica of {:?} failed: {e}", req.volume));
            }
            // A sweep reads the whole replica once: its pages are not kept (a page cache full
            // of them slowed the writes that follow by a third).
            img.file.drop_cached(start, end - start);
            hashes.push(region_hash(part));
        }
        HashReply { id, status: HashStatus::Ok, seq, hashes, message: String::new() }
    });
    hashed.unwrap_or_else(|why| HashReply::unavailable(id, why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::GroupOptions;
    use crate::layout::GroupPaths;
    use crate::meta::GroupMeta;
    use crate::model::Volume;
    use hindsight_consistency::record::{encode_record, RecordHeader};
    use hindsight_consistency::region_hash::zero_hash;
    use hindsight_consistency::storage::StdStorage;
    use hindsight_consistency::WriteKind;

    const MIB: u64 = 1 << 20;

    fn request(regions: Vec<u64>, through_seq: u64) -> TargetHashRequest {
        TargetHashRequest { id: 3, volume: "v".into(), region_shift: 20, regions, through_seq }
    }

    fn test_opts() -> GroupOptions {
        GroupOptions {
            segment_size: 64 << 20,
            retention: None,
            journal_size: None,
            direct_io: true,
            tiers: &hindsight_consistency::config::NO_TIERS,
        }
    }

    #[test]
    fn hashes_are_of_the_replica_at_the_applied_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let vol = Volume { name: "v".into(), vm: "vm".into(), size: 3 * MIB + 100 };
        let opts = test_opts();
        let paths = GroupPaths::new(dir.path(), "g");
        let g = Group::create(StdStorage::shared(), paths, "g", GroupMeta::new("e".into(), vec![vol]), opts).unwrap();
        let full = zero_hash(1 << 20);
        // A blank replica; the last region is 100 bytes.
        let r = answer(&g, &request(vec![0, 1, 2, 3], 0));
        assert_eq!((r.id, r.status, r.seq), (3, HashStatus::Ok, 0), "{}", r.message);
        assert_eq!(r.hashes, vec![full, full, full, zero_hash(100)]);

        let mut frame = Vec::new();
        let h = RecordHeader { seq: 1, time_ns: 1, kind: WriteKind::Data, offset: MIB + 10, length: 4 };
        encode_record(&h, "v", b"abcd", &mut frame);
        assert!(g.receive(&mut vec![frame]).error.is_none());
        let mut region = vec![0u8; 1 << 20];
        region[10..14].copy_from_slice(b"abcd");
        let r = answer(&g, &request(vec![1, 0], 1));
        assert_eq!((r.status, r.seq), (HashStatus::Ok, 1), "{}", r.message);
        assert_eq!(r.hashes, vec![region_hash(&region), full]);
    }

    #[test]
    fn what_cannot_be_hashed_is_unavailable_never_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let vol = Volume { name: "v".into(), vm: "vm".into(), size: 2 * MIB };
        let opts = test_opts();
        let g = Group::create(StdStorage::shared(), GroupPaths::new(dir.path(), "g"), "g", GroupMeta::new("e".into(), vec![vol]), opts)
            .unwrap();
        let unavailable = |req: TargetHashRequest| {
            let r = answer(&g, &req);
            assert_eq!((r.status, r.hashes.len()), (HashStatus::Unavailable, 0), "{req:?}");
            r.message
        };
        assert!(unavailable(request(vec![0], 5)).contains("holds seq 0"));
        assert!(unavailable(request(vec![2], 0)).contains("past the end"));
        assert!(unavailable(request(vec![u64::MAX], 0)).contains("past the end"));
        assert!(unavailable(request(vec![], 0)).contains("1 to"));
        assert!(unavailable(request(vec![0; MAX_HASH_REGIONS + 1], 0)).contains("1 to"));
        assert!(unavailable(TargetHashRequest { region_shift: 63, ..request(vec![0], 0) }).contains("region_shift"));
        assert!(unavailable(TargetHashRequest { volume: "w".into(), ..request(vec![0], 0) }).contains("no volume"));
    }
}
