//! Shipping a group's journal to its target, in order, and learning what the target holds.
//!
//! One thread per group. It connects, says hello, learns the target's durable sequence number
//! and resumes right after it, reading the engine's own journal (never past what is durable
//! here: the target must never hold a write the engine could lose). A second thread per
//! connection reads the target's confirmations; the journal thread deletes segments once
//! they are confirmed.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hindsight_consistency::journal::JournalReader;
use hindsight_consistency::storage::Storage;
use hindsight_consistency::transport::{Connection, Role, Security, WriteHalf};
use hindsight_consistency::wire::{
    decode_confirm, decode_message, encode_message, read_frame, write_frame, ErrorMessage, FrameType, TargetHello, TargetWelcome,
    VolumeInfo, PROTOCOL_VERSION,
};

use crate::group::GroupHandle;

/// Records are packed into frames of about this size.
const FRAME_TARGET_BYTES: usize = 1 << 20;
/// How long a small batch waits for more records before it is sent.
const SHIP_GATHER: Duration = Duration::from_millis(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a shipper needs.
pub struct Shipper {
    /// The group.
    pub group: GroupHandle,
    /// Its journal directory.
    pub journal_dir: PathBuf,
    /// File system.
    pub fs: Arc<dyn Storage>,
    /// Engine name for the target's logs.
    pub engine_name: String,
    /// How the link to the target is protected.
    pub security: Security,
}

impl Shipper {
    /// Ships until the group stops.
    pub fn run(self) {
        let mut backoff = BACKOFF_MIN;
        let mut last_problem = String::new();
        while !self.group.shared.stopping.load(Ordering::Relaxed) {
            match self.session() {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(problem) => {
                    // Say it once, not every retry.
                    if problem != last_problem {
                        log::warn!("group {}: shipping to {}: {problem}; retrying", self.group.config.name, self.group.config.target);
                        last_problem = problem;
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Connects and runs the TLS handshake: the target's certificate must be valid for the
    /// group's `target_server_name` and name a target.
    fn connect(&self) -> Result<Connection, String> {
        let cfg = &self.group.config;
        let target = &cfg.target;
        let addrs = target.to_socket_addrs().map_err(|e| format!("cannot resolve {target}: {e}"))?;
        let mut last = String::from("no address");
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return self.security.connect(s, &cfg.target_server_name, Role::Target).map_err(|e| e.to_string());
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("cannot connect: {last}"))
    }

    /// One connection: handshake, then ship until it breaks.
    fn session(&self) -> Result<(), String> {
        let cfg = &self.group.config;
        let (mut r, mut w) = self.connect()?.split();
        let mut scratch = Vec::new();
        let hello = TargetHello {
            protocol: PROTOCOL_VERSION,
            engine: self.engine_name.clone(),
            group: cfg.name.clone(),
            volumes: cfg.volumes.iter().map(|v| VolumeInfo { name: v.name.clone(), vm: v.vm.clone(), size: v.size }).collect(),
        };
        write_frame(&mut w, FrameType::TargetHello, &encode_message(&hello), &mut scratch).map_err(|e| e.to_string())?;
        let mut payload = Vec::new();
        let welcome: TargetWelcome = match read_frame(&mut r, &mut payload).map_err(|e| e.to_string())? {
            FrameType::TargetWelcome => decode_message("TargetWelcome", &payload).map_err(|e| e.to_string())?,
            FrameType::Error => {
                let m: ErrorMessage = decode_message("Error", &payload).map_err(|e| e.to_string())?;
                return Err(format!("target refused: {}", m.message));
            }
            other => return Err(format!("unexpected {other:?} frame in handshake")),
        };
        let shared = &self.group.shared;
        let durable_here = shared.durable();
        if welcome.durable_seq > durable_here {
            let msg = format!(
                "the target holds up to seq {} but this engine only up to seq {durable_here}: the engine's journal was lost or replaced; nothing is shipped",
                welcome.durable_seq
            );
            log::error!("group {}: {msg}", cfg.name);
            return Err(msg);
        }
        let from = welcome.durable_seq + 1;
        let mut reader = JournalReader::open(self.fs.clone(), &self.journal_dir, from).map_err(|e| {
            format!("the target needs seq {from} on, but the engine no longer has it ({e}); the target must be resynchronised")
        })?;
        shared.confirmed.fetch_max(welcome.durable_seq, Ordering::AcqRel);
        log::info!("group {}: shipping to {} from seq {from} (engine durable seq {durable_here})", cfg.name, cfg.target);

        let broken = Arc::new(AtomicBool::new(false));
        let confirm_thread = {
            let shared = shared.clone();
            let broken = broken.clone();
            let group = cfg.name.clone();
            std::thread::Builder::new()
                .name(format!("confirm-{group}"))
                .spawn(move || {
                    let mut payload = Vec::new();
                    loop {
                        match read_frame(&mut r, &mut payload) {
                            Ok(FrameType::Confirm) => match decode_confirm(&payload) {
                                Ok(seq) => {
                                    shared.confirmed.fetch_max(seq, Ordering::AcqRel);
                                }
                                Err(e) => {
                                    log::warn!("group {group}: bad confirmation: {e}");
                                    break;
                                }
                            },
                            Ok(FrameType::Error) => {
                                let m = decode_message::<ErrorMessage>("Error", &payload).map(|m| m.message).unwrap_or_default();
                                log::error!("group {group}: the target reported: {m}");
                                break;
                            }
                            Ok(other) => {
                                log::warn!("group {group}: unexpected {other:?} frame from the target");
                                break;
                            }
                            Err(e) => {
                                log::debug!("group {group}: target connection: {e}");
                                break;
                            }
                        }
                    }
                    broken.store(true, Ordering::Release);
                    r.shutdown();
                })
                .map_err(|e| e.to_string())?
        };

        let result = self.ship(&mut reader, &mut w, &broken);
        w.shutdown();
        let _ = confirm_thread.join();
        result
    }

    fn ship(&self, reader: &mut JournalReader, w: &mut WriteHalf, broken: &AtomicBool) -> Result<(), String> {
        let shared = &self.group.shared;
        let mut frame = Vec::with_capacity(FRAME_TARGET_BYTES + (1 << 20));
        let mut scratch = Vec::with_capacity(FRAME_TARGET_BYTES + (1 << 20));
        loop {
            if broken.load(Ordering::Acquire) {
                return Err("the target closed the connection".into());
            }
            if shared.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
            let durable = shared.durable();
            frame.clear();
            while frame.len() < FRAME_TARGET_BYTES {
                match reader.next_raw_upto(durable).map_err(|e| format!("reading the journal: {e}"))? {
                    Some((_, raw)) => frame.extend_from_slice(raw),
                    None => break,
                }
            }
            if frame.is_empty() {
                if reader.next_seq() <= durable {
                    // Durable but not readable yet: a segment is being created right now.
                    std::thread::sleep(Duration::from_millis(1));
                } else {
                    shared.wait_durable_after(durable, Duration::from_millis(200));
                }
                continue;
            }
            if frame.len() < FRAME_TARGET_BYTES / 4 {
                // A small batch: give the next group commits a moment to join it, so that the
                // target commits (one fdatasync each) a few hundred times a second at most
                // instead of once per engine commit. This adds at most SHIP_GATHER to the lag.
                let deadline = std::time::Instant::now() + SHIP_GATHER;
                let mut seen = durable;
                while frame.len() < FRAME_TARGET_BYTES {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        break;
                    }
                    seen = shared.wait_durable_after(seen, deadline - now);
                    while frame.len() < FRAME_TARGET_BYTES {
                        match reader.next_raw_upto(seen).map_err(|e| format!("reading the journal: {e}"))? {
                            Some((_, raw)) => frame.extend_from_slice(raw),
                            None => break,
                        }
                    }
                }
            }
            write_frame(w, FrameType::Records, &frame, &mut scratch).map_err(|e| format!("sending: {e}"))?;
        }
    }
}
