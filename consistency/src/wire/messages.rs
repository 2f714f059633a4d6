//! Message bodies. Handshake and error messages are postcard-encoded structs; the data path
//! (`Write`, `WriteAck`, `Confirm`) is hand-encoded little-endian.
//!
//! ```text
//! Write:    { req_id:u64 | offset:u64 | length:u32 | disk:u16 | kind:u8 | flags:u8 | data }
//! WriteAck: { req_id:u64 | seq:u64 | status:u32 | reserved:u32 }
//! Confirm:  { durable_seq:u64 }
//! ```

use serde::{Deserialize, Serialize};

use super::frame::FrameError;
use crate::record::{read_u32, read_u64, Seq, WriteKind, MAX_WRITE_LEN};

/// Agent → engine: who the agent is and which disks it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    /// Protocol version of the agent.
    pub protocol: u16,
    /// The VM the agent runs in.
    pub vm: String,
    /// The disks; a disk's index here is its number in `Write`.
    pub disks: Vec<DiskHello>,
}

/// One disk of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHello {
    /// Consistency group.
    pub group: String,
    /// Volume name in the group.
    pub volume: String,
    /// Size of the local disk in bytes.
    pub size: u64,
}

/// Engine → agent: accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentWelcome {
    /// Protocol version of the engine.
    pub protocol: u16,
    /// The engine's name (its listen address) for logs.
    pub engine: String,
    /// Disk numbers of the hello to resync whole (every region the agent still has marked):
    /// their group was taken over by this engine from one that may have acknowledged writes
    /// the target lacks (docs/ha.md, "Takeover").
    pub resync: Vec<u16>,
}

/// Engine → agent: the target holds every record of the group of `disks` through `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetConfirmedMsg {
    /// Disk numbers of the hello, all of one group.
    pub disks: Vec<u16>,
    /// The group's confirmed sequence number.
    pub seq: u64,
}

/// Either direction: a fatal error; the sender closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong and what to do.
    pub message: String,
}

/// Engine → target: opens the shipping session of one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHello {
    /// Protocol version of the engine.
    pub protocol: u16,
    /// The engine's name.
    pub engine: String,
    /// The group shipped on this connection.
    pub group: String,
    /// The group's volumes.
    pub volumes: Vec<VolumeInfo>,
    /// Compressions the engine can send, best first (`["lz4"]`, or empty for none).
    pub compression: Vec<String>,
    /// The group's `on_journal_full` policy: `trim_history`, `block` or `pause_and_track`.
    pub on_journal_full: String,
    /// The group's epoch as the engine knows it (engine.toml, 0 by default); the target refuses
    /// any other than its own (docs/failover.md).
    pub epoch: u64,
    /// The engine's ownership token of the group (docs/ha.md, "Fencing"): 0 without
    /// `[cluster]`. The target refuses a token smaller than the largest it has accepted.
    pub owner: u64,
}

/// Engine → agent, instead of `AgentWelcome`: this engine does not own `group` (docs/ha.md,
/// "Agents follow the owner"); its owner takes agents at `engine` (empty while none is known).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectMsg {
    /// The group.
    pub group: String,
    /// The owner's address, `host:port`, or empty.
    pub engine: String,
    /// Why, for the log.
    pub message: String,
}

/// Target → engine: the target's journal is full, or history inside retention was trimmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalStateMsg {
    /// The target took nothing of the last batch and closes the connection.
    pub full: bool,
    /// Points younger than the retention were folded into the base images.
    pub trimmed: bool,
    /// Bytes the group's journal holds.
    pub journal_bytes: u64,
    /// The target's `journal_size` (0: none).
    pub journal_size: u64,
    /// Time of the oldest point the target can recover (0: unknown).
    pub first_time_ns: u64,
    /// The target's `retention`, seconds (0: none).
    pub retention_s: u64,
}

/// A volume of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume name.
    pub name: String,
    /// VM the volume belongs to.
    pub vm: String,
    /// Size in bytes.
    pub size: u64,
}

/// Target → engine: where to resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetWelcome {
    /// Protocol version of the target.
    pub protocol: u16,
    /// Last sequence number durable in the target's journal (0: none).
    pub durable_seq: Seq,
    /// The compression the target accepts from the offer (`""`: none).
    pub compression: String,
}

