//! The supervisor thread: owns the connection's life, running an ack reader on each
//! connection and reconnecting when it ends, until the link is dropped; then fails what is
//! left.

use std::sync::Arc;
use std::thread;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{Connection, ReadHalf, WriteHalf};
use hindsight_consistency::wire::FrameError;
use log::warn;

use super::acks::read_acks;
use super::connect::reconnect;
use super::state::{Inner, State};
use crate::block::BlockError;

/// Owns the connection's life: runs an ack reader per connection, and reconnects when it
/// ends, until the link is dropped. `reader` reads the first connection, which is up already.
pub(super) fn supervise(inner: &Arc<Inner>, first: Option<ReadHalf>, closed: &Receiver<()>) {
    // A new connection, to bring up once its ack reader runs.
    let mut fresh: Option<WriteHalf> = None;
    let mut reader = match first {
        Some(stream) => stream,
        None => match next_connection(inner, closed) {
            Some((reader, stream)) => {
                fresh = Some(stream);
                reader
            }
            None => return finish(inner),
        },
    };
    loop {
        let for_acks = Arc::clone(inner);
        let (ended, ends) = crossbeam_channel::bounded(1);
        let acks = thread::Builder::new().name("engine-acks".to_string()).spawn(move || {
            let why = read_acks(&for_acks, reader);
            let _ = ended.send(());
            why
        });
        let reason = match acks {
            Ok(acks) => {
                if let Some(stream) = fresh.take() {
                    // A takeover's resync starts before any write goes to the new owner.
                    inner.takeover_resyncs();
                    // Acks are read while the pending writes go out again, so a long resend
                    // cannot fill both directions of the socket and stall.
                    inner.go_up(stream);
                }
                watch(inner, &ends);
                acks.join().unwrap_or_else(|_| FrameError::Peer("the ack reader panicked".into())).to_string()
            }
            Err(e) => {
                // Closed before reconnecting: the engine keeps the volumes attached while it
                // is open.
                drop(fresh.take());
                format!("cannot start the ack reader: {e}")
            }
        };
        {
            let mut w = lock(&inner.writer);
            if matches!(w.state, State::Closed) {
                break;
            }
            inner.lose(&mut w.state, &reason);
        }
        let Some((r, stream)) = next_connection(inner, closed) else { break };
        reader = r;
        fresh = Some(stream);
    }
    finish(inner);
}

/// How often the supervisor looks whether the engine still answers.
const WATCH_TICK: Duration = Duration::from_millis(250);

/// Waits for the connection's ack reader to end (`ends`); meanwhile, if writes wait and the
/// engine sends nothing for the engine timeout, takes it as hung and shuts the connection.
fn watch(inner: &Inner, ends: &Receiver<()>) {
    let mut seen = inner.frames_read.load(Ordering::Relaxed);
    let mut silent_since: Option<Instant> = None;
    while let Err(RecvTimeoutError::Timeout) = ends.recv_timeout(WATCH_TICK) {
        let read = inner.frames_read.load(Ordering::Relaxed);
        if read != seen || lock(&inner.pending).is_empty() {
            seen = read;
            silent_since = None;
            continue;
        }
        let since = *silent_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= inner.engine_timeout {
            inner.hung(since.elapsed());
            silent_since = None;
        }
    }
}

/// Reconnects; returns the reader half and the writer half to bring up, or `None` once the
/// link is closed.
fn next_connection(inner: &Inner, closed: &Receiver<()>) -> Option<(ReadHalf, WriteHalf)> {
    reconnect(inner, closed).map(Connection::split)
}

/// The link is closed: fails every write still waiting.
fn finish(inner: &Inner) {
    let left = std::mem::take(&mut *lock(&inner.pending));
    if !left.is_empty() {
        warn!("engine link to {} closed with {} write(s) unacknowledged", inner.engine, left.len());
    }
    for p in left.into_values() {
        (p.done)(Err(BlockError::Shutdown));
    }
}
