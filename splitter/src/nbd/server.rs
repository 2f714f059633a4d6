//! The NBD server: listeners, each with its list of exports, one accept thread for them all.
//!
//! Each new connection negotiates on a short-lived thread of its own, bounded by
//! [`HANDSHAKE_TIMEOUT`] (a client that connects and says nothing holds it no longer than
//! that); once it is in the transmission phase the connection is a task of the process's NBD
//! pool (`connection::start`), which holds no thread while the client sends nothing. The
//! server keeps a handle to each live connection's socket to shut it down at stop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::fs;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use hindsight_consistency::sync::lock;
use hindsight_consistency::transport::ElasticReader;
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::block::BlockDevice;

use super::connection::{self, End};
use super::error::NbdError;
use super::handshake::{self, ExportInfo, Outcome};
use super::proto::MAX_STRING_LEN;
use super::stream::{ReadSide, Stream};

/// How long a client may take over the whole handshake before it is dropped, so that a
/// client that connects and says nothing (or trickles its options) does not hold the
/// handshake's thread for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one reply write may block on a client that does not read its replies. Replies
/// are written from device completions; this bounds how long a stuck client can hold one.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// On shutdown, how long connections get to finish their outstanding requests after their
/// read side is closed, before their sockets are closed outright.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Pause after an accept error such as running out of file descriptors, so the loop does
/// not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Connections accepted from one listener before the others are looked at again.
const ACCEPT_BURST: usize = 16;

/// Where the server listens.
///
/// Written `unix:/path/to.sock` or `tcp:127.0.0.1:10809` (`tcp:[::1]:10809` for IPv6).
/// A unix socket is created with the process umask; restrict access through the directory
/// it lives in or the umask, since anyone who can connect can read and write every export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix-domain socket at this path. A stale socket file left there is replaced.
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port (see [`ServerHandle::listen`]).
    Tcp(SocketAddr),
}

impl FromStr for Listen {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Listen, NbdError> {
        let invalid = |reason| NbdError::InvalidListen { spec: s.to_string(), reason };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid("the socket path is empty"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            return addr.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| invalid("not an IP address and port"));
        }
        Err(invalid("must start with unix: or tcp:"))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// One export: a name clients ask for and the device behind it.
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
}

/// An NBD server for a set of exports on one listener.
///
/// Speaks fixed newstyle negotiation with simple replies; every export accepts READ, WRITE,
/// WRITE_ZEROES, TRIM, FLUSH and FUA, advertises block sizes 1 / 4096 / 32 MiB (minimum /
/// preferred / maximum) and `NBD_FLAG_CAN_MULTI_CONN`. Several servers can run from one accept
/// thread ([`NbdServer::spawn_all`]), each listener with its own exports.
pub struct NbdServer {
    listen: Listen,
    exports: Arc<Vec<Export>>,
}

