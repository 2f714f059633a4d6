//! Agent sessions: the handshake, then one thread reading writes into the group journals and
//! one thread writing acknowledgements back.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use hindsight_consistency::region_hash::MAX_HASH_REGIONS;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{AcceptError, Peer, ReadHalf, Role, TransportError, WriteHalf};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, AgentHello, AgentWelcome, BookmarkRequest, ErrorMessage, FrameError,
    FrameType, HashReply, HashRequest, QuiescedMsg, ResyncDoneMsg, ResyncProgressMsg, ResyncStatus, SetModeRequest, StatusRequest,
    TargetHashRequest, WriteAck, WriteMsg, PROTOCOL_VERSION, WRITE_HEADER_LEN,
};

use crate::acks::Acks;
use crate::connection::{refuse, Registry, Session};
use crate::error::HelloError;
use crate::group::{Barrier, GroupHandle, GroupItem, ResyncDone, WriteRequest};
use crate::hashes::HashReplyTo;
use crate::operator::{answer, authorise_bookmark, authorise_operator, place_bookmark, set_mode, status};

/// Read buffer of an agent connection.
const READ_BUFFER: usize = 256 << 10;
/// How long a hello waits for an earlier session of the same volumes to go away (an agent
/// restarted right after it died can arrive before the engine has seen the old connection
/// close).
const ATTACH_WAIT: Duration = Duration::from_secs(5);
/// How long a session refused mid-way waits for its `Error` frame to go out before closing.
const REFUSAL_FLUSH: Duration = Duration::from_secs(2);

/// One disk of a session, by its number in the hello.
struct Disk {
    group: GroupHandle,
    volume: Arc<str>,
    size: u64,
}