/// Operator → engine: place a bookmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkRequest {
    /// Protocol version of the client.
    pub protocol: u16,
    /// The bookmark's name.
    pub name: String,
    /// The groups to place it in, all at the same instant; empty: every group.
    pub groups: Vec<String>,
    /// A note kept with the bookmark.
    pub note: String,
    /// Quiesce every agent of the groups first (application-consistent point).
    pub quiesce: bool,
    /// How long agents may take to quiesce, in ms; past it the point is crash-consistent.
    pub quiesce_timeout_ms: u64,
    /// Hand the groups over (a planned failover): after the bookmark the engine numbers and
    /// acknowledges no more writes of them until it is restarted. Operators only.
    pub hold: bool,
}

/// Engine → operator: where the bookmark was placed, per group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkReply {
    /// One entry per group.
    pub points: Vec<BookmarkPoint>,
}

/// A bookmark placed in one group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkPoint {
    /// The group.
    pub group: String,
    /// The bookmark record's sequence number: the point is every write before it.
    pub seq: Seq,
    /// Its engine time, ns since the Unix epoch.
    pub time_ns: u64,
    /// `crash-consistent` or `app-consistent`.
    pub consistency: String,
    /// Why a quiesced bookmark is only crash-consistent (empty otherwise).
    pub reason: String,
}

/// Engine → agent: freeze the VM's file systems, then answer `Quiesced`; thaw on `Thaw`, or by
/// yourself after `timeout_ms` plus a margin (a guest must never stay frozen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceMsg {
    /// Identifies this quiesce.
    pub id: u64,
    /// How long the engine waits for the answer.
    pub timeout_ms: u64,
}

/// Agent → engine: the VM is quiesced (`ok`), or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiescedMsg {
    /// The quiesce answered.
    pub id: u64,
    /// True when every file system is frozen.
    pub ok: bool,
    /// What failed, when not ok.
    pub message: String,
}

/// Engine → agent: thaw what quiesce `id` froze.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawMsg {
    /// The quiesce to end.
    pub id: u64,
}

/// Agent → engine: every dirty region of these disks has been re-sent (as resync writes,
/// kind 7) and acknowledged; the engine places a resync point in each of their groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncDoneMsg {
    /// Disk numbers of the hello whose resync completed.
    pub disks: Vec<u16>,
}

/// Agent → engine: how far the resync (or initial sync) of one disk has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgressMsg {
    /// Disk number of the hello.
    pub disk: u16,
    /// Regions re-sent and acknowledged.
    pub done: u64,
    /// Regions to re-send in this resync.
    pub total: u64,
    /// Bytes per second so far (compared bytes during a compare sweep).
    pub bytes_per_s: u64,
    /// Regions the compare sweep compares (0: no sweep, every region is re-sent).
    pub compare_total: u64,
    /// Regions compared so far.
    pub compared: u64,
    /// Regions found to differ (and sent) so far.
    pub differ: u64,
}

/// One volume's resync, as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// The volume.
    pub volume: String,
    /// Regions re-sent and acknowledged.
    pub done: u64,
    /// Regions in this resync.
    pub total: u64,
    /// Bytes per second so far.
    pub bytes_per_s: u64,
    /// Seconds left at that rate (0 when unknown).
    pub eta_s: u64,
    /// Regions the compare sweep compares (0: no sweep).
    pub compare_total: u64,
    /// Regions compared so far.
    pub compared: u64,
    /// Regions found to differ (and sent) so far.
    pub differ: u64,
}

/// Agent → engine: the replica's hashes of some regions of a disk, please.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRequest {
    /// Chosen by the agent, echoed in the reply.
    pub id: u64,
    /// Disk number of the hello.
    pub disk: u16,
    /// Regions are `1 << region_shift` bytes (20 in version 1).
    pub region_shift: u8,
    /// The regions, at most [`crate::region_hash::MAX_HASH_REGIONS`].
    pub regions: Vec<u64>,
}

/// Engine → target: the replica's hashes of some regions of a volume, at a prefix of the
/// sequence that holds every record through `through_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHashRequest {
    /// Chosen by the engine, echoed in the reply.
    pub id: u64,
    /// The volume.
    pub volume: String,
    /// Regions are `1 << region_shift` bytes.
    pub region_shift: u8,
    /// The regions, at most [`crate::region_hash::MAX_HASH_REGIONS`].
    pub regions: Vec<u64>,
    /// The hashed prefix must hold every record up to here.
    pub through_seq: u64,
}