impl NbdServer {
    /// Checks the exports and prepares a server; nothing is bound until [`NbdServer::spawn`]
    /// or [`NbdServer::run`]. An export named `""` is the default export; otherwise a client
    /// asking for the empty name gets the only export when there is exactly one.
    pub fn new(listen: Listen, exports: Vec<(String, Arc<dyn BlockDevice>)>) -> Result<NbdServer, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::NoExports);
        }
        let mut checked: Vec<Export> = Vec::with_capacity(exports.len());
        for (name, device) in exports {
            let invalid = |reason| NbdError::InvalidExportName { name: name.clone(), reason };
            if name.len() > MAX_STRING_LEN {
                return Err(invalid("longer than the 4096 bytes NBD allows"));
            }
            if name.contains('\0') {
                return Err(invalid("contains a NUL character, which NBD forbids"));
            }
            if checked.iter().any(|e| e.name == name) {
                return Err(NbdError::DuplicateExport(name));
            }
            checked.push(Export { name, device });
        }
        Ok(NbdServer { listen, exports: Arc::new(checked) })
    }

    /// Binds the listener and serves in background threads until
    /// [`ServerHandle::shutdown`] (or the handle is dropped).
    pub fn spawn(self) -> Result<ServerHandle, NbdError> {
        NbdServer::spawn_all(vec![self])
    }

    /// Binds the listener of every server and serves them all from one accept thread (which
    /// waits on every listener at once), a short-lived thread per client handshake, and the
    /// process's NBD pool for the connections in transmission, until
    /// [`ServerHandle::shutdown`] (or the handle is dropped). A client gets the exports of the
    /// listener it connected to. If one listener cannot be bound, none is left bound.
    pub fn spawn_all(servers: Vec<NbdServer>) -> Result<ServerHandle, NbdError> {
        if servers.is_empty() {
            return Err(NbdError::NoExports);
        }
        let wake = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| NbdError::Poll(e.into()))?);
        let mut bound: Vec<Bound> = Vec::with_capacity(servers.len());
        for server in servers {
            match Listener::bind(&server.listen) {
                Ok((listener, listen)) => bound.push(Bound { listener, listen, exports: server.exports }),
                Err(e) => {
                    remove_socket_files(bound.iter().map(|b| &b.listen));
                    return Err(e);
                }
            }
        }
        for b in &bound {
            info!(
                "nbd: listening on {} with exports {}",
                b.listen,
                b.exports.iter().map(|e| format!("{:?} ({} bytes)", e.name, e.device.size())).collect::<Vec<_>>().join(", ")
            );
        }
        let listens: Vec<Listen> = bound.iter().map(|b| b.listen.clone()).collect();
        let state = Arc::new(State::default());
        let (ended_tx, ended) = crossbeam_channel::bounded(0);
        let acceptor = {
            let state = Arc::clone(&state);
            let wake = Arc::clone(&wake);
            thread::Builder::new()
                .name("nbd-accept".to_string())
                .spawn(move || {
                    // Dropped when the loop ends, which is what `ended` reports.
                    let _ended: crossbeam_channel::Sender<Infallible> = ended_tx;
                    accept_loop(&bound, &wake, &state)
                })
                .map_err(|source| {
                    remove_socket_files(listens.iter());
                    NbdError::SpawnThread { name: "nbd-accept".to_string(), source }
                })?
        };
        Ok(ServerHandle { listens, state, wake, acceptor: Some(acceptor), ended })
    }

    /// Binds the listener and serves until the accept loop fails; does not return otherwise.
    pub fn run(self) -> Result<(), NbdError> {
        self.spawn()?.wait()
    }
}

/// Running servers, served by one accept thread. Dropping it shuts them down as
/// [`ServerHandle::shutdown`] does.
pub struct ServerHandle {
    /// Each server's address as bound, in the order given.
    listens: Vec<Listen>,
    state: Arc<State>,
    /// Wakes the accept loop to see the stop flag.
    wake: Arc<EventFd>,
    acceptor: Option<JoinHandle<Result<(), NbdError>>>,
    ended: Receiver<Infallible>,
}

impl ServerHandle {
    /// The address actually bound (with the real port when port 0 was asked for); of the first
    /// server, when there are several.
    pub fn listen(&self) -> &Listen {
        &self.listens[0]
    }

    /// The address each server actually bound, in the order the servers were given.
    pub fn listens(&self) -> &[Listen] {
        &self.listens
    }

    /// Disconnected (a receive returns at once) once the accept loop has ended: on an
    /// unrecoverable error, or at shutdown. Nothing is ever sent on it; select on it, then
    /// [`ServerHandle::wait`] for the error.
    pub fn ended(&self) -> &Receiver<Infallible> {
        &self.ended
    }

    /// Number of client connections currently open.
    pub fn connections(&self) -> usize {
        lock(&self.state.conns).live.len()
    }

    /// Stops accepting, lets every connection finish its outstanding requests (up to
    /// [`SHUTDOWN_GRACE`]), closes them, and removes the unix socket files.
    pub fn shutdown(mut self) -> Result<(), NbdError> {
        self.stop()
    }