/// Runs one agent (or operator) connection to its end: the TLS handshake, the hello, then
/// writes and acknowledgements.
pub fn serve(stream: TcpStream, peer: SocketAddr, reg: Arc<Registry>) {
    let _ = stream.set_nodelay(true);
    let conn = match reg.security.accept(stream) {
        Ok(c) => c,
        Err(AcceptError::Plaintext(mut c)) => {
            log::warn!("connection from {peer} refused: it does not use TLS, and this engine requires it; nothing it sent is read");
            // Agents and operator commands both come here, and neither is known before the hello.
            let why = "this engine requires TLS: an agent needs [tls] ca, cert and key in its agent.toml; hindsight status, \
                       set-mode and bookmark need --ca, --cert and --key (or --config engine.toml) instead of \
                       --insecure-plaintext; docs/security.md";
            let _ = write_frame(&mut c, FrameType::Error, &encode_message(&ErrorMessage { message: why.into() }), &mut Vec::new());
            c.close();
            return;
        }
        Err(AcceptError::Failed(TransportError::ClosedEarly)) => return log::debug!("connection from {peer} closed before the handshake"),
        Err(AcceptError::Failed(e)) => return log::warn!("connection from {peer} refused: {e}; nothing is accepted from it"),
    };
    let certified = conn.peer().clone();
    let (read_half, mut writer) = conn.split();
    // Small writes arrive many to a read: buffer them (a 4 KiB write is one copy more, a
    // large one is read past the buffer straight into its payload).
    let mut reader = BufReader::with_capacity(READ_BUFFER, read_half);
    let mut payload = Vec::new();
    let mut scratch = Vec::new();
    let hello: AgentHello = match read_frame(&mut reader, &mut payload) {
        Ok(FrameType::AgentHello) => match decode_message("AgentHello", &payload) {
            Ok(h) => h,
            Err(e) => return refuse(&mut writer, peer, &e.to_string()),
        },
        Ok(FrameType::BookmarkRequest) => {
            return answer(&mut writer, peer, &payload, FrameType::BookmarkReply, |req: &BookmarkRequest| {
                authorise_bookmark(&certified, req, &reg).and_then(|()| place_bookmark(req, &reg))
            })
        }
        Ok(FrameType::StatusRequest) => {
            return answer(&mut writer, peer, &payload, FrameType::StatusReply, |req: &StatusRequest| status(req, &reg));
        }
        Ok(FrameType::SetModeRequest) => {
            return answer(&mut writer, peer, &payload, FrameType::SetModeReply, |req: &SetModeRequest| {
                authorise_operator(&certified, &reg, "changes a group's mode").and_then(|()| set_mode(req, &reg))
            })
        }
        Ok(other) => return refuse(&mut writer, peer, &format!("expected AgentHello, got {other:?}")),
        Err(e) => return log::warn!("agent {peer}: handshake failed: {e}"),
    };
    if let Err(why) = authorise_agent(&certified, &hello.vm) {
        return refuse(&mut writer, peer, &why.to_string());
    }
    let disks = match attach(&hello, &reg) {
        Ok(d) => d,
        Err(why) => return refuse(&mut writer, peer, &why.to_string()),
    };
    let names: Vec<String> = disks.iter().map(|d| d.volume.to_string()).collect();
    let welcome = encode_message(&AgentWelcome { protocol: PROTOCOL_VERSION, engine: reg.name.clone() });
    if let Err(e) = write_frame(&mut writer, FrameType::AgentWelcome, &welcome, &mut scratch) {
        detach(&reg, &names);
        return log::warn!("agent {peer}: {e}");
    }
    log::info!("agent {peer} (vm {}, {certified}) attached volumes {}", hello.vm, names.join(", "));

    let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<Acks>();
    let (control_tx, control_rx) = crossbeam_channel::unbounded::<(FrameType, Vec<u8>)>();
    let session_id = reg.next_id.fetch_add(1, Ordering::Relaxed);
    let groups = disks.iter().map(|d| d.group.config.name.clone()).collect();
    let control = control_tx.clone();
    lock(&reg.sessions).insert(session_id, Session { vm: hello.vm.clone(), groups, control: control_tx });
    let (ack_done_tx, ack_done) = crossbeam_channel::bounded::<()>(0);
    let ack_thread = std::thread::Builder::new().name(format!("acks-{peer}")).spawn(move || {
        ack_loop(writer, ack_rx, control_rx, peer);
        drop(ack_done_tx);
    });
    let out = SessionOut { acks: &ack_tx, control: &control, vm: &hello.vm };
    let end = read_loop(&mut reader, &disks, &out, &mut payload, &reg);
    lock(&reg.sessions).remove(&session_id);
    let refused = match end {
        Ok(()) | Err(SessionEnd::Frame(FrameError::Closed)) => {
            log::info!("agent {peer} (vm {}) disconnected", hello.vm);
            false
        }
        Err(SessionEnd::Frame(e)) => {
            log::warn!("agent {peer} (vm {}): connection closed: {e}", hello.vm);
            false
        }
        Err(SessionEnd::Refused(why)) => {
            log::warn!("agent {peer} (vm {}) refused: {why}", hello.vm);
            let _ = control.send((FrameType::Error, encode_message(&ErrorMessage { message: why })));
            true
        }
    };
    drop(control);
    drop(ack_tx);
    drop(disks);
    if refused {
        // The acknowledgement writer sends the Error and closes; give it a moment before the
        // socket goes.
        let _ = ack_done.recv_timeout(REFUSAL_FLUSH);
    }
    reader.get_ref().shutdown();
    // The volumes are free for the next agent now: every write read from this one is numbered
    // already. (The acknowledgement writer may still wait for sync acknowledgements held until
    // the target confirms; they go nowhere once the socket is shut.)
    detach(&reg, &names);
    if let Ok(t) = ack_thread {
        let _ = t.join();
    }
}

/// An agent may only present the VM its certificate names: the volumes it may write are
/// then those of that VM in engine.toml (checked by `attach`).
fn authorise_agent(peer: &Peer, vm: &str) -> Result<(), HelloError> {
    match peer {
        Peer::Plaintext => Ok(()),
        Peer::Certified(id) if id.is(Role::Agent, vm) => Ok(()),
        Peer::Certified(id) => Err(HelloError::WrongCertificate { certificate: id.to_string(), vm: vm.to_owned() }),
    }
}

