//! Agent sessions. A connection's first thread does the TLS handshake and reads the hello (or
//! answers an operator's request and ends); an attached agent's session is then two tasks of
//! the engine's link pool, holding no thread while the agent is idle:
//!
//! - `session`: reads writes into the group journals (and resync ends, hash requests,
//!   quiesce answers);
//! - `writer`: writes acknowledgements and the session's other frames back.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use hindsight_consistency::sync::lock;
use hindsight_consistency::tasks::start_reading;
use hindsight_consistency::transport::{AcceptError, ElasticReader, Peer, Role, TransportError};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, AgentHello, AgentWelcome, BookmarkRequest, ErrorMessage, FrameType,
    SetModeRequest, StatusRequest, PROTOCOL_VERSION,
};

use self::session::Session;
use crate::connection::{link_pool, refuse, Registry, Session as SessionEntry};
use crate::error::HelloError;
use crate::group::GroupHandle;
use crate::operator::{answer, authorise_bookmark, authorise_operator, place_bookmark, set_mode, status};

/// Most an agent connection's read buffer grows to.
const READ_BUFFER: usize = 256 << 10;
/// How long a hello waits for an earlier session of the same volumes to go away (an agent
/// restarted right after it died can arrive before the engine has seen the old connection
/// close).
const ATTACH_WAIT: Duration = Duration::from_secs(5);

/// One disk of a session, by its number in the hello.
struct Disk {
    group: GroupHandle,
    volume: Arc<str>,
    size: u64,
}

mod session;
mod writer;

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
    let mut reader = ElasticReader::new(read_half, READ_BUFFER);
    let mut payload = Vec::new();
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
        Err(HelloError::NotOwner { group, owner }) => return redirect(&mut writer, peer, group, owner),
        Err(why) => return refuse(&mut writer, peer, &why.to_string()),
    };
    let names: Vec<String> = disks.iter().map(|d| d.volume.to_string()).collect();
    // Disks whose group this engine took over from an owner that may have acknowledged writes
    // the target lacks: the agent resyncs whatever it still has marked (docs/ha.md).
    let resync = (0..disks.len())
        .filter(|&i| disks[i].group.shared.takeover_pending(&disks[i].volume))
        .map(|i| u16::try_from(i).expect("at most u16::MAX disks, checked in attach"))
        .collect();
    let welcome = encode_message(&AgentWelcome { protocol: PROTOCOL_VERSION, engine: reg.name.clone(), resync });
    if let Err(e) = write_frame(&mut writer, FrameType::AgentWelcome, &welcome, &mut Vec::new()) {
        detach(&reg, &names);
        return log::warn!("agent {peer}: {e}");
    }
    log::info!("agent {peer} (vm {}, {certified}) attached volumes {}", hello.vm, names.join(", "));

    let pool = match link_pool() {
        Ok(p) => p,
        Err(e) => {
            detach(&reg, &names);
            return refuse(&mut writer, peer, &format!("the engine cannot start the session's tasks: {e}"));
        }
    };
    let out = writer::start(pool, writer, peer);
    // Each group tells the session how far the target holds it: the agent keeps a region
    // marked until then (docs/ha.md, "Takeover").
    let mut by_group: Vec<(GroupHandle, Vec<u16>)> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let number = u16::try_from(i).expect("at most u16::MAX disks, checked in attach");
        match by_group.iter_mut().find(|(g, _)| g.same(&d.group)) {
            Some((_, numbers)) => numbers.push(number),
            None => by_group.push((d.group.clone(), vec![number])),
        }
    }
    for (g, numbers) in by_group {
        g.shared.watch(Arc::clone(&out), numbers);
    }
    let id = reg.next_id.fetch_add(1, Ordering::Relaxed);
    let groups = disks.iter().map(|d| d.group.config.name.clone()).collect();
    lock(&reg.sessions).insert(id, SessionEntry { vm: hello.vm.clone(), groups, out: Arc::clone(&out) });
    let socket = reader.get_ref().socket();
    let session = Session {
        reg: Arc::clone(&reg),
        peer,
        vm: hello.vm,
        id,
        names,
        disks,
        reader,
        payload,
        out,
        pending: VecDeque::new(),
        end: None,
        input: false,
        unwoken: Vec::new(),
        unwoken_bytes: 0,
    };
    if let Err(e) = start_reading(pool, &format!("agent-{peer}"), socket, session) {
        log::warn!("agent {peer}: cannot watch the connection ({e}); it is closed");
    }
}

/// Sends an agent to the owner of a group of its hello, and closes.
fn redirect(w: &mut hindsight_consistency::transport::WriteHalf, peer: SocketAddr, group: String, owner: Option<String>) {
    let message = HelloError::NotOwner { group: group.clone(), owner: owner.clone() }.to_string();
    log::info!("agent {peer}: {message}");
    let msg = encode_message(&hindsight_consistency::wire::RedirectMsg { group, engine: owner.unwrap_or_default(), message });
    let _ = write_frame(w, FrameType::Redirect, &msg, &mut Vec::new());
    w.close();
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
        if let Err(owner) = group.shared.ownership.serving() {
            return Err(HelloError::NotOwner { group: d.group.clone(), owner });
        }
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
