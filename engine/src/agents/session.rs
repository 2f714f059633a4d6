//! The reading side of an agent connection once it is attached: writes into the group
//! journals, resync ends and progress, hash requests and quiesce answers. It is a task of the
//! engine's link pool woken when the socket has bytes ([`Reading`]): an agent with nothing to
//! send holds no thread. A write whose group's channel is full waits, read but not queued,
//! until that group's journal task takes some (the agent is pushed back on: nothing more is
//! read from it meanwhile, so the order of its writes is kept).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hindsight_consistency::region_hash::MAX_HASH_REGIONS;
use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::{Reading, Step, Waker};
use hindsight_consistency::transport::{ElasticReader, ReadHalf};
use hindsight_consistency::wire::frame::whole_frame_buffered;
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, ErrorMessage, FrameError, FrameType, HashReply, HashRequest, QuiescedMsg, ResyncDoneMsg,
    ResyncProgressMsg, ResyncStatus, TargetHashRequest, WriteAck, WriteMsg, WRITE_HEADER_LEN,
};

use super::{detach, Disk};
use crate::acks::AckTo;
use crate::connection::Registry;
use crate::group::{Barrier, GroupHandle, GroupItem, ResyncDone, WriteRequest};
use crate::hashes::HashReplyTo;

/// Most frames read in one round: the other connections get the thread after them.
const FRAMES_PER_ROUND: usize = 64;

/// Write bytes queued to a group before its journal task is woken in the middle of a round;
/// below it, the round ends by committing them itself ([`GroupHandle::commit_here`]).
const COMMIT_HERE_BYTES: u64 = 256 << 10;

/// An attached agent's session.
pub(super) struct Session {
    pub reg: Arc<Registry>,
    pub peer: SocketAddr,
    pub vm: String,
    /// Its key in `Registry::sessions`.
    pub id: u64,
    /// The volumes it attached, detached at the end.
    pub names: Vec<String>,
    pub disks: Vec<Disk>,
    pub reader: ElasticReader<ReadHalf>,
    pub payload: Vec<u8>,
    /// To the connection's writer.
    pub out: AckTo,
    /// Items read and not yet queued, in order: their group's channel was full.
    pub pending: VecDeque<(GroupHandle, GroupItem)>,
    /// Why the session ended, once it has.
    pub end: Option<SessionEnd>,
    /// The last look found bytes to read.
    pub input: bool,
    /// Groups given items this round whose journal tasks are not woken yet, and the write
    /// bytes given them: the round's end commits the first itself and wakes the others.
    pub unwoken: Vec<GroupHandle>,
    pub unwoken_bytes: u64,
}

/// Why an agent session's reader stopped.
pub(super) enum SessionEnd {
    /// The connection ended or a frame was malformed.
    Frame(FrameError),
    /// The agent sent something the engine refuses: it is told why (`Error`) and closed.
    Refused(String),
}

impl From<FrameError> for SessionEnd {
    fn from(e: FrameError) -> SessionEnd {
        SessionEnd::Frame(e)
    }
}

fn shutting_down() -> SessionEnd {
    SessionEnd::Frame(FrameError::Peer("the engine is shutting down".into()))
}

impl Reading for Session {
    fn ready(&mut self, burst: bool) -> bool {
        if self.pending.is_empty() {
            self.input = self.reader.has_input(burst);
            self.input
        } else {
            self.input = self.reader.has_input(false);
            true
        }
    }

    fn parking(&mut self) -> Option<std::time::Instant> {
        self.reader.park_idle()
    }

    fn step(&mut self, me: &Waker) -> Step {
        let step = self.read_some(me);
        self.commit_unwoken();
        step
    }

    /// Logs how the session ended, tells a refused agent why, and frees its volumes.
    fn end(self) {
        let Session { reg, peer, vm, id, names, disks, reader, out, pending, end, .. } = self;
        lock(&reg.sessions).remove(&id);
        let refused = match end {
            None | Some(SessionEnd::Frame(FrameError::Closed)) => {
                log::info!("agent {peer} (vm {vm}) disconnected");
                false
            }
            Some(SessionEnd::Frame(e)) => {
                log::warn!("agent {peer} (vm {vm}): connection closed: {e}");
                false
            }
            Some(SessionEnd::Refused(why)) => {
                log::warn!("agent {peer} (vm {vm}) refused: {why}");
                out.frame(FrameType::Error, encode_message(&ErrorMessage { message: why }));
                true
            }
        };
        drop(pending);
        drop(disks);
        // A refused agent's writer sends the `Error`, then closes the socket; otherwise it is
        // shut now.
        out.close();
        if !refused {
            reader.get_ref().shutdown();
        }
        // The volumes are free for the next agent now: every write read from this one is
        // queued already. (Sync acknowledgements held until the target confirms go nowhere
        // once the socket is shut.)
        detach(&reg, &names);
    }
}

