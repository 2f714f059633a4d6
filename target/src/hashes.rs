//! Region hashes of a replica, for an engine comparing an initial sync
//! (docs/wire-protocol.md, session 6; docs/consistency.md says why the prefix makes it exact).
//!
//! ```text
//! engine → target:  TargetHashRequest { id | volume | region_shift | regions | through_seq }
//! target → engine:  TargetHashReply   { id | status | seq | hashes | message }   (HashReply)
//! ```
//!
//! The connection thread answers between two batches of records, holding the group's `inner`
//! lock while it reads: the hashes are of the replicas at exactly the prefix `seq`.

use hindsight_consistency::region_hash::{region_hash, MAX_HASH_REGIONS};
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
            if let Err(e) = img.file.read_exact_at(part, start) {
                log::warn!("group {:?}: reading region {r} of the replica of {:?} to hash it: {e}", group.name, req.volume);
                return HashReply::unavailable(id, format!("reading the replica of {:?} failed: {e}", req.volume));
            }
            hashes.push(region_hash(part));
        }
        HashReply { id, status: HashStatus::Ok, seq, hashes, message: String::new() }
    });
    hashed.unwrap_or_else(|why| HashReply::unavailable(id, why))
}
