//! Acknowledgements on their way from a group's journal task (or the sync acknowledgements
//! a policy held) to the agent connections' writers, batched per connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use hindsight_consistency::tasks::Waker;
use hindsight_consistency::wire::{FrameType, WriteAck};

/// Acknowledgements on their way to one agent connection's writer, in order. A commit sends
/// each connection the acknowledgements of its writes as one batch: the writer then wakes
/// once per commit, not once per write.
pub type Acks = Vec<WriteAck>;

/// What goes out to one agent, in the order it was given.
pub enum Outgoing {
    /// Acknowledgements.
    Acks(Acks),
    /// Another frame (a quiesce request, a hash reply; an `Error` is the last thing sent).
    Frame(FrameType, Vec<u8>),
}

/// The way to one agent connection's writer task: whatever is given wakes it.
pub struct Outbox {
    tx: Sender<Outgoing>,
    writer: Waker,
    closed: Arc<AtomicBool>,
}

/// Where an acknowledgement goes.
pub type AckTo = Arc<Outbox>;

impl Outbox {
    /// The outbox of a writer task that reads the other end of `tx`, is woken by `writer`
    /// and sees [`Outbox::close`] in `closed`.
    pub fn new(tx: Sender<Outgoing>, writer: Waker, closed: Arc<AtomicBool>) -> Outbox {
        Outbox { tx, writer, closed }
    }

    /// Queues acknowledgements. Dropped once the connection has gone.
    pub fn acks(&self, acks: Acks) {
        self.give(Outgoing::Acks(acks));
    }

    /// Queues a frame; false once the connection has gone.
    pub fn frame(&self, ftype: FrameType, payload: Vec<u8>) -> bool {
        self.give(Outgoing::Frame(ftype, payload))
    }

    fn give(&self, out: Outgoing) -> bool {
        let sent = self.tx.send(out).is_ok();
        if sent {
            // Given at the end of a commit (or of a session's round): the writer runs on this
            // thread next if it is one of the link pool's, with no other thread woken.
            self.writer.wake_next();
        }
        sent
    }

    /// The session ends: the writer sends what is queued up to an `Error` (if one is), then
    /// closes; what comes later goes nowhere.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.writer.wake();
    }
}

/// Sends acknowledgements in their order, each run of consecutive ones bound for the same
/// connection as one batch. A closed connection just drops its acknowledgements.
pub fn send_acks(acks: impl IntoIterator<Item = (AckTo, WriteAck)>) {
    let mut run: Option<(AckTo, Acks)> = None;
    for (to, ack) in acks {
        match &mut run {
            Some((current, batch)) if Arc::ptr_eq(current, &to) => batch.push(ack),
            _ => {
                if let Some((current, batch)) = run.replace((to, vec![ack])) {
                    current.acks(batch);
                }
            }
        }
    }
    if let Some((current, batch)) = run {
        current.acks(batch);
    }
}

/// Outboxes with no connection behind them, for the tests of what sends acknowledgements.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::OnceLock;

    use crossbeam_channel::Receiver;
    use hindsight_consistency::tasks::{Next, Pool, Task};

    use super::*;

    struct Nothing;
    impl Task for Nothing {
        fn run(&self) -> Next {
            Next::Idle
        }
    }

    /// An outbox and what is given to it.
    pub fn outbox() -> (AckTo, Receiver<Outgoing>) {
        static POOL: OnceLock<Pool> = OnceLock::new();
        let pool = Pool::process_wide(&POOL, "acks-test", 1).expect("a pool for tests");
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(Outbox::new(tx, pool.add("writer", Nothing), Arc::default())), rx)
    }

    /// The next batch of acknowledgements given, if any (frames are skipped).
    pub fn next_acks(rx: &Receiver<Outgoing>) -> Option<Acks> {
        rx.try_iter().find_map(|o| match o {
            Outgoing::Acks(a) => Some(a),
            Outgoing::Frame(..) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{next_acks, outbox};
    use super::*;

    fn ack(req_id: u64) -> WriteAck {
        WriteAck { req_id, seq: req_id + 100, status: WriteAck::OK }
    }

    fn ids(rx: &crossbeam_channel::Receiver<Outgoing>) -> Vec<Vec<u64>> {
        std::iter::from_fn(|| next_acks(rx)).map(|batch| batch.iter().map(|a| a.req_id).collect()).collect()
    }

    #[test]
    fn acks_go_in_order_one_batch_per_run_of_a_connection() {
        let ((a, a_rx), (b, b_rx)) = (outbox(), outbox());
        send_acks([(a.clone(), ack(1)), (a.clone(), ack(2)), (b.clone(), ack(3)), (a.clone(), ack(4)), (b.clone(), ack(5))]);
        assert_eq!(ids(&a_rx), vec![vec![1, 2], vec![4]]);
        assert_eq!(ids(&b_rx), vec![vec![3], vec![5]]);
        // A closed connection drops its acknowledgements; the others still get theirs.
        drop(b_rx);
        let (c, c_rx) = outbox();
        send_acks([(b, ack(6)), (c, ack(7))]);
        assert_eq!(ids(&c_rx), vec![vec![7]]);
        send_acks(std::iter::empty());
        assert!(a_rx.try_recv().is_err());
    }
}