/// Whether a hash request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashStatus {
    /// `hashes` holds one hash per region asked for.
    Ok,
    /// No hashes: the target cannot answer now (`message` says why); ask again later.
    Unavailable,
}

/// Target → engine (`TargetHashReply`) and engine → agent (`HashReply`): the hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashReply {
    /// The request's id.
    pub id: u64,
    /// Answered or not.
    pub status: HashStatus,
    /// The last record the replica held when it was hashed.
    pub seq: u64,
    /// The BLAKE3 hash of each region, in the order asked.
    pub hashes: Vec<[u8; 32]>,
    /// Why not, when unavailable.
    pub message: String,
}

impl HashReply {
    /// An unavailable answer to request `id`.
    pub fn unavailable(id: u64, message: impl Into<String>) -> HashReply {
        HashReply { id, status: HashStatus::Unavailable, seq: 0, hashes: Vec::new(), message: message.into() }
    }
}

/// Operator → engine: the state of every group (or of the named ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Protocol version of the operator's tool.
    pub protocol: u16,
    /// Groups to report; empty for all.
    pub groups: Vec<String>,
}

/// Engine → operator: the state of its groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The engine's name.
    pub engine: String,
    /// One entry per group, by name.
    pub groups: Vec<GroupStatus>,
    /// The engine cluster as this engine sees it (`[cluster]`, docs/ha.md), if it is in one.
    pub cluster: Option<ClusterStatus>,
}

/// An engine cluster: the live engines, who owns each group and the latest change of owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The site (the etcd key prefix).
    pub site: String,
    /// This engine's name in the cluster.
    pub name: String,
    /// Whether this engine's lease is valid by its clock (it acknowledges writes).
    pub lease_valid: bool,
    /// Why etcd could not be read at the last try, or empty.
    pub etcd_error: String,
    /// The live engines: (name, address).
    pub engines: Vec<(String, String)>,
    /// Each group's owner.
    pub owners: Vec<GroupOwner>,
    /// Live engines whose group definitions differ from this engine's.
    pub disagree: Vec<String>,
}

/// Who owns a group, and its latest change of owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupOwner {
    pub group: String,
    /// The owner's name, empty while nobody owns the group.
    pub engine: String,
    pub address: String,
    /// The ownership token (the owner key's create revision).
    pub token: u64,
    /// The latest change: from which engine, why, when (RFC 3339); empty if none is known.
    pub changed_from: String,
    pub why: String,
    pub time: String,
}

/// One group's replication state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// The group.
    pub name: String,
    /// The mode configured (or last set).
    pub mode: String,
    /// The mode in force now: differs from `mode` while a sync group is degraded.
    pub effective_mode: String,
    /// Why the effective mode differs, or what last changed it.
    pub reason: String,
    /// `block` or `degrade`.
    pub on_sync_loss: String,
    /// The target address.
    pub target: String,
    /// True while a shipping connection to the target is up.
    pub target_connected: bool,
    /// Last sequence number durable in the engine's journal.
    pub durable_seq: u64,
    /// Last sequence number the target confirmed durable.
    pub confirmed_seq: u64,
    /// Records the target does not hold yet.
    pub lag_writes: u64,
    /// Bytes of data the target does not hold yet.
    pub lag_bytes: u64,
    /// Age of the oldest record the target does not hold, ms (0 when caught up).
    pub lag_ms: u64,
    /// The RPO, ms (0: none configured).
    pub rpo_ms: u64,
    /// False while the lag exceeds the RPO (the alert state).
    pub rpo_ok: bool,
    /// True when acknowledgements are being slowed to keep the lag inside the RPO.
    pub regulating: bool,
    /// True when the journal failed and the group takes no writes.
    pub poisoned: bool,
    /// Compression of the link to the target (`lz4`, or `""`).
    pub compression: String,
    /// Record bytes shipped to the target since the engine started.
    pub shipped_bytes: u64,
    /// Bytes sent on the wire for them (frames, after compression).
    pub wire_bytes: u64,
    /// Volumes being resynced by their agent (after a cut, a crash, or the initial sync).
    pub resyncing: Vec<ResyncStatus>,
    /// Volumes whose agent is connected.
    pub attached: Vec<String>,
    /// The group's `on_journal_full` policy.
    pub on_journal_full: String,
    /// Bytes in the engine's journal of the group.
    pub journal_bytes: u64,
    /// The group's `journal_size` at the engine (0: none).
    pub journal_size: u64,
    /// True while the group is paused because a journal is full: the agents track.
    pub paused: bool,
    /// What a full journal (the engine's or the target's) is doing to the group, in words
    /// (empty when nothing is full).
    pub journal_state: String,
    /// The group is held after a bookmark for a planned failover: writes wait.
    pub handed_over: bool,
    /// What the target said when it last refused the group ("" when it did not).
    pub target_refused: String,
    /// This engine's part in the group's ownership (clustered engines): `owner`, `claimed`,
    /// `draining`, `elsewhere`; empty without a cluster.
    pub ownership: String,
}

