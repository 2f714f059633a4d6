//! Making a connection: the first one at start-up ([`first_connection`], which may give up),
//! each attempt (TCP, TLS, the hello and the engine's welcome), and the reconnection loop
//! with backoff after a loss ([`reconnect`]).

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use hindsight_consistency::transport::{is_refusal_io, Connection, Role, Security};
use hindsight_consistency::wire::{
    decode_message, read_frame, write_frame, AgentWelcome, ErrorMessage, FrameError, FrameType, RedirectMsg,
};
use log::{debug, info, warn};

use super::config::{LinkConfig, LinkError};
use super::dial::Dialer;
use super::state::Inner;

/// First pause between reconnection attempts; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest pause between attempts while engines answer that a group has no owner yet.
const REDIRECT_BACKOFF: Duration = Duration::from_millis(400);

/// How long one TCP connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the engine may take to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects at start, retrying with backoff for up to `config.connect_wait`; a refusal by
/// the engine is returned at once. A redirect is followed at once.
pub(super) fn first_connection(config: &LinkConfig, dialer: &Dialer, hello: &[u8]) -> Result<Connection, LinkError> {
    let engine = dialer.describe();
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = String::new();
    loop {
        let (failure, pause) = match attempt(dialer, &config.security, hello, config.engine_timeout) {
            Ok(stream) => return Ok(stream),
            Err(Attempt::Refused(message)) => return Err(LinkError::Refused { engine, message }),
            Err(Attempt::Tls(reason)) => return Err(LinkError::Tls { engine, reason }),
            Err(failure @ Attempt::Redirect { followed: true, .. }) => (failure, FIRST_BACKOFF),
            Err(failure) => (failure, backoff),
        };
        let waited = started.elapsed();
        if waited >= config.connect_wait {
            return Err(match failure {
                Attempt::Connect(source) => LinkError::Unreachable { engine, waited, source },
                Attempt::Redirect { message, .. } => LinkError::Unreachable { engine, waited, source: io::Error::other(message) },
                Attempt::Hello(source) => LinkError::Handshake { engine, source },
                Attempt::Refused(message) => LinkError::Refused { engine, message },
                Attempt::Tls(reason) => LinkError::Tls { engine, reason },
            });
        }
        let failure = failure.to_string();
        if failure != last_failure {
            info!("engine {engine} not ready ({failure}); retrying for up to {:?}", config.connect_wait);
            last_failure = failure;
        }
        thread::sleep(pause.min(config.connect_wait - waited));
        if pause == backoff {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// One attempt at the engine the dialer names; it moves on after a failure or a redirect.
fn attempt(dialer: &Dialer, security: &Security, hello: &[u8], write_timeout: Duration) -> Result<Connection, Attempt> {
    let (engine, server_name) = dialer.target();
    let to = Destination { engine: &engine, security, server_name: &server_name };
    match hello_exchange(&to, hello, write_timeout) {
        Ok((stream, resync)) => {
            dialer.welcomed(resync);
            Ok(stream)
        }
        Err(Attempt::Redirect { to, message, .. }) => {
            dialer.redirected(&engine, &to);
            info!("engine {engine}: {message}");
            Err(Attempt::Redirect { followed: !to.is_empty(), to, message })
        }
        Err(e) => {
            if matches!(e, Attempt::Connect(_) | Attempt::Hello(_)) {
                dialer.failed(&engine);
            }
            Err(e)
        }
    }
}

/// Why one connection attempt failed.
#[derive(Debug)]
enum Attempt {
    Connect(io::Error),
    Hello(FrameError),
    Refused(String),
    /// A certificate was refused (by either side): retrying cannot help.
    Tls(String),
    /// A clustered engine sent the link to the group's owner (`to`, empty if none is known).
    Redirect {
        to: String,
        message: String,
        followed: bool,
    },
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Connect(e) => write!(f, "connecting: {e}"),
            Attempt::Hello(e) => write!(f, "hello: {e}"),
            Attempt::Refused(m) => write!(f, "refused: {m}"),
            Attempt::Tls(m) => write!(f, "TLS: {m}"),
            Attempt::Redirect { message, .. } => write!(f, "redirected: {message}"),
        }
    }
}

/// Where the link goes and how.
struct Destination<'a> {
    engine: &'a str,
    security: &'a Security,
    server_name: &'a str,
}