/// Checks every disk of the hello against the configuration and marks them attached.
fn attach(hello: &AgentHello, reg: &Registry) -> Result<Vec<Disk>, HelloError> {
    if hello.protocol != PROTOCOL_VERSION {
        return Err(HelloError::Protocol { got: hello.protocol });
    }
    if hello.disks.is_empty() || hello.disks.len() > usize::from(u16::MAX) {
        return Err(HelloError::NoDisks);
    }
    let mut disks = Vec::new();
    for d in &hello.disks {
        let Some(group) = reg.groups.get(&d.group) else {
            let known: Vec<&str> = reg.groups.keys().map(String::as_str).collect();
            return Err(HelloError::UnknownGroup { volume: d.volume.clone(), group: d.group.clone(), known: known.join(", ") });
        };
        let Some(vol) = group.config.volumes.iter().find(|v| v.name == d.volume) else {
            return Err(HelloError::UnknownVolume { volume: d.volume.clone(), group: d.group.clone() });
        };
        if vol.vm != hello.vm {
            return Err(HelloError::OtherVm { volume: d.volume.clone(), owner: vol.vm.clone(), vm: hello.vm.clone() });
        }
        if vol.size != d.size {
            return Err(HelloError::Size { volume: d.volume.clone(), local: d.size, configured: vol.size });
        }
        disks.push(Disk { group: group.clone(), volume: Arc::from(d.volume.as_str()), size: vol.size });
    }
    let deadline = Instant::now() + ATTACH_WAIT;
    let mut attached = lock(&reg.attached);
    while let Some(busy) = disks.iter().find(|d| attached.contains(&*d.volume)) {
        let now = Instant::now();
        if now >= deadline {
            return Err(HelloError::AlreadyAttached { volume: busy.volume.to_string(), vm: hello.vm.clone() });
        }
        attached = reg.detached.wait_timeout(attached, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
    }
    for d in &disks {
        attached.insert(d.volume.to_string());
    }
    Ok(disks)
}

fn detach(reg: &Registry, names: &[String]) {
    let mut attached = lock(&reg.attached);
    for n in names {
        attached.remove(n);
    }
    reg.detached.notify_all();
}

/// Why an agent session's reader stopped.
enum SessionEnd {
    /// The connection ended or a frame was malformed.
    Frame(FrameError),
    /// The agent sent something the engine refuses: it is told why (`Error`) and closed.
    Refused(String),
}

impl From<FrameError> for SessionEnd {
    fn from(e: FrameError) -> SessionEnd {
        SessionEnd::Frame(e)
    }
}

/// Where a session's answers go.
struct SessionOut<'a> {
    /// Acknowledgements.
    acks: &'a crossbeam_channel::Sender<Acks>,
    /// Other frames to the agent (sent between acknowledgements).
    control: &'a crossbeam_channel::Sender<(FrameType, Vec<u8>)>,
    /// The agent's VM.
    vm: &'a str,
}

