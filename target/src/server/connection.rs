//! An engine connection's handshake, on a thread of its own while it lasts: TLS, the engine's
//! certificate checked against `tls.engines`, its `TargetHello` checked, the group found (or
//! created) and claimed, the hello accepted and `TargetWelcome` sent; then the records stream
//! is handed to the receive pool ([`super::stream`]) and the thread ends.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use hindsight_consistency::config::{check_name, EngineTrust, JournalFull};
use hindsight_consistency::error_chain;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::{AcceptError, ElasticReader, Peer, Role, TransportError};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, FrameError, FrameType, TargetHello, TargetWelcome, LZ4, PROTOCOL_VERSION,
};

use super::shared::{ConnClose, GroupEntry, Shared};
use super::stream::{send_error, start_receiving, Receiving};
use crate::error::{AuthoriseError, CheckHelloError, GroupForHelloError};
use crate::group::Group;
use crate::layout::GroupPaths;
use crate::meta::GroupMeta;
use crate::model::Volume;

/// Most of the socket read buffer: big enough to see that several frames are already waiting
/// (it grows to this only while the engine sends; an idle connection gives it back).
const READ_BUFFER: usize = 2 << 20;
/// A peer that takes longer than this to accept our bytes is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl Shared {
    /// The group named in a hello, created if it is new.
    fn group_for_hello(&self, hello: &TargetHello, volumes: &[Volume]) -> Result<Arc<Group>, GroupForHelloError> {
        let mut groups = lock(&self.groups);
        match groups.get(&hello.group) {
            Some(GroupEntry::Ready(g)) => return Ok(Arc::clone(g)),
            Some(GroupEntry::Broken(why)) => return Err(GroupForHelloError::Broken { group: hello.group.clone(), why: why.clone() }),
            Some(GroupEntry::FailedOver(why)) => return Err(GroupForHelloError::FailedOver { why: why.clone() }),
            None => {}
        }
        let paths = GroupPaths::new(&self.config.data_dir, &hello.group);
        let meta = GroupMeta::new(hello.engine.clone(), volumes.to_vec());
        match Group::create(Arc::clone(&self.fs), paths, &hello.group, meta, self.opts) {
            Ok(g) => {
                let g = Arc::new(g);
                groups.insert(hello.group.clone(), GroupEntry::Ready(Arc::clone(&g)));
                Ok(g)
            }
            Err(source) => {
                log::error!("group {:?}: cannot be created: {}", hello.group, error_chain(&source));
                Err(GroupForHelloError::Create { group: hello.group.clone(), source: Box::new(source) })
            }
        }
    }
}

/// Which engine a connection is, if its certificate lets it ship here: `Ok(None)` on
/// plaintext (nobody is authenticated), `Ok(Some(name))` for a trusted engine.
fn authorise_engine(peer: &Peer, trust: &EngineTrust) -> Result<Option<String>, AuthoriseError> {
    let Peer::Certified(id) = peer else { return Ok(None) };
    let mut names = id.names(Role::Engine);
    let Some(first) = names.next() else {
        return Err(AuthoriseError::NotAnEngine { certificate: id.to_string() });
    };
    match trust {
        EngineTrust::AnyCertified => Ok(Some(first.to_owned())),
        EngineTrust::Named(allowed) => match std::iter::once(first).chain(names).find(|n| allowed.iter().any(|a| a == n)) {
            Some(n) => Ok(Some(n.to_owned())),
            None => Err(AuthoriseError::NotTrusted { engine: first.to_owned(), allowed: allowed.clone() }),
        },
    }
}

