//! One ublk queue, served on its own thread.
//!
//! The thread owns the queue's io_uring. It fetches every tag, then loops: a completed fetch
//! is a request, whose descriptor says what to do. Reads and flushes run right here; writes,
//! trims and write-zeroes are submitted to the [`BlockDevice`] and finish through their
//! completion, which sends `(tag, result)` on a channel and wakes the ring through an eventfd.
//! Every commit (`COMMIT_AND_FETCH_REQ`) is issued by this thread, as ublk requires.
//!
//! FLUSH is answered before any range check: the kernel sends it with a meaningless start
//! sector.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use nix::sys::eventfd::EventFd;

use super::abi::{self, IoDesc};
use super::sys::{DescArea, Event, QueueIo};
use crate::block::{BlockDevice, BlockError, WriteKind, WriteOp};

/// `-errno` for a commit.
fn failed(e: BlockError) -> i32 {
    -e.errno()
}

/// What the queue does with one request.
enum Action {
    /// Commit now with this result.
    Done(i32),
    /// Submitted to the device; the result comes through the channel.
    Submitted,
}

/// Serves the queue until the kernel ends every tag (device stopped or deleted).
pub(super) fn run(mut io: QueueIo, descs: DescArea, depth: u16, device: Arc<dyn BlockDevice>, name: String) -> std::io::Result<()> {
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<(u16, i32)>();
    let waker = io.waker();
    for tag in 0..depth {
        io.fetch(tag)?;
    }
    io.arm_wake()?;
    let mut events = Vec::new();
    let mut ended = 0usize;
    let mut busy = 0usize; // requests submitted to the device and not yet committed
    loop {
        io.submit_and_wait(&mut events)?;
        for event in events.drain(..) {
            match event {
                Event::Request(tag) => {
                    let desc = descs.get(tag);
                    match handle(&mut io, &device, tag, desc, &done_tx, &waker) {
                        Action::Done(res) => io.commit(tag, res)?,
                        Action::Submitted => busy += 1,
                    }
                }
                Event::Ended { tag, res } => {
                    if res != abi::IO_RES_ABORT {
                        warn!("{name}: tag {tag} ended with error {res}");
                    }
                    ended += 1;
                }
                Event::Woken => {
                    busy -= commit_finished(&mut io, &done_rx, ended < usize::from(depth))?;
                    if ended < usize::from(depth) || busy > 0 {
                        io.arm_wake()?;
                    }
                }
            }
        }
        if ended == usize::from(depth) && busy == 0 {
            // Every tag is idle for good. The wake-up read may still be queued: complete it so
            // nothing is outstanding when the ring goes.
            if io.outstanding() > 0 {
                let _ = waker.write(1);
                io.submit_and_wait(&mut events)?;
            }
            debug!("{name}: queue stopped");
            return Ok(());
        }
    }
}

/// Commits every request whose device completion has arrived; returns how many.
fn commit_finished(io: &mut QueueIo, done: &Receiver<(u16, i32)>, live: bool) -> std::io::Result<usize> {
    let mut n = 0;
    for (tag, res) in done.try_iter() {
        n += 1;
        if live {
            io.commit(tag, res)?;
        }
    }
    Ok(n)
}

fn handle(
    io: &mut QueueIo,
    device: &Arc<dyn BlockDevice>,
    tag: u16,
    desc: IoDesc,
    done: &Sender<(u16, i32)>,
    waker: &Arc<EventFd>,
) -> Action {
    let op = desc.op();
    // FLUSH first: its start sector is meaningless.
    if op == abi::OP_FLUSH {
        return Action::Done(device.flush().map_or_else(failed, |()| 0));
    }
    let Some(offset) = desc.start_sector.checked_mul(512) else { return Action::Done(failed(BlockError::Invalid)) };
    let len = u64::from(desc.nr_sectors) * 512;
    if offset.checked_add(len).is_none_or(|end| end > device.size()) {
        return Action::Done(failed(BlockError::Invalid));
    }
    let Ok(len32) = u32::try_from(len) else { return Action::Done(failed(BlockError::Overflow)) };
    let Ok(result) = i32::try_from(len) else { return Action::Done(failed(BlockError::Overflow)) };
    let kind = match op {
        abi::OP_READ => {
            let buf = io.buffer(tag, len32 as usize);
            return Action::Done(device.read(offset, buf).map_or_else(failed, |()| result));
        }
        abi::OP_WRITE => WriteKind::Data(io.buffer(tag, len32 as usize).to_vec()),
        abi::OP_DISCARD => WriteKind::Trim { len: len32 },
        abi::OP_WRITE_ZEROES => WriteKind::Zeroes { len: len32 },
        _ => return Action::Done(failed(BlockError::NotSupported)),
    };
    let fua = desc.op_flags & abi::IO_F_FUA != 0;
    let done = done.clone();
    let waker = Arc::clone(waker);
    let reply = if op == abi::OP_WRITE { result } else { 0 };
    device.submit(
        WriteOp { offset, kind, fua },
        Box::new(move |r| {
            let _ = done.send((tag, r.map_or_else(failed, |()| reply)));
            let _ = waker.write(1);
        }),
    );
    Action::Submitted
}