fn read_loop(
    reader: &mut BufReader<ReadHalf>,
    disks: &[Disk],
    out: &SessionOut<'_>,
    payload: &mut Vec<u8>,
    reg: &Registry,
) -> Result<(), SessionEnd> {
    let (ack_tx, vm) = (out.acks, out.vm);
    loop {
        match read_frame(reader, payload)? {
            FrameType::Write => {}
            FrameType::Quiesced => {
                let m: QuiescedMsg = decode_message("Quiesced", payload)?;
                if let Some(tx) = lock(&reg.quiesce_waits).get(&m.id) {
                    let _ = tx.send((vm.to_owned(), m));
                }
                continue;
            }
            FrameType::ResyncDone => {
                let m: ResyncDoneMsg = decode_message("ResyncDone", payload)?;
                resync_done(&m, disks)?;
                for &n in &m.disks {
                    if let Some(d) = disks.get(usize::from(n)) {
                        lock(&reg.resync_progress).remove(&*d.volume);
                    }
                }
                continue;
            }
            FrameType::ResyncProgress => {
                let m: ResyncProgressMsg = decode_message("ResyncProgress", payload)?;
                if let Some(d) = disks.get(usize::from(m.disk)) {
                    // While regions are being compared, what is left is the compare sweep.
                    let left_regions =
                        if m.compare_total > m.compared { m.compare_total - m.compared } else { m.total - m.done.min(m.total) };
                    let eta_s = (left_regions << 20).checked_div(m.bytes_per_s).unwrap_or(0);
                    let status = ResyncStatus {
                        volume: d.volume.to_string(),
                        done: m.done,
                        total: m.total,
                        bytes_per_s: m.bytes_per_s,
                        eta_s,
                        compare_total: m.compare_total,
                        compared: m.compared,
                        differ: m.differ,
                    };
                    let mut progress = lock(&reg.resync_progress);
                    if m.compare_total > 0 && m.compared >= m.compare_total && m.done >= m.total {
                        // A compare sweep that is done and sent everything that differed: a
                        // resync point follows only if something was sent.
                        progress.remove(&*d.volume);
                    } else {
                        progress.insert(d.volume.to_string(), status);
                    }
                }
                continue;
            }
            FrameType::HashRequest => {
                let m: HashRequest = decode_message("HashRequest", payload)?;
                hash_request(m, disks, out.control, reg)?;
                continue;
            }
            other => {
                return Err(
                    FrameError::Unexpected { got: other, expected: "Write, Quiesced, ResyncDone, ResyncProgress or HashRequest" }.into()
                )
            }
        }
        let (msg, _) = WriteMsg::decode(payload)?;
        let Some(disk) = disks.get(usize::from(msg.disk)) else {
            log::warn!("write to unknown disk number {}", msg.disk);
            let _ = ack_tx.send(vec![WriteAck { req_id: msg.req_id, seq: 0, status: WriteAck::EINVAL }]);
            continue;
        };
        if msg.offset.checked_add(u64::from(msg.length)).is_none_or(|end| end > disk.size) {
            log::warn!("volume {}: write at {} length {} is past the end ({})", disk.volume, msg.offset, msg.length, disk.size);
            let _ = ack_tx.send(vec![WriteAck { req_id: msg.req_id, seq: 0, status: WriteAck::EINVAL }]);
            continue;
        }
        if disk.group.shared.poisoned.load(Ordering::Relaxed) {
            let _ = ack_tx.send(vec![WriteAck { req_id: msg.req_id, seq: 0, status: WriteAck::EIO }]);
            continue;
        }
        let req = WriteRequest {
            req_id: msg.req_id,
            volume: disk.volume.clone(),
            kind: msg.kind,
            offset: msg.offset,
            length: msg.length,
            payload: std::mem::take(payload),
            data_at: WRITE_HEADER_LEN,
            ack: ack_tx.clone(),
        };
        if disk.group.send(GroupItem::Write(req)).is_err() {
            return Err(FrameError::Peer("the engine is shutting down".into()).into());
        }
    }
}

/// Passes an agent's hash request on: through the group's journal channel (a barrier, which
/// gives the `through_seq` every record sent before it is under), then to the group's
/// shipper. The answer, or `Unavailable` with the reason, goes back on `control`.
fn hash_request(
    m: HashRequest,
    disks: &[Disk],
    control: &crossbeam_channel::Sender<(FrameType, Vec<u8>)>,
    reg: &Registry,
) -> Result<(), SessionEnd> {
    let id = m.id;
    let control = control.clone();
    let reply: HashReplyTo = Box::new(move |r: HashReply| {
        let _ = control.send((FrameType::HashReply, encode_message(&HashReply { id, ..r })));
    });
    let Some(disk) = disks.get(usize::from(m.disk)) else {
        reply(HashReply::unavailable(id, format!("the hello has no disk number {}", m.disk)));
        return Ok(());
    };
    if m.regions.is_empty() || m.regions.len() > MAX_HASH_REGIONS {
        reply(HashReply::unavailable(id, format!("a hash request names 1 to {MAX_HASH_REGIONS} regions, not {}", m.regions.len())));
        return Ok(());
    }
    let broker = match reg.hashes.get(&disk.group.config.name) {
        Some(b) if b.is_connected() => Arc::clone(b),
        _ => {
            reply(HashReply::unavailable(id, format!("group {}: the engine is not connected to the target", disk.group.config.name)));
            return Ok(());
        }
    };
    let mut req =
        TargetHashRequest { id, volume: disk.volume.to_string(), region_shift: m.region_shift, regions: m.regions, through_seq: 0 };
    let barrier = Barrier::new(move |through| match through {
        Ok(seq) => {
            req.through_seq = seq;
            broker.submit(req, reply);
        }
        Err(why) => reply(HashReply::unavailable(id, why.to_string())),
    });
    if disk.group.send(GroupItem::Barrier(barrier)).is_err() {
        return Err(FrameError::Peer("the engine is shutting down".into()).into());
    }
    Ok(())
}