/// Operator → engine: set a group's mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetModeRequest {
    /// Protocol version of the operator's tool.
    pub protocol: u16,
    /// The group.
    pub group: String,
    /// `sync`, `cdp` or `async`.
    pub mode: String,
}

/// Engine → operator: the mode changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetModeReply {
    /// The group.
    pub group: String,
    /// The mode before.
    pub previous: String,
    /// The mode now.
    pub mode: String,
}

/// Encodes a postcard message.
pub fn encode_message<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("postcard encoding of an in-memory message cannot fail")
}

/// Decodes a postcard message; `what` names it in errors.
pub fn decode_message<'a, T: Deserialize<'a>>(what: &'static str, payload: &'a [u8]) -> Result<T, FrameError> {
    postcard::from_bytes(payload).map_err(|e| FrameError::BadMessage { what, reason: e.to_string() })
}

/// Fixed part of a `Write` message.
pub const WRITE_HEADER_LEN: usize = 24;

/// The fixed fields of a `Write` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMsg {
    /// Agent-chosen id echoed in the ack.
    pub req_id: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes covered.
    pub length: u32,
    /// Index of the disk in the agent's hello.
    pub disk: u16,
    /// What the write does.
    pub kind: WriteKind,
}

impl WriteMsg {
    /// Encodes the fixed part.
    pub fn encode_header(&self) -> [u8; WRITE_HEADER_LEN] {
        let mut b = [0u8; WRITE_HEADER_LEN];
        b[0..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..22].copy_from_slice(&self.disk.to_le_bytes());
        b[22] = self.kind.code();
        b[23] = 0;
        b
    }

    /// Decodes a whole `Write` payload: the fixed part and the data that follows it.
    pub fn decode(payload: &[u8]) -> Result<(WriteMsg, &[u8]), FrameError> {
        let bad = |reason: &str| FrameError::BadMessage { what: "Write", reason: reason.to_owned() };
        if payload.len() < WRITE_HEADER_LEN {
            return Err(bad("shorter than its header"));
        }
        let kind = match WriteKind::from_code(payload[22]) {
            Some(k) if k.from_agent() => k,
            Some(_) => return Err(bad("bookmarks, points and superseded records come from the engine, not from agents")),
            None => return Err(bad("unknown kind")),
        };
        if payload[23] != 0 {
            return Err(bad("unknown flags"));
        }
        let msg = WriteMsg {
            req_id: read_u64(payload, 0),
            offset: read_u64(payload, 8),
            length: read_u32(payload, 16),
            disk: u16::from_le_bytes([payload[20], payload[21]]),
            kind,
        };
        if msg.length == 0 || msg.length > MAX_WRITE_LEN {
            return Err(bad("length out of range"));
        }
        let data = &payload[WRITE_HEADER_LEN..];
        let want = if kind.carries_data() { msg.length as usize } else { 0 };
        if data.len() != want {
            return Err(bad("data length does not match kind and length"));
        }
        Ok((msg, data))
    }
}

/// Size of a `WriteAck` message.
pub const WRITE_ACK_LEN: usize = 24;

/// The engine's answer to one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// The write's id.
    pub req_id: u64,
    /// Its group sequence number (0 on error).
    pub seq: Seq,
    /// [`WriteAck::OK`], else an errno value ([`WriteAck::EIO`], [`WriteAck::EINVAL`],
    /// [`WriteAck::ENOSPC`]).
    pub status: u32,
}

