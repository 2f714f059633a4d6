//! Quiescing the VM for an application-consistent bookmark.
//!
//! On the engine's `Quiesce` the agent freezes the file systems named in agent.toml
//! (`fsfreeze --freeze`, which flushes them and holds new writes) or runs the configured
//! `pre_quiesce` script, and answers. Every write issued before the freeze has then completed,
//! so it is acknowledged and numbered: the engine's bookmark lands after all of them. On
//! `Thaw` (or, if it never comes, by itself shortly after the engine's timeout) the agent runs
//! `fsfreeze --unfreeze` or `post_quiesce`: a guest never stays frozen.

use std::io;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hindsight_consistency::config::QuiesceConfig;
use hindsight_consistency::sync::lock;
use log::{info, warn};
use thiserror::Error;

/// How long one freeze or thaw command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to the engine's quiesce timeout before the agent thaws on its own.
const SELF_THAW_MARGIN: Duration = Duration::from_secs(5);

/// Why a quiesce (or the thaw after it) failed; the text goes to the engine with the refusal.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QuiesceError {
    /// Another quiesce still holds the VM frozen.
    #[error("already quiesced for another bookmark (quiesce {other})")]
    AlreadyQuiesced {
        /// The quiesce holding it.
        other: u64,
    },
    /// agent.toml says neither what to freeze nor which script to run.
    #[error("agent.toml names no file system to freeze (agent.freeze) and no pre_quiesce script")]
    NothingToFreeze,
    /// A freeze or thaw command could not be started.
    #[error("{what}: cannot start: {source}")]
    Start {
        /// The command.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A freeze or thaw command exited with a failure.
    #[error("{what} failed ({status}): {stderr}")]
    Exit {
        /// The command.
        what: String,
        /// How it exited.
        status: ExitStatus,
        /// What it wrote to its standard error, trimmed.
        stderr: String,
    },
    /// A freeze or thaw command ran past its time and was killed.
    #[error("{what} did not finish within {limit:?}")]
    Timeout {
        /// The command.
        what: String,
        /// How long it was given.
        limit: Duration,
    },
    /// Waiting for a freeze or thaw command failed.
    #[error("{what}: {source}")]
    Wait {
        /// The command.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Freezes and thaws the VM as agent.toml says.
#[derive(Debug)]
pub struct Quiescer {
    config: QuiesceConfig,
    /// The quiesce currently holding the VM frozen.
    frozen: Mutex<Option<u64>>,
}

impl Quiescer {
    /// A quiescer for this configuration.
    pub fn new(config: QuiesceConfig) -> Arc<Quiescer> {
        Arc::new(Quiescer { config, frozen: Mutex::new(None) })
    }

    /// Quiesces for quiesce `id`; on success the VM stays frozen until [`Quiescer::thaw`]
    /// or `engine_timeout` plus a margin, whichever comes first.
    pub fn freeze(self: &Arc<Self>, id: u64, engine_timeout: Duration) -> Result<(), QuiesceError> {
        let mut frozen = lock(&self.frozen);
        if let Some(other) = *frozen {
            return Err(QuiesceError::AlreadyQuiesced { other });
        }
        match (&self.config.pre, self.config.freeze.is_empty()) {
            (Some(script), _) => run(Command::new(script).arg("freeze"), "pre_quiesce")?,
            (None, true) => return Err(QuiesceError::NothingToFreeze),
            (None, false) => {
                for (i, m) in self.config.freeze.iter().enumerate() {
                    if let Err(e) = run(Command::new("fsfreeze").arg("--freeze").arg(m), &format!("fsfreeze --freeze {}", m.display())) {
                        // Never leave part of the VM frozen.
                        for done in &self.config.freeze[..i] {
                            thaw_mount(done);
                        }
                        return Err(e);
                    }
                }
            }
        }
        *frozen = Some(id);
        info!("quiesced for bookmark (quiesce {id})");
        let me = Arc::clone(self);
        let limit = engine_timeout + SELF_THAW_MARGIN;
        let _ = std::thread::Builder::new().name("self-thaw".into()).spawn(move || {
            std::thread::sleep(limit);
            if *lock(&me.frozen) == Some(id) {
                warn!("no thaw from the engine within {limit:?} after quiesce {id}; thawing now");
                me.thaw(id);
            }
        });
        Ok(())
    }

    /// Ends quiesce `id` (nothing if it is not the one holding the VM).
    pub fn thaw(&self, id: u64) {
        let mut frozen = lock(&self.frozen);
        if *frozen != Some(id) {
            return;
        }
        match &self.config.post {
            Some(script) => {
                if let Err(e) = run(Command::new(script).arg("thaw"), "post_quiesce") {
                    warn!("{e}");
                }
            }
            None => {
                for m in &self.config.freeze {
                    thaw_mount(m);
                }
            }
        }
        *frozen = None;
        info!("thawed (quiesce {id})");
    }
}

fn thaw_mount(m: &Path) {
    if let Err(e) = run(Command::new("fsfreeze").arg("--unfreeze").arg(m), &format!("fsfreeze --unfreeze {}", m.display())) {
        warn!("{e}");
    }
}

/// Runs a command to its end (bounded); an error says what failed.
fn run(cmd: &mut Command, what: &str) -> Result<(), QuiesceError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| QuiesceError::Start { what: what.to_string(), source })?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(QuiesceError::Exit { what: what.to_string(), status, stderr: err.trim().to_string() });
            }
            Ok(None) if start.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QuiesceError::Timeout { what: what.to_string(), limit: COMMAND_TIMEOUT });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(source) => return Err(QuiesceError::Wait { what: what.to_string(), source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_failed_in_the_words_the_engine_relays() {
        assert_eq!(QuiesceError::AlreadyQuiesced { other: 3 }.to_string(), "already quiesced for another bookmark (quiesce 3)");
        assert_eq!(
            QuiesceError::NothingToFreeze.to_string(),
            "agent.toml names no file system to freeze (agent.freeze) and no pre_quiesce script"
        );
        let failed = run(Command::new("sh").args(["-c", "echo ' no luck ' >&2; exit 3"]), "pre_quiesce").unwrap_err();
        assert_eq!(failed.to_string(), "pre_quiesce failed (exit status: 3): no luck");
        let missing = run(&mut Command::new("/nonexistent/fsfreeze"), "fsfreeze --freeze /x").unwrap_err();
        assert!(missing.to_string().starts_with("fsfreeze --freeze /x: cannot start: "), "{missing}");
        assert!(std::error::Error::source(&missing).is_some());
    }
}
