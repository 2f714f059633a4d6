//! Joining the parts of one request (the engine writes and the local write): the part that
//! finishes last runs the front end's completion, exactly once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use hindsight_consistency::sync::lock;

use crate::block::{BlockError, Completion};

/// Joins the parts of one request: counts them down and keeps the first error; the part that
/// finishes last runs the completion.
pub(super) struct Join {
    left: AtomicU32,
    error: OnceLock<BlockError>,
    done: Mutex<Option<Completion>>,
    /// Set when an engine part failed but the guest is served anyway (dirty tracking).
    pub(super) unreplicated: Arc<std::sync::atomic::AtomicBool>,
    /// The largest sequence number the engine gave a part (0 before any).
    pub(super) seq: Arc<std::sync::atomic::AtomicU64>,
}

impl Join {
    pub(super) fn new(parts: u32, done: Completion) -> Join {
        Join {
            left: AtomicU32::new(parts),
            error: OnceLock::new(),
            done: Mutex::new(Some(done)),
            unreplicated: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            seq: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    pub(super) fn finish(&self, result: Result<(), BlockError>) {
        if let Err(e) = result {
            let _ = self.error.set(e);
        }
        // AcqRel: the last part sees every earlier part's error.
        let left = self.left.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(left > 0, "a part of a request finished more than once");
        if left != 1 {
            return;
        }
        let done = lock(&self.done).take();
        if let Some(done) = done {
            done(match self.error.get() {
                Some(&e) => Err(e),
                None => Ok(()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Results = Arc<Mutex<Vec<Result<(), BlockError>>>>;

    fn recorder() -> (Results, Completion) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = Arc::clone(&got);
        (got, Box::new(move |r| lock(&g).push(r)))
    }

    #[test]
    fn join_completes_once_after_the_last_part() {
        let (got, done) = recorder();
        let j = Join::new(2, done);
        j.finish(Ok(()));
        assert!(lock(&got).is_empty());
        j.finish(Ok(()));
        assert_eq!(*lock(&got), vec![Ok(())]);
    }

    #[test]
    fn join_reports_the_first_error_whichever_part_is_last() {
        let (got, done) = recorder();
        let j = Join::new(3, done);
        j.finish(Err(BlockError::NoSpace));
        j.finish(Err(BlockError::Io));
        j.finish(Ok(()));
        assert_eq!(*lock(&got), vec![Err(BlockError::NoSpace)]);
    }
}
