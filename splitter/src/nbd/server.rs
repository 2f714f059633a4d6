//! The NBD server: one listener, a list of exports, one thread per client connection.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use hindsight_consistency::sync::lock;
use log::{debug, info, warn};

use crate::block::BlockDevice;

use super::connection::{self, End};
use super::error::NbdError;
use super::handshake::{self, ExportInfo, Outcome};
use super::proto::MAX_STRING_LEN;
use super::stream::Stream;

/// How long a client may take over each read of the handshake before it is dropped, so a
/// client that connects and says nothing does not hold a thread forever.
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
/// preferred / maximum) and `NBD_FLAG_CAN_MULTI_CONN`.
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
        let (listener, bound) = Listener::bind(&self.listen)?;
        info!(
            "nbd: listening on {bound} with exports {}",
            self.exports.iter().map(|e| format!("{:?} ({} bytes)", e.name, e.device.size())).collect::<Vec<_>>().join(", ")
        );
        let state = Arc::new(State::default());
        let acceptor = {
            let state = Arc::clone(&state);
            let exports = Arc::clone(&self.exports);
            let bound = bound.clone();
            thread::Builder::new()
                .name("nbd-accept".to_string())
                .spawn(move || accept_loop(&listener, &bound, &exports, &state))
                .map_err(|source| NbdError::SpawnThread { name: "nbd-accept".to_string(), source })?
        };
        Ok(ServerHandle { listen: bound, state, acceptor: Some(acceptor) })
    }

    /// Binds the listener and serves until the accept loop fails; does not return otherwise.
    pub fn run(self) -> Result<(), NbdError> {
        self.spawn()?.wait()
    }
}

/// A running server. Dropping it shuts the server down as [`ServerHandle::shutdown`] does.
pub struct ServerHandle {
    listen: Listen,
    state: Arc<State>,
    acceptor: Option<JoinHandle<Result<(), NbdError>>>,
}

impl ServerHandle {
    /// The address actually bound (with the real port when port 0 was asked for).
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Number of client connections currently open.
    pub fn connections(&self) -> usize {
        lock(&self.state.conns).live.len()
    }

    /// Stops accepting, lets every connection finish its outstanding requests (up to
    /// [`SHUTDOWN_GRACE`]), closes them, and removes the unix socket file.
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
            // accept() blocks; a connection of our own wakes it to see the stop flag.
            if acceptor.is_finished() || wake(&self.listen) {
                if let Ok(Err(e)) = acceptor.join() {
                    result = Err(e);
                }
            } else {
                warn!("nbd: could not wake the accept loop on {}; leaving it", self.listen);
            }
        }
        stop_connections(&self.state);
        if let Listen::Unix(path) = &self.listen {
            if let Err(e) = fs::remove_file(path) {
                debug!("nbd: removing {}: {e}", path.display());
            }
        }
        info!("nbd: stopped listening on {}", self.listen);
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
    /// A handle to each open connection's socket, to shut it down on stop.
    live: HashMap<u64, Stream>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    stopping: AtomicBool,
    conns: Mutex<Conns>,
    closed: Condvar,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn bind(listen: &Listen) -> Result<(Listener, Listen), NbdError> {
        let bind_err = |source| NbdError::Bind { listen: listen.to_string(), source };
        match listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(bind_err)?;
                let bound = l.local_addr().map_err(bind_err)?;
                Ok((Listener::Tcp(l), Listen::Tcp(bound)))
            }
            Listen::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                Ok((Listener::Unix(l), listen.clone()))
            }
        }
    }

    fn accept(&self, id: u64) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                // Replies are small and latency-bound; do not let Nagle hold them back.
                if let Err(e) = s.set_nodelay(true) {
                    debug!("nbd: TCP_NODELAY for {peer}: {e}");
                }
                Ok((Stream::Tcp(s), format!("tcp:{peer}")))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
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

/// Connects to our own listener so a blocked accept() returns.
fn wake(listen: &Listen) -> bool {
    match listen {
        Listen::Unix(path) => UnixStream::connect(path).is_ok(),
        Listen::Tcp(addr) => {
            let mut addr = *addr;
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                });
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok()
        }
    }
}