/// Passes the end of a resync to the group of each disk named, once per group, on the same
/// channel as the session's writes: the resync point follows every write read before it.
/// Nothing is passed on if any disk number is not one of the hello's.
fn resync_done(m: &ResyncDoneMsg, disks: &[Disk]) -> Result<(), SessionEnd> {
    if m.disks.is_empty() {
        return Err(SessionEnd::Refused("ResyncDone names no disk; name the disk numbers of the hello whose resync completed".into()));
    }
    let mut groups: Vec<(&GroupHandle, Vec<Arc<str>>)> = Vec::new();
    for &n in &m.disks {
        let Some(disk) = disks.get(usize::from(n)) else {
            return Err(SessionEnd::Refused(format!(
                "ResyncDone names disk number {n}, but the hello had {} disk(s) (numbers 0 to {}); no resync point was placed",
                disks.len(),
                disks.len() - 1
            )));
        };
        match groups.iter_mut().find(|(g, _)| g.config.name == disk.group.config.name) {
            Some((_, volumes)) if volumes.contains(&disk.volume) => {}
            Some((_, volumes)) => volumes.push(Arc::clone(&disk.volume)),
            None => groups.push((&disk.group, vec![Arc::clone(&disk.volume)])),
        }
    }
    for (group, volumes) in groups {
        if group.send(GroupItem::ResyncDone(ResyncDone { volumes })).is_err() {
            return Err(FrameError::Peer("the engine is shutting down".into()).into());
        }
    }
    Ok(())
}

/// Writes acknowledgements, batching whatever is queued into one socket write, and the
/// session's control frames between them: the only writer of the socket. An `Error` control
/// frame is the last thing sent: the connection is closed after it.
fn ack_loop(w: WriteHalf, rx: Receiver<Acks>, mut control: Receiver<(FrameType, Vec<u8>)>, peer: SocketAddr) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut scratch = Vec::new();
    loop {
        buf.clear();
        let first = crossbeam_channel::select! {
            recv(rx) -> a => match a {
                Ok(a) => Some(a),
                Err(_) => {
                    // The session ended: a refusal may still wait in the control queue.
                    if let Some((FrameType::Error, payload)) = control.try_iter().find(|(t, _)| *t == FrameType::Error) {
                        send_error(&w, &payload, peer);
                    }
                    return;
                }
            },
            recv(control) -> c => {
                match c {
                    Ok((FrameType::Error, payload)) => return send_error(&w, &payload, peer),
                    Ok((ftype, payload)) => {
                        let _ = write_frame(&mut buf, ftype, &payload, &mut scratch);
                    }
                    // The session is gone: stop selecting on it (a closed channel is always
                    // ready), and wait for the acknowledgements still due.
                    Err(_) => control = crossbeam_channel::never(),
                }
                None
            }
        };
        for ack in first.into_iter().chain(rx.try_iter().take(64)).flatten() {
            if write_frame(&mut buf, FrameType::WriteAck, &ack.encode(), &mut scratch).is_err() {
                return;
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = w.send(&buf) {
            log::debug!("agent {peer}: cannot send acknowledgements: {e}");
            w.shutdown();
            return;
        }
    }
}

/// Sends an `Error` frame and closes the connection (the agent reads everything before it).
fn send_error(w: &WriteHalf, payload: &[u8], peer: SocketAddr) {
    let mut frame = Vec::new();
    let _ = write_frame(&mut frame, FrameType::Error, payload, &mut Vec::new());
    if let Err(e) = w.send(&frame) {
        log::debug!("agent {peer}: cannot send the refusal: {e}");
    }
    w.close();
}