    /// Blocks until the accept loop ends (only on an unrecoverable error), then shuts down.
    pub fn wait(mut self) -> Result<(), NbdError> {
        let result = match self.acceptor.take() {
            Some(acceptor) => acceptor.join().unwrap_or(Ok(())),
            None => Ok(()),
        };
        let stopped = self.stop();
        result.and(stopped)
    }

    fn stop(&mut self) -> Result<(), NbdError> {
        if self.state.stopping.swap(true, Ordering::SeqCst) && self.acceptor.is_none() {
            return Ok(());
        }
        let mut result = Ok(());
        if let Some(acceptor) = self.acceptor.take() {
            // The accept loop polls the eventfd with its listeners.
            let woken = self.wake.write(1);
            if woken.is_ok() || acceptor.is_finished() {
                if let Ok(Err(e)) = acceptor.join() {
                    result = Err(e);
                }
            } else if let Err(e) = woken {
                warn!("nbd: could not wake the accept loop ({e}); leaving it");
            }
        }
        stop_connections(&self.state);
        remove_socket_files(self.listens.iter());
        info!("nbd: stopped listening on {}", self.listens.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "));
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            warn!("nbd: {}", hindsight_consistency::error_chain(&e));
        }
    }
}

#[derive(Default)]
struct Conns {
    /// Each open connection's socket, to shut it down on stop.
    live: HashMap<u64, Arc<Stream>>,
    /// The threads of the handshakes under way (and of some that have ended).
    handshakes: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    stopping: AtomicBool,
    conns: Mutex<Conns>,
    closed: Condvar,
}

/// A bound listener and the exports its clients get.
struct Bound {
    listener: Listener,
    listen: Listen,
    exports: Arc<Vec<Export>>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds, non-blocking: the accept loop polls every listener and accepts from those ready.
    fn bind(listen: &Listen) -> Result<(Listener, Listen), NbdError> {
        let bind_err = |source| NbdError::Bind { listen: listen.to_string(), source };
        match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(bind_err)?;
                let bound = l.local_addr().map_err(bind_err)?;
                l.set_nonblocking(true).map_err(bind_err)?;
                Ok((Listener::Tcp(l), Listen::Tcp(bound)))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                if let Err(e) = l.set_nonblocking(true) {
                    let _ = fs::remove_file(path);
                    return Err(bind_err(e));
                }
                Ok((Listener::Unix(l), listen.clone()))
            }
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    /// Accepts one connection, as a blocking socket (the handshake reads it so, and a
    /// connection's task reads only what the socket already has, or the rest of a request).
    fn accept(&self, id: u64) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(false)?;
                // Replies are small and latency-bound; do not let Nagle hold them back.
                if let Err(e) = s.set_nodelay(true) {
                    debug!("nbd: TCP_NODELAY for {peer}: {e}");
                }
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                // Unix peers have no address; number them.
                Ok((Stream::Unix(s), format!("unix#{id}")))
            }
        }
    }
}

/// Makes room for the unix socket: a socket file nobody listens on any more is removed;
/// anything else at the path is left alone and reported.
fn remove_stale_socket(path: &std::path::Path) -> Result<(), NbdError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(NbdError::SocketPathInUse {
                    path: path.to_path_buf(),
                    reason: "another server is listening on this socket; stop it or choose another path",
                });
            }
            fs::remove_file(path).map_err(|source| NbdError::Bind { listen: format!("unix:{}", path.display()), source })
        }
        Ok(_) => Err(NbdError::SocketPathInUse {
            path: path.to_path_buf(),
            reason: "exists and is not a socket; remove it or choose another path",
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NbdError::Bind { listen: format!("unix:{}", path.display()), source }),
    }
}