impl WriteAck {
    /// Status: the write is journaled under `seq`.
    pub const OK: u32 = 0;
    /// Status: the group cannot take writes (it stopped, or the engine is shutting down).
    pub const EIO: u32 = 5;
    /// Status: the write names an unknown disk or reaches past the end of its volume.
    pub const EINVAL: u32 = 22;
    /// Status: the group is paused because a journal is full; the write was not journaled,
    /// and the agent tracks its regions for a resync.
    pub const ENOSPC: u32 = 28;

    /// Encodes the message.
    pub fn encode(&self) -> [u8; WRITE_ACK_LEN] {
        let mut b = [0u8; WRITE_ACK_LEN];
        b[0..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    /// Decodes the message.
    pub fn decode(p: &[u8]) -> Result<WriteAck, FrameError> {
        if p.len() != WRITE_ACK_LEN {
            return Err(FrameError::BadMessage { what: "WriteAck", reason: format!("length {} != {WRITE_ACK_LEN}", p.len()) });
        }
        Ok(WriteAck { req_id: read_u64(p, 0), seq: read_u64(p, 8), status: read_u32(p, 16) })
    }
}

/// Encodes a `Confirm` message.
pub fn encode_confirm(durable_seq: Seq) -> [u8; 8] {
    durable_seq.to_le_bytes()
}

/// Decodes a `Confirm` message.
pub fn decode_confirm(p: &[u8]) -> Result<Seq, FrameError> {
    if p.len() != 8 {
        return Err(FrameError::BadMessage { what: "Confirm", reason: format!("length {} != 8", p.len()) });
    }
    Ok(read_u64(p, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_round_trip_and_truncations() {
        let m = WriteMsg { req_id: 9, offset: 4096, length: 8, disk: 2, kind: WriteKind::Data };
        let mut p = m.encode_header().to_vec();
        p.extend_from_slice(b"abcdefgh");
        let (got, data) = WriteMsg::decode(&p).unwrap();
        assert_eq!(got, m);
        assert_eq!(data, b"abcdefgh");
        for cut in 0..p.len() {
            assert!(WriteMsg::decode(&p[..cut]).is_err());
        }
    }

    #[test]
    fn write_zeroes_must_carry_no_data() {
        let m = WriteMsg { req_id: 1, offset: 0, length: 4096, disk: 0, kind: WriteKind::Zeroes };
        let mut p = m.encode_header().to_vec();
        assert!(WriteMsg::decode(&p).is_ok());
        p.push(0);
        assert!(WriteMsg::decode(&p).is_err());
    }

    #[test]
    fn agents_may_send_resync_writes_but_no_engine_kinds() {
        let m = WriteMsg { req_id: 3, offset: 8192, length: 4, disk: 1, kind: WriteKind::Resync };
        let mut p = m.encode_header().to_vec();
        assert_eq!(p[22], 7);
        assert!(WriteMsg::decode(&p).is_err(), "a resync write carries its data");
        p.extend_from_slice(b"wxyz");
        let (got, data) = WriteMsg::decode(&p).unwrap();
        assert_eq!((got, data), (m, &b"wxyz"[..]));
        for code in [4u8, 5, 6] {
            let mut q = p.clone();
            q[22] = code;
            let e = WriteMsg::decode(&q).unwrap_err().to_string();
            assert!(e.contains("come from the engine"), "kind {code}: {e}");
        }
        let mut q = p.clone();
        q[22] = 8;
        assert!(WriteMsg::decode(&q).unwrap_err().to_string().contains("unknown kind"));
    }

    #[test]
    fn resync_done_round_trip() {
        let m = ResyncDoneMsg { disks: vec![0, 2, 65535] };
        let b = encode_message(&m);
        assert_eq!(decode_message::<ResyncDoneMsg>("ResyncDone", &b).unwrap(), m);
        assert!(decode_message::<ResyncDoneMsg>("ResyncDone", &b[..b.len() - 1]).is_err());
    }

    fn hash_reply() -> HashReply {
        HashReply { id: 7, status: HashStatus::Ok, seq: 1234, hashes: vec![[0xab; 32], [0; 32], [0xff; 32]], message: String::new() }
    }

    #[test]
    fn hash_messages_round_trip() {
        let q = HashRequest { id: u64::MAX, disk: 3, region_shift: 20, regions: vec![0, 1, 2, 1 << 40] };
        let b = encode_message(&q);
        assert_eq!(decode_message::<HashRequest>("HashRequest", &b).unwrap(), q);
        let t = TargetHashRequest { id: 9, volume: "db".into(), region_shift: 20, regions: (0..64).collect(), through_seq: 77 };
        let b = encode_message(&t);
        assert_eq!(decode_message::<TargetHashRequest>("TargetHashRequest", &b).unwrap(), t);
        let r = hash_reply();
        let b = encode_message(&r);
        // A hash is 32 raw bytes on the wire, not 32 varints.
        assert!(b.len() < 3 * 32 + 16, "{} bytes", b.len());
        assert_eq!(decode_message::<HashReply>("HashReply", &b).unwrap(), r);
        let u = HashReply::unavailable(8, "the target is not connected");
        assert_eq!(decode_message::<HashReply>("HashReply", &encode_message(&u)).unwrap(), u);
    }

    #[test]
    fn truncated_hash_messages_are_errors() {
        let r = encode_message(&hash_reply());
        for cut in 0..r.len() {
            assert!(decode_message::<HashReply>("HashReply", &r[..cut]).is_err(), "cut {cut}");
        }
        let q = encode_message(&HashRequest { id: 1, disk: 0, region_shift: 20, regions: vec![5, 6, 300] });
        for cut in 0..q.len() {
            assert!(decode_message::<HashRequest>("HashRequest", &q[..cut]).is_err(), "cut {cut}");
        }
        let t = encode_message(&TargetHashRequest { id: 1, volume: "v".into(), region_shift: 20, regions: vec![1], through_seq: 3 });
        for cut in 0..t.len() {
            assert!(decode_message::<TargetHashRequest>("TargetHashRequest", &t[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn garbage_hash_messages_are_errors_not_panics() {
        // An unknown status, a region count far beyond the bytes, random bytes.
        let mut bad_status = encode_message(&hash_reply());
        bad_status[1] = 9;
        let e = decode_message::<HashReply>("HashReply", &bad_status).unwrap_err();
        assert!(matches!(e, FrameError::BadMessage { what: "HashReply", .. }), "{e}");
        let huge = [1u8, 0, 20, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(decode_message::<HashRequest>("HashRequest", &huge).is_err());
        let mut x: u32 = 0x9e37_79b9;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x.to_le_bytes()[0]
                })
                .collect();
            let _ = decode_message::<HashReply>("HashReply", &bytes);
            let _ = decode_message::<HashRequest>("HashRequest", &bytes);
            let _ = decode_message::<TargetHashRequest>("TargetHashRequest", &bytes);
        }
    }

    #[test]
    fn progress_carries_the_compare_counts() {
        let m = ResyncProgressMsg { disk: 1, done: 3, total: 12, bytes_per_s: 5 << 20, compare_total: 1024, compared: 512, differ: 12 };
        assert_eq!(decode_message::<ResyncProgressMsg>("ResyncProgress", &encode_message(&m)).unwrap(), m);
    }

    #[test]
    fn ack_and_confirm_round_trip() {
        let a = WriteAck { req_id: 77, seq: 12345, status: 0 };
        assert_eq!(WriteAck::decode(&a.encode()).unwrap(), a);
        assert!(WriteAck::decode(&a.encode()[..23]).is_err());
        assert_eq!(decode_confirm(&encode_confirm(99)).unwrap(), 99);
        assert!(decode_confirm(&[1, 2, 3]).is_err());
    }

    #[test]
    fn hello_round_trip_and_garbage() {
        let h = AgentHello {
            protocol: 1,
            vm: "erp-db".into(),
            disks: vec![DiskHello { group: "erp".into(), volume: "db".into(), size: 1 << 30 }],
        };
        let b = encode_message(&h);
        assert_eq!(decode_message::<AgentHello>("AgentHello", &b).unwrap(), h);
        assert!(decode_message::<AgentHello>("AgentHello", &b[..b.len() - 1]).is_err());
        assert!(decode_message::<AgentHello>("AgentHello", &[0xff; 3]).is_err());
    }
}