fn is_fatal_accept_error(e: &io::Error) -> bool {
    // EBADF, EINVAL, ENOTSOCK, EOPNOTSUPP: the listener itself is broken. Anything else
    // (EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED, EINTR, ...) passes.
    matches!(e.raw_os_error(), Some(9 | 22 | 88 | 95))
}

fn accept_loop(listener: &Listener, bound: &Listen, exports: &Arc<Vec<Export>>, state: &Arc<State>) -> Result<(), NbdError> {
    let mut next_id: u64 = 0;
    loop {
        next_id += 1;
        let accepted = listener.accept(next_id);
        if state.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_fatal_accept_error(&e) => {
                warn!("nbd: accept on {bound} failed: {e}");
                return Err(NbdError::Accept(e));
            }
            Err(e) => {
                warn!("nbd: accept on {bound} failed: {e}; retrying");
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let registered = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                warn!("nbd {peer}: dropping connection: {e}");
                continue;
            }
        };
        let id = next_id;
        let mut conns = lock(&state.conns);
        conns.threads.retain(|t| !t.is_finished());
        conns.live.insert(id, registered);
        let spawned = {
            let exports = Arc::clone(exports);
            let state = Arc::clone(state);
            let peer = peer.clone();
            thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
                run_connection(stream, &peer, &exports);
                lock(&state.conns).live.remove(&id);
                state.closed.notify_all();
            })
        };
        match spawned {
            Ok(t) => conns.threads.push(t),
            Err(e) => {
                warn!("nbd {peer}: dropping connection: cannot start its thread: {e}");
                conns.live.remove(&id);
            }
        }
    }
}

/// Closes the read side of every connection so no new request is read, gives their
/// outstanding requests [`SHUTDOWN_GRACE`] to complete, then closes what remains and joins
/// every connection thread.
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
    let threads = std::mem::take(&mut conns.threads);
    drop(conns);
    for t in threads {
        let _ = t.join();
    }
}

/// Handshake, then transmission, for one client; logs how it ended.
fn run_connection(stream: Stream, peer: &str, exports: &[Export]) {
    info!("nbd {peer}: connected");
    match serve_client(stream, peer, exports) {
        Ok(()) => {}
        Err(e) => warn!("nbd {peer}: closing connection: {}", hindsight_consistency::error_chain(&e)),
    }
}

fn serve_client(stream: Stream, peer: &str, exports: &[Export]) -> Result<(), NbdError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(NbdError::HandshakeIo)?;
    let mut writer = stream.try_clone().map_err(NbdError::HandshakeIo)?;
    // The same buffered reader carries over into transmission: it may already hold the
    // first request.
    let mut reader = BufReader::with_capacity(connection::REQUEST_READ_BUFFER, stream);
    let infos: Vec<ExportInfo> =
        exports.iter().map(|e| ExportInfo { name: e.name.clone(), size: e.device.size(), read_only: e.device.read_only() }).collect();
    let index = match handshake::negotiate(&mut reader, &mut writer, &infos, peer)? {
        Outcome::Closed => {
            info!("nbd {peer}: disconnected during negotiation");
            return Ok(());
        }
        Outcome::Transmission { export } => export,
    };
    let export = &exports[index];
    reader.get_ref().set_read_timeout(None).map_err(NbdError::HandshakeIo)?;
    writer.set_write_timeout(Some(REPLY_WRITE_TIMEOUT)).map_err(NbdError::HandshakeIo)?;
    info!("nbd {peer}: serving export {:?} ({} bytes)", export.name, infos[index].size);
    match connection::serve(&mut reader, writer, &export.device, peer) {
        End::Disconnect => info!("nbd {peer}: export {:?}: client disconnected", export.name),
        End::Closed => info!("nbd {peer}: export {:?}: connection closed", export.name),
        End::ReplyFailed => warn!("nbd {peer}: export {:?}: connection dropped after a failed reply", export.name),
        End::Error(e) => warn!("nbd {peer}: export {:?}: closing connection: {}", export.name, hindsight_consistency::error_chain(&e)),
    }
    Ok(())
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