/// Connects, runs the TLS handshake, sends the hello and waits for the welcome.
fn hello_exchange(to: &Destination<'_>, hello: &[u8], write_timeout: Duration) -> Result<(Connection, Vec<u16>), Attempt> {
    let engine = to.engine;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
    let mut stream = None;
    for addr in engine.to_socket_addrs().map_err(Attempt::Connect)? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let stream: TcpStream = stream.ok_or(Attempt::Connect(last))?;
    let io_err = |e: io::Error| if is_refusal_io(&e) { Attempt::Tls(e.to_string()) } else { Attempt::Hello(FrameError::Io(e)) };
    // Writes are small and latency-bound; do not let Nagle hold them back.
    stream.set_nodelay(true).map_err(io_err)?;
    let mut stream = to.security.connect(stream, to.server_name, Role::Engine).map_err(|e| {
        if e.is_refusal() {
            Attempt::Tls(e.to_string())
        } else {
            Attempt::Hello(FrameError::Io(io::Error::other(e.to_string())))
        }
    })?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(io_err)?;
    write_frame(&mut stream, FrameType::AgentHello, hello, &mut Vec::new()).map_err(io_err)?;
    let mut payload = Vec::new();
    let frame = read_frame(&mut stream, &mut payload).map_err(|e| match e {
        FrameError::Io(e) => io_err(e),
        other => Attempt::Hello(other),
    })?;
    let resync = match frame {
        FrameType::AgentWelcome => {
            let welcome: AgentWelcome = decode_message("AgentWelcome", &payload).map_err(Attempt::Hello)?;
            debug!("engine {engine} ({}) speaks protocol {}", welcome.engine, welcome.protocol);
            welcome.resync
        }
        FrameType::Error => {
            let e: ErrorMessage = decode_message("Error", &payload).map_err(Attempt::Hello)?;
            return Err(Attempt::Refused(e.message));
        }
        FrameType::Redirect => {
            let r: RedirectMsg = decode_message("Redirect", &payload).map_err(Attempt::Hello)?;
            return Err(Attempt::Redirect { to: r.engine, message: r.message, followed: false });
        }
        got => return Err(Attempt::Hello(FrameError::Unexpected { got, expected: "AgentWelcome or Error" })),
    };
    stream.set_read_timeout(None).map_err(io_err)?;
    // An engine that stops reading holds the writer mutex at most this long before the
    // connection counts as lost.
    stream.set_write_timeout(Some(write_timeout)).map_err(io_err)?;
    Ok((stream, resync))
}

/// Tries to reconnect, with backoff, until it succeeds or the link is dropped (`None`).
/// Fails the pending writes once the engine has been unreachable for the engine timeout.
pub(super) fn reconnect(inner: &Inner, closed: &Receiver<()>) -> Option<Connection> {
    let mut backoff = FIRST_BACKOFF;
    let mut last_failure = String::new();
    loop {
        let pause = match inner.expire() {
            Some(deadline) => backoff.min(deadline.saturating_duration_since(Instant::now())),
            None => backoff,
        };
        match closed.recv_timeout(pause) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
        }
        match attempt(&inner.dialer, &inner.security, &inner.hello, inner.engine_timeout) {
            Ok(stream) => return Some(stream),
            Err(failure) => {
                match failure {
                    // Straight on to the owner.
                    Attempt::Redirect { followed: true, .. } => {
                        backoff = FIRST_BACKOFF;
                        continue;
                    }
                    // A group being taken over has an owner within a poll or two.
                    Attempt::Redirect { .. } => backoff = backoff.min(REDIRECT_BACKOFF),
                    _ => {}
                }
                let failure = failure.to_string();
                if failure != last_failure {
                    warn!("engine {} still unreachable: {failure}", inner.engine);
                    last_failure = failure;
                }
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