impl Session {
    /// Reads up to a round's share of frames and queues what they carry.
    fn read_some(&mut self, me: &Waker) -> Step {
        let mut more = self.input;
        for _ in 0..FRAMES_PER_ROUND {
            match self.queue_pending(me) {
                Ok(true) => {}
                Ok(false) => return Step::Wait,
                Err(e) => {
                    self.end = Some(e);
                    return Step::Close;
                }
            }
            if !more {
                return Step::Continue;
            }
            if let Err(e) = self.frame() {
                self.end = Some(e);
                return Step::Close;
            }
            more = whole_frame_buffered(self.reader.buffer());
        }
        match self.queue_pending(me) {
            Ok(true) => Step::Continue,
            Ok(false) => Step::Wait,
            Err(e) => {
                self.end = Some(e);
                Step::Close
            }
        }
    }

    /// Queues what waits, in order; false if a group's channel is still full (this task is
    /// woken when it has room).
    fn queue_pending(&mut self, me: &Waker) -> Result<bool, SessionEnd> {
        while let Some((group, item)) = self.pending.pop_front() {
            let bytes = match &item {
                GroupItem::Write(w) => u64::from(w.length),
                _ => 0,
            };
            match group.offer_unwoken(item, me) {
                Ok(None) => {
                    if !self.unwoken.iter().any(|g| g.same(&group)) {
                        self.unwoken.push(group);
                    }
                    self.unwoken_bytes += bytes;
                    if self.unwoken_bytes >= COMMIT_HERE_BYTES {
                        // Enough for a commit of its own while this round reads on.
                        self.unwoken_bytes = 0;
                        for g in self.unwoken.drain(..) {
                            g.wake();
                        }
                    }
                }
                Ok(Some(item)) => {
                    self.pending.push_front((group, item));
                    return Ok(false);
                }
                Err(_) => return Err(shutting_down()),
            }
        }
        Ok(true)
    }

    /// The round ends: the first group given writes commits them on this thread (which would
    /// only wait for the agent's next frame otherwise), the others' journal tasks are woken to
    /// commit at the same time.
    fn commit_unwoken(&mut self) {
        self.unwoken_bytes = 0;
        let mut groups = self.unwoken.drain(..);
        let Some(first) = groups.next() else { return };
        for g in groups {
            g.wake();
        }
        first.commit_here();
    }

    /// Reads one frame (waiting for the rest of it) and handles it.
    fn frame(&mut self) -> Result<(), SessionEnd> {
        let ftype = read_frame(&mut self.reader, &mut self.payload)?;
        let payload = &self.payload;
        match ftype {
            FrameType::Write => return self.write(),
            FrameType::Quiesced => {
                let m: QuiescedMsg = decode_message("Quiesced", payload)?;
                if let Some(tx) = lock(&self.reg.quiesce_waits).get(&m.id) {
                    let _ = tx.send((self.vm.clone(), m));
                }
            }
            FrameType::ResyncDone => {
                let m: ResyncDoneMsg = decode_message("ResyncDone", payload)?;
                self.resync_done(&m)?;
                for &n in &m.disks {
                    if let Some(d) = self.disks.get(usize::from(n)) {
                        lock(&self.reg.resync_progress).remove(&*d.volume);
                    }
                }
            }
            FrameType::ResyncProgress => {
                let m: ResyncProgressMsg = decode_message("ResyncProgress", payload)?;
                self.resync_progress(&m);
            }
            FrameType::HashRequest => {
                let m: HashRequest = decode_message("HashRequest", payload)?;
                self.hash_request(m);
            }
            other => {
                return Err(
                    FrameError::Unexpected { got: other, expected: "Write, Quiesced, ResyncDone, ResyncProgress or HashRequest" }.into()
                )
            }
        }
        Ok(())
    }

    /// A guest write, checked against its disk, on its way to the group's journal.
    fn write(&mut self) -> Result<(), SessionEnd> {
        let (msg, _) = WriteMsg::decode(&self.payload)?;
        let refuse = |status| vec![WriteAck { req_id: msg.req_id, seq: 0, status }];
        let Some(disk) = self.disks.get(usize::from(msg.disk)) else {
            log::warn!("write to unknown disk number {}", msg.disk);
            self.out.acks(refuse(WriteAck::EINVAL));
            return Ok(());
        };
        if msg.offset.checked_add(u64::from(msg.length)).is_none_or(|end| end > disk.size) {
            log::warn!("volume {}: write at {} length {} is past the end ({})", disk.volume, msg.offset, msg.length, disk.size);
            self.out.acks(refuse(WriteAck::EINVAL));
            return Ok(());
        }
        if disk.group.shared.poisoned.load(Ordering::Relaxed) {
            self.out.acks(refuse(WriteAck::EIO));
            return Ok(());
        }
        let req = WriteRequest {
            req_id: msg.req_id,
            volume: disk.volume.clone(),
            kind: msg.kind,
            offset: msg.offset,
            length: msg.length,
            payload: std::mem::take(&mut self.payload),
            data_at: WRITE_HEADER_LEN,
            ack: Arc::clone(&self.out),
        };
        self.pending.push_back((disk.group.clone(), GroupItem::Write(req)));
        Ok(())
    }

