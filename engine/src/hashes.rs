//! Routing region-hash requests from agents to a group's target and the answers back
//! (docs/wire-protocol.md, "Sessions", item 6).
//!
//! ```text
//! agent ──HashRequest──▶ session reader ──Barrier──▶ journal task (through_seq = durable
//!   ▲                                                   after everything queued before it)
//!   │                                                        │ submit
//!   │                                                        ▼
//!   │                                   HashBroker (one per group): queued until the shipper
//!   │                                   has shipped through_seq, then sent on its connection
//!   │                                          ──TargetHashRequest──▶ target
//!   └──HashReply── ack writer ◀── reply ◀── confirm reader ◀──TargetHashReply──┘
//! ```
//!
//! The broker never guesses: a request it cannot get answered (no target connection, the
//! connection lost, no answer within [`HASH_WAIT`]) is answered `Unavailable`, and the agent
//! asks again later.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hindsight_consistency::sync::lock;
use hindsight_consistency::wire::{HashReply, HashStatus, TargetHashRequest};
use hindsight_consistency::Seq;

/// How long a request may wait for its prefix to be shipped and for the target's answer.
pub const HASH_WAIT: Duration = Duration::from_secs(30);

/// Where an answer goes (the agent's session), once.
pub type HashReplyTo = Box<dyn FnOnce(HashReply) + Send>;

struct Job {
    req: TargetHashRequest,
    reply: HashReplyTo,
    since: Instant,
}

#[derive(Default)]
struct State {
    connected: bool,
    next_id: u64,
    /// Waiting for the shipper to ship through their `through_seq`.
    queued: VecDeque<Job>,
    /// Sent to the target, by the id on the wire.
    sent: HashMap<u64, Job>,
}

/// The hash requests of one group.
#[derive(Default)]
pub struct HashBroker {
    state: Mutex<State>,
    /// Wakes the group's shipper when a request is queued (set once it is started).
    pub shipper: std::sync::OnceLock<hindsight_consistency::tasks::Waker>,
}

impl HashBroker {
    /// True while the group's shipper has a connection to the target.
    pub fn is_connected(&self) -> bool {
        lock(&self.state).connected
    }

    /// True while requests wait to be sent or answered (the shipper then polls more often).
    pub fn busy(&self) -> bool {
        let s = lock(&self.state);
        !s.queued.is_empty() || !s.sent.is_empty()
    }

    /// Takes a request whose `through_seq` is set; answers at once if no target is connected.
    pub fn submit(&self, req: TargetHashRequest, reply: HashReplyTo) {
        let mut s = lock(&self.state);
        if !s.connected {
            drop(s);
            return reply(HashReply::unavailable(req.id, "the engine is not connected to the target"));
        }
        s.queued.push_back(Job { req, reply, since: Instant::now() });
        drop(s);
        if let Some(w) = self.shipper.get() {
            w.wake();
        }
    }

    /// The shipper has a new connection to the target.
    pub fn connected(&self) {
        lock(&self.state).connected = true;
    }

    /// The shipper's connection ended: every request waiting is answered `Unavailable`.
    pub fn disconnected(&self) {
        let jobs: Vec<Job> = {
            let mut s = lock(&self.state);
            s.connected = false;
            let mut jobs: Vec<Job> = s.queued.drain(..).collect();
            jobs.extend(s.sent.drain().map(|(_, j)| j));
            jobs
        };
        for j in jobs {
            (j.reply)(HashReply::unavailable(j.req.id, "the connection to the target was lost"));
        }
    }

    /// The requests the shipper may send now that it has shipped every record through
    /// `shipped_through`, with their ids on the wire.
    pub fn take_ready(&self, shipped_through: Seq) -> Vec<TargetHashRequest> {
        let mut s = lock(&self.state);
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(j) = s.queued.pop_front() {
            if j.req.through_seq > shipped_through {
                keep.push_back(j);
                continue;
            }
            s.next_id += 1;
            let id = s.next_id;
            out.push(TargetHashRequest { id, ..j.req.clone() });
            s.sent.insert(id, j);
        }
        s.queued = keep;
        out
    }