/// Runs the handshake of connection `id` (its key in `shared.conns`). Returns true if the
/// connection was handed to the receive pool, which removes it from `conns` when it ends.
pub(super) fn serve_connection(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64) -> bool {
    let setup =
        stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true)).and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        log::warn!("engine connection from {peer}: socket setup failed: {e}");
        return false;
    }
    let conn = match shared.config.security.accept(stream) {
        Ok(c) => c,
        Err(AcceptError::Plaintext(mut c)) => {
            log::warn!("engine connection from {peer} refused: it does not use TLS, and this target requires it; nothing it sent is read");
            send_error(&mut c, "this target requires TLS: give [tls] ca, cert and key in engine.toml (docs/security.md)");
            c.close();
            return false;
        }
        Err(AcceptError::Failed(TransportError::ClosedEarly)) => return false,
        Err(AcceptError::Failed(e)) => {
            log::warn!("engine connection from {peer} refused: {e}; nothing is accepted from it");
            return false;
        }
    };
    let certified = conn.peer().clone();
    let (read_half, mut writer) = conn.split();
    // From here a stop closes the connection through its halves: the handshake's duplicate of
    // the socket goes.
    lock(&shared.conns).insert(id, ConnClose::Open(writer.closer()));
    // Shuts the reading side to wake the receiving task if the group is poisoned meanwhile.
    let waker = writer.closer();
    if let Err(e) = writer.set_write_timeout(Some(WRITE_TIMEOUT)) {
        log::warn!("engine connection from {peer}: socket setup failed: {e}");
        return false;
    }
    let engine_name = match authorise_engine(&certified, &shared.config.engines) {
        Ok(n) => n,
        Err(why) => {
            log::warn!("engine connection from {peer} refused: {why}");
            send_error(&mut writer, &why.to_string());
            writer.close();
            return false;
        }
    };
    let mut reader = ElasticReader::new(read_half, READ_BUFFER);
    let mut payload = Vec::new();

    let hello = match read_frame(&mut reader, &mut payload) {
        Ok(FrameType::TargetHello) => match decode_message::<TargetHello>("TargetHello", &payload) {
            Ok(h) => h,
            Err(e) => {
                log::warn!("engine connection from {peer}: {e}");
                send_error(&mut writer, &e.to_string());
                return false;
            }
        },
        Ok(other) => {
            let e = FrameError::Unexpected { got: other, expected: "TargetHello" };
            log::warn!("engine connection from {peer}: {e}");
            send_error(&mut writer, &e.to_string());
            return false;
        }
        Err(FrameError::Closed) => return false,
        Err(e) => {
            log::warn!("engine connection from {peer}: {e}");
            return false;
        }
    };
    if let Some(name) = &engine_name {
        if &hello.engine != name {
            let why = format!("the hello names engine {:?} but its certificate names engine {name:?}; nothing was written", hello.engine);
            log::warn!("engine connection from {peer} refused: {why}");
            send_error(&mut writer, &why);
            return false;
        }
    }
    let volumes = match check_hello(&hello) {
        Ok(v) => v,
        Err(why) => {
            log::warn!("engine {} at {peer}: hello refused: {why}", hello.engine);
            send_error(&mut writer, &why.to_string());
            return false;
        }
    };
    let group = match shared.group_for_hello(&hello, &volumes) {
        Ok(g) => g,
        Err(why) => {
            send_error(&mut writer, &why.to_string());
            return false;
        }
    };
    let close = writer.closer();
    let claim = match group.claim(&hello.engine, hello.owner, Box::new(move || close.shutdown_read())) {
        Ok(c) => c,
        Err(why) => {
            log::warn!("engine {} at {peer}: {why}; refused", hello.engine);
            send_error(&mut writer, &why.to_string());
            return false;
        }
    };
    // Cleared when the claim is dropped.
    group.on_poison(Some(Box::new(move || waker.shutdown_read())));
    let policy = match JournalFull::parse(&hello.on_journal_full) {
        Some(p) => p,
        None => {
            let why = format!(
                "group {:?}: on_journal_full {:?} is not a policy this target knows; run matching hindsight versions",
                hello.group, hello.on_journal_full
            );
            log::warn!("engine {} at {peer}: hello refused: {why}", hello.engine);
            send_error(&mut writer, &why);
            return false;
        }
    };
    let durable = match group.accept_hello(&hello.engine, &volumes, policy, (hello.epoch, hello.owner)) {
        Ok(d) => d,
        Err(why) => {
            log::warn!("engine {} at {peer}: hello for group {:?} refused: {why}", hello.engine, hello.group);
            send_error(&mut writer, &why.to_string());
            return false;
        }
    };
    let mut scratch = Vec::new();
    // The first compression offered that this target knows.
    let compression = hello.compression.iter().find(|c| c.as_str() == LZ4).cloned().unwrap_or_default();
    let welcome = encode_message(&TargetWelcome { protocol: PROTOCOL_VERSION, durable_seq: durable, compression: compression.clone() });
    if let Err(e) = write_frame(&mut writer, FrameType::TargetWelcome, &welcome, &mut scratch) {
        log::warn!("engine {} at {peer}: sending the welcome: {e}", hello.engine);
        return false;
    }
    let how = if compression.is_empty() { String::new() } else { format!(", {compression}") };
    log::info!("engine {} at {peer} ({certified}) ships group {:?}; resuming after seq {durable}{how}", hello.engine, hello.group);

    let ctx = format!("engine {} at {peer}, group {:?}", hello.engine, hello.group);
    let conn = Receiving {
        shared: Arc::clone(shared),
        group,
        _claim: claim,
        reader,
        writer,
        ctx: ctx.clone(),
        id,
        batch: Vec::new(),
        scratch,
        packed: Vec::new(),
        released: false,
    };
    match start_receiving(conn) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{ctx}: cannot hand the connection to the receive threads ({e}); it is closed");
            false
        }
    }
}

/// Checks what a hello says before anything is created from it.
fn check_hello(h: &TargetHello) -> Result<Vec<Volume>, CheckHelloError> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(CheckHelloError::Protocol { got: h.protocol });
    }
    check_name("group", &h.group).map_err(|reason| CheckHelloError::GroupName { reason: reason.to_string() })?;
    if h.volumes.is_empty() {
        return Err(CheckHelloError::NoVolumes { group: h.group.clone() });
    }
    let mut out: Vec<Volume> = Vec::with_capacity(h.volumes.len());
    for v in &h.volumes {
        check_name("volume", &v.name)
            .map_err(|reason| CheckHelloError::VolumeName { group: h.group.clone(), reason: reason.to_string() })?;
        if v.size == 0 {
            return Err(CheckHelloError::EmptyVolume { group: h.group.clone(), volume: v.name.clone() });
        }
        if out.iter().any(|o| o.name == v.name) {
            return Err(CheckHelloError::DuplicateVolume { group: h.group.clone(), volume: v.name.clone() });
        }
        out.push(Volume { name: v.name.clone(), vm: v.vm.clone(), size: v.size });
    }
    Ok(out)
}