    /// Records what an agent says of a disk's resync, for status.
    fn resync_progress(&self, m: &ResyncProgressMsg) {
        let Some(d) = self.disks.get(usize::from(m.disk)) else { return };
        // While regions are being compared, what is left is the compare sweep.
        let left_regions = if m.compare_total > m.compared { m.compare_total - m.compared } else { m.total - m.done.min(m.total) };
        let eta_s = (left_regions << 20).checked_div(m.bytes_per_s).unwrap_or(0);
        let status = ResyncStatus {
            volume: d.volume.to_string(),
            done: m.done,
            total: m.total,
            bytes_per_s: m.bytes_per_s,
            eta_s,
            compare_total: m.compare_total,
            compared: m.compared,
            differ: m.differ,
        };
        let mut progress = lock(&self.reg.resync_progress);
        if m.compare_total > 0 && m.compared >= m.compare_total && m.done >= m.total {
            // A compare sweep that is done and sent everything that differed: a resync point
            // follows only if something was sent.
            progress.remove(&*d.volume);
        } else {
            progress.insert(d.volume.to_string(), status);
        }
    }

    /// Passes an agent's hash request on: through the group's journal channel (a barrier,
    /// which gives the `through_seq` every record sent before it is under), then to the
    /// group's shipper. The answer, or `Unavailable` with the reason, goes back to the agent.
    fn hash_request(&mut self, m: HashRequest) {
        let id = m.id;
        let out = Arc::clone(&self.out);
        let reply: HashReplyTo = Box::new(move |r: HashReply| {
            out.frame(FrameType::HashReply, encode_message(&HashReply { id, ..r }));
        });
        let Some(disk) = self.disks.get(usize::from(m.disk)) else {
            return reply(HashReply::unavailable(id, format!("the hello has no disk number {}", m.disk)));
        };
        if m.regions.is_empty() || m.regions.len() > MAX_HASH_REGIONS {
            return reply(HashReply::unavailable(
                id,
                format!("a hash request names 1 to {MAX_HASH_REGIONS} regions, not {}", m.regions.len()),
            ));
        }
        let broker = match self.reg.hashes.get(&disk.group.config.name) {
            Some(b) if b.is_connected() => Arc::clone(b),
            _ => {
                let why = format!("group {}: the engine is not connected to the target", disk.group.config.name);
                return reply(HashReply::unavailable(id, why));
            }
        };
        let mut req =
            TargetHashRequest { id, volume: disk.volume.to_string(), region_shift: m.region_shift, regions: m.regions, through_seq: 0 };
        let barrier = Barrier::new(move |through| match through {
            Ok(seq) => {
                req.through_seq = seq;
                broker.submit(req, reply);
            }
            Err(why) => reply(HashReply::unavailable(id, why.to_string())),
        });
        self.pending.push_back((disk.group.clone(), GroupItem::Barrier(barrier)));
    }

    /// Passes the end of a resync to the group of each disk named, once per group, behind the
    /// session's writes: the resync point follows every write read before it. Nothing is
    /// passed on if any disk number is not one of the hello's.
    fn resync_done(&mut self, m: &ResyncDoneMsg) -> Result<(), SessionEnd> {
        let disks = &self.disks;
        if m.disks.is_empty() {
            return Err(SessionEnd::Refused("ResyncDone names no disk; name the disk numbers of the hello whose resync completed".into()));
        }
        let mut groups: Vec<(&GroupHandle, Vec<Arc<str>>)> = Vec::new();
        for &n in &m.disks {
            let Some(disk) = disks.get(usize::from(n)) else {
                return Err(SessionEnd::Refused(format!(
                    "ResyncDone names disk number {n}, but the hello had {} disk(s) (numbers 0 to {}); no resync point was placed",
                    disks.len(),
                    disks.len() - 1
                )));
            };
            match groups.iter_mut().find(|(g, _)| g.config.name == disk.group.config.name) {
                Some((_, volumes)) if volumes.contains(&disk.volume) => {}
                Some((_, volumes)) => volumes.push(Arc::clone(&disk.volume)),
                None => groups.push((&disk.group, vec![Arc::clone(&disk.volume)])),
            }
        }
        let items: Vec<_> =
            groups.into_iter().map(|(group, volumes)| (group.clone(), GroupItem::ResyncDone(ResyncDone { volumes }))).collect();
        self.pending.extend(items);
        Ok(())
    }
}