    /// The target answered: passes the answer on under the requester's id. An answer to an
    /// id not waiting (expired, or from an earlier connection) is ignored.
    pub fn answer(&self, reply: HashReply) {
        let Some(job) = lock(&self.state).sent.remove(&reply.id) else {
            log::debug!("hash reply {} matches no request waiting; ignored", reply.id);
            return;
        };
        let answer = match reply.status {
            HashStatus::Ok if reply.hashes.len() != job.req.regions.len() => HashReply::unavailable(
                job.req.id,
                format!("the target gave {} hashes for {} regions", reply.hashes.len(), job.req.regions.len()),
            ),
            HashStatus::Ok if reply.seq < job.req.through_seq => HashReply::unavailable(
                job.req.id,
                format!("the target hashed the replica at seq {}, before seq {}", reply.seq, job.req.through_seq),
            ),
            _ => HashReply { id: job.req.id, ..reply },
        };
        (job.reply)(answer);
    }

    /// Answers `Unavailable` to every request older than [`HASH_WAIT`].
    pub fn expire(&self) {
        let now = Instant::now();
        let old = |j: &Job| now.duration_since(j.since) >= HASH_WAIT;
        let expired: Vec<Job> = {
            let mut s = lock(&self.state);
            let (gone, kept): (Vec<Job>, Vec<Job>) = s.queued.drain(..).partition(old);
            s.queued = kept.into();
            let ids: Vec<u64> = s.sent.iter().filter(|(_, j)| old(j)).map(|(&id, _)| id).collect();
            gone.into_iter().chain(ids.into_iter().filter_map(|id| s.sent.remove(&id))).collect()
        };
        for j in expired {
            (j.reply)(HashReply::unavailable(j.req.id, format!("the target did not answer within {HASH_WAIT:?}")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn request(id: u64, through_seq: Seq) -> TargetHashRequest {
        TargetHashRequest { id, volume: "db".into(), region_shift: 20, regions: vec![0, 1], through_seq }
    }

    fn collector() -> (Arc<Mutex<Vec<HashReply>>>, impl Fn() -> HashReplyTo) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        (got, move || {
            let g = Arc::clone(&g);
            Box::new(move |r| g.lock().unwrap().push(r))
        })
    }

    #[test]
    fn without_a_target_the_answer_is_unavailable_at_once() {
        let b = HashBroker::default();
        let (got, to) = collector();
        b.submit(request(5, 1), to());
        let got = got.lock().unwrap();
        assert_eq!((got[0].id, got[0].status), (5, HashStatus::Unavailable));
        assert!(!b.busy());
    }

    #[test]
    fn a_request_waits_for_its_prefix_and_the_answer_goes_back_under_the_agents_id() {
        let b = HashBroker::default();
        b.connected();
        let (got, to) = collector();
        b.submit(request(41, 10), to());
        b.submit(request(42, 20), to());
        assert!(b.take_ready(9).is_empty());
        let first = b.take_ready(15);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].through_seq, 10);
        let wire_id = first[0].id;
        // Too few hashes, or a prefix before through_seq, is not an answer.
        b.answer(HashReply { id: wire_id, status: HashStatus::Ok, seq: 15, hashes: vec![[1; 32], [2; 32]], message: String::new() });
        b.answer(HashReply { id: wire_id, status: HashStatus::Ok, seq: 15, hashes: vec![], message: String::new() });
        let second = b.take_ready(20);
        b.answer(HashReply { id: second[0].id, status: HashStatus::Ok, seq: 12, hashes: vec![[1; 32], [2; 32]], message: String::new() });
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2, "the duplicate answer is ignored");
        assert_eq!((got[0].id, got[0].status, got[0].seq), (41, HashStatus::Ok, 15));
        assert_eq!(got[0].hashes, vec![[1; 32], [2; 32]]);
        assert_eq!((got[1].id, got[1].status), (42, HashStatus::Unavailable), "{}", got[1].message);
        assert!(!b.busy());
    }

    #[test]
    fn a_lost_connection_answers_every_waiting_request() {
        let b = HashBroker::default();
        b.connected();
        let (got, to) = collector();
        b.submit(request(1, 1), to());
        b.submit(request(2, 100), to());
        assert_eq!(b.take_ready(1).len(), 1);
        assert!(b.busy());
        b.disconnected();
        let got = got.lock().unwrap();
        let mut ids: Vec<u64> = got.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
        assert!(got.iter().all(|r| r.status == HashStatus::Unavailable));
        assert!(!b.busy() && !b.is_connected());
    }
}