/// Removes the socket files of the unix listeners among `listens`.
fn remove_socket_files<'a>(listens: impl Iterator<Item = &'a Listen>) {
    for listen in listens {
        if let Listen::Unix(path) = listen {
            if let Err(e) = fs::remove_file(path) {
                debug!("nbd: removing {}: {e}", path.display());
            }
        }
    }
}

fn is_fatal_accept_error(e: &io::Error) -> bool {
    // EBADF, EINVAL, ENOTSOCK, EOPNOTSUPP: the listener itself is broken. Anything else
    // (EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, EINTR, ...) passes.
    matches!(e.raw_os_error(), Some(9 | 22 | 88 | 95))
}

/// Waits on every listener and on `wake` at once; accepts from each listener that is ready and
/// hands every new connection to a handshake thread. Ends when the server stops, or with the
/// error of a listener that is broken.
fn accept_loop(bound: &[Bound], wake: &EventFd, state: &Arc<State>) -> Result<(), NbdError> {
    let mut next_id: u64 = 0;
    loop {
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd<'_>> = bound.iter().map(|b| PollFd::new(b.listener.as_fd(), PollFlags::POLLIN)).collect();
            fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(NbdError::Poll(e.into())),
            }
            // A listener with an error or hang-up is accepted from too: accept says what it is.
            fds[..bound.len()].iter().enumerate().filter(|(_, f)| f.any().unwrap_or(true)).map(|(i, _)| i).collect()
        };
        if state.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        for i in ready {
            accept_ready(&bound[i], state, &mut next_id)?;
        }
    }
}

/// Accepts what one ready listener has waiting (up to [`ACCEPT_BURST`], so that the other
/// listeners get their turn).
fn accept_ready(b: &Bound, state: &Arc<State>, next_id: &mut u64) -> Result<(), NbdError> {
    for _ in 0..ACCEPT_BURST {
        *next_id += 1;
        let id = *next_id;
        let (stream, peer) = match b.listener.accept(id) {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if is_fatal_accept_error(&e) => {
                warn!("nbd: accept on {} failed: {e}", b.listen);
                return Err(NbdError::Accept { listen: b.listen.to_string(), source: e });
            }
            Err(e) => {
                warn!("nbd: accept on {} failed: {e}; retrying", b.listen);
                thread::sleep(ACCEPT_ERROR_PAUSE);
                return Ok(());
            }
        };
        let stream = Arc::new(stream);
        let mut conns = lock(&state.conns);
        conns.handshakes.retain(|t| !t.is_finished());
        conns.live.insert(id, Arc::clone(&stream));
        let spawned = {
            let exports = Arc::clone(&b.exports);
            let state = Arc::clone(state);
            let peer = peer.clone();
            thread::Builder::new().name(format!("nbd-hello-{id}")).spawn(move || run_connection(stream, peer, &exports, &state, id))
        };
        match spawned {
            Ok(t) => conns.handshakes.push(t),
            Err(e) => {
                warn!("nbd {peer}: dropping connection: cannot start its handshake thread: {e}");
                conns.live.remove(&id);
            }
        }
    }
    Ok(())
}

/// Closes the read side of every connection so no new request is read, gives their
/// outstanding requests [`SHUTDOWN_GRACE`] to complete, then closes what remains and joins
/// the handshake threads (which end with their socket). A connection closed after the grace
/// still waits, in the pool, for its device to complete the writes it submitted.
fn stop_connections(state: &State) {
    let mut conns = lock(&state.conns);
    for stream in conns.live.values() {
        let _ = stream.shutdown(Shutdown::Read);
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while !conns.live.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            warn!("nbd: {} connection(s) still busy after {SHUTDOWN_GRACE:?}; closing them", conns.live.len());
            for stream in conns.live.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            break;
        }
        conns = state.closed.wait_timeout(conns, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
    }
    let threads = std::mem::take(&mut conns.handshakes);
    drop(conns);
    for t in threads {
        let _ = t.join();
    }
}

