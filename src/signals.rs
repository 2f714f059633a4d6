//! Stopping a daemon (`hindsight engine`, `hindsight target`) or an export on SIGTERM or
//! SIGINT, with a log line that says so.
//!
//! The signals are blocked in the main thread before the daemon starts any thread, so every
//! thread inherits the mask and only the `signals` thread, waiting in `sigwait`, receives them.
//! Stopping at any moment loses nothing: a write is acknowledged only once it is durable in the
//! journal, and each daemon checks its journal's tail when it starts, as after a crash.

use nix::sys::signal::{SigSet, Signal};

/// Blocks SIGTERM and SIGINT for this thread and the threads it starts from now on; returns
/// the set to wait for them with (`SigSet::wait`).
pub fn block_stop_signals() -> std::io::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Blocks SIGTERM and SIGINT for this thread and the threads it starts from now on, and starts
/// the thread that logs which signal stopped `daemon` and ends the process with status 0.
pub fn stop_on_signals(daemon: &'static str) -> std::io::Result<()> {
    let set = block_stop_signals()?;
    std::thread::Builder::new().name("signals".into()).spawn(move || match set.wait() {
        Ok(signal) => {
            log::info!("{daemon}: {signal} received: stopping (every acknowledged write is already durable in the journal)");
            std::process::exit(0);
        }
        Err(e) => log::warn!("{daemon}: waiting for SIGTERM failed ({e}); the signal now ends the process without a log line"),
    })?;
    Ok(())
}
