//! Acknowledgements on their way from a group's journal task (or the sync acknowledgements
//! a policy held) to the agent connections' writers, batched per connection.

use crossbeam_channel::Sender;
use hindsight_consistency::wire::WriteAck;

/// Acknowledgements on their way to one agent connection's writer, in order. A commit sends
/// each connection the acknowledgements of its writes as one batch: the writer then wakes
/// once per commit, not once per write.
pub type Acks = Vec<WriteAck>;

/// Sends acknowledgements in their order, each run of consecutive ones bound for the same
/// connection as one batch. A closed connection just drops its acknowledgements.
pub fn send_acks(acks: impl IntoIterator<Item = (Sender<Acks>, WriteAck)>) {
    let mut run: Option<(Sender<Acks>, Acks)> = None;
    for (to, ack) in acks {
        match &mut run {
            Some((current, batch)) if current.same_channel(&to) => batch.push(ack),
            _ => {
                if let Some((current, batch)) = run.replace((to, vec![ack])) {
                    let _ = current.send(batch);
                }
            }
        }
    }
    if let Some((current, batch)) = run {
        let _ = current.send(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(req_id: u64) -> WriteAck {
        WriteAck { req_id, seq: req_id + 100, status: WriteAck::OK }
    }

    #[test]
    fn acks_go_in_order_one_batch_per_run_of_a_connection() {
        let (a, a_rx) = crossbeam_channel::unbounded();
        let (b, b_rx) = crossbeam_channel::unbounded();
        send_acks([(a.clone(), ack(1)), (a.clone(), ack(2)), (b.clone(), ack(3)), (a.clone(), ack(4)), (b, ack(5))]);
        let ids = |batch: Acks| batch.iter().map(|a| a.req_id).collect::<Vec<_>>();
        assert_eq!(a_rx.try_iter().map(ids).collect::<Vec<_>>(), vec![vec![1, 2], vec![4]]);
        assert_eq!(b_rx.try_iter().map(ids).collect::<Vec<_>>(), vec![vec![3], vec![5]]);
        // A closed connection drops its acknowledgements; the others still get theirs.
        drop(b_rx);
        let (c, c_rx) = crossbeam_channel::unbounded();
        let (gone, _) = crossbeam_channel::unbounded();
        send_acks([(gone, ack(6)), (c, ack(7))]);
        assert_eq!(c_rx.try_iter().map(ids).collect::<Vec<_>>(), vec![vec![7]]);
        send_acks(std::iter::empty());
        assert!(a_rx.try_recv().is_err());
    }
}