/// Handshake, then transmission, for one client: negotiates on this thread, then hands the
/// connection to the NBD pool. The connection leaves the live list when it ends.
fn run_connection(stream: Arc<Stream>, peer: String, exports: &[Export], state: &Arc<State>, id: u64) {
    info!("nbd {peer}: connected");
    let (reader, index) = match negotiate(&stream, &peer, exports) {
        Ok(Some(negotiated)) => negotiated,
        Ok(None) => {
            info!("nbd {peer}: disconnected during negotiation");
            return ended(state, id);
        }
        Err(e) => {
            warn!("nbd {peer}: closing connection: {}", hindsight_consistency::error_chain(&e));
            return ended(state, id);
        }
    };
    let export = &exports[index];
    info!("nbd {peer}: serving export {:?} ({} bytes)", export.name, export.device.size());
    let on_end = {
        let (state, peer, name) = (Arc::clone(state), peer.clone(), export.name.clone());
        Box::new(move |end: End| {
            log_end(&peer, &name, end);
            ended(&state, id);
        })
    };
    if let Err(e) = connection::start(reader, Arc::clone(&export.device), &peer, on_end) {
        warn!("nbd {peer}: closing connection: cannot serve it: {e}");
        ended(state, id);
    }
}

/// The connection `id` has ended: it leaves the live list.
fn ended(state: &State, id: u64) {
    lock(&state.conns).live.remove(&id);
    state.closed.notify_all();
}

/// Runs the handshake; returns the reader (which may already hold the first requests) and
/// the export chosen, or `None` if the client left during negotiation.
fn negotiate(stream: &Arc<Stream>, peer: &str, exports: &[Export]) -> Result<Option<(ElasticReader<ReadSide>, usize)>, NbdError> {
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(NbdError::HandshakeIo)?;
    let mut reader =
        ElasticReader::new(ReadSide::until(Arc::clone(stream), Instant::now() + HANDSHAKE_TIMEOUT), connection::REQUEST_READ_BUFFER);
    let infos: Vec<ExportInfo> =
        exports.iter().map(|e| ExportInfo { name: e.name.clone(), size: e.device.size(), read_only: e.device.read_only() }).collect();
    let index = match handshake::negotiate(&mut reader, &mut &**stream, &infos, peer)? {
        Outcome::Closed => return Ok(None),
        Outcome::Transmission { export } => export,
    };
    reader.get_mut().clear_deadline();
    stream.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(NbdError::HandshakeIo)?;
    Ok(Some((reader, index)))
}

/// Logs how a connection's transmission phase ended.
fn log_end(peer: &str, export: &str, end: End) {
    match end {
        End::Disconnect => info!("nbd {peer}: export {export:?}: client disconnected"),
        End::Closed => info!("nbd {peer}: export {export:?}: connection closed"),
        End::ReplyFailed => warn!("nbd {peer}: export {export:?}: connection dropped after a failed reply"),
        End::Error(e) => warn!("nbd {peer}: export {export:?}: closing connection: {}", hindsight_consistency::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_unix_and_tcp() {
        assert_eq!("unix:/run/h.sock".parse::<Listen>().unwrap(), Listen::Unix(PathBuf::from("/run/h.sock")));
        assert_eq!("tcp:127.0.0.1:10809".parse::<Listen>().unwrap(), Listen::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!("tcp:[::1]:0".parse::<Listen>().unwrap(), Listen::Tcp("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn listen_rejects_malformed_addresses() {
        for bad in ["", "unix:", "tcp:", "tcp:localhost:10809", "tcp:1.2.3.4", "/tmp/x.sock"] {
            assert!(matches!(bad.parse::<Listen>(), Err(NbdError::InvalidListen { .. })), "{bad:?} parsed");
        }
    }

    #[test]
    fn listen_display_round_trips() {
        for s in ["unix:/tmp/a b.sock", "tcp:127.0.0.1:10809", "tcp:[::1]:7"] {
            assert_eq!(s.parse::<Listen>().unwrap().to_string(), s);
        }
    }
}
