//! Quiescing the VM for an application-consistent bookmark.
//!
//! On the engine's `Quiesce` the agent freezes the file systems named in agent.toml
//! (`fsfreeze --freeze`, which flushes them and holds new writes) or runs the configured
//! `pre_quiesce` script, and answers. Every write issued before the freeze has then completed,
//! so it is acknowledged and numbered: the engine's bookmark lands after all of them. On
//! `Thaw` (or, if it never comes, by itself shortly after the engine's timeout) the agent runs
//! `fsfreeze --unfreeze` or `post_quiesce`: a guest never stays frozen.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hindsight_consistency::config::QuiesceConfig;
use hindsight_consistency::sync::lock;
use log::{info, warn};

/// How long one freeze or thaw command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to the engine's quiesce timeout before the agent thaws on its own.
const SELF_THAW_MARGIN: Duration = Duration::from_secs(5);

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
    pub fn freeze(self: &Arc<Self>, id: u64, engine_timeout: Duration) -> Result<(), String> {
        let mut frozen = lock(&self.frozen);
        if let Some(other) = *frozen {
            return Err(format!("already quiesced for another bookmark (quiesce {other})"));
        }
        match (&self.config.pre, self.config.freeze.is_empty()) {
            (Some(script), _) => run(Command::new(script).arg("freeze"), "pre_quiesce")?,
            (None, true) => return Err("agent.toml names no file system to freeze (agent.freeze) and no pre_quiesce script".into()),
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
fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| format!("{what}: cannot start: {e}"))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return Err(format!("{what} failed ({status}): {}", err.trim()));
            }
            Ok(None) if start.elapsed() > COMMAND_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {COMMAND_TIMEOUT:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}
