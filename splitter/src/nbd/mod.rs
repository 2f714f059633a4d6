//! The NBD front end: serves [`BlockDevice`](crate::block::BlockDevice)s to NBD clients
//! (qemu, the Linux kernel's nbd driver through nbd-client, libnbd tools, fio).
//!
//! Core types: [`NbdServer`] (a listener, given as a [`Listen`], and named exports), started
//! with [`NbdServer::spawn`] into a [`ServerHandle`] (several servers with
//! [`NbdServer::spawn_all`], from one accept thread) or run in the foreground with
//! [`NbdServer::run`]. Errors are [`NbdError`].
//!
//! How a client write flows through the front end:
//!
//! 1. The accept loop, which polls every listener at once, hands the new socket to a
//!    short-lived handshake thread; an idle listener costs no thread.
//! 2. `handshake` runs fixed newstyle negotiation; the client picks an export with
//!    `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME`) and learns its size, flags and block sizes. The
//!    connection then becomes a task of the process's NBD pool, woken when its socket has
//!    bytes; an idle connection holds no thread.
//! 3. `connection` reads each 28-byte request header, parsed by [`proto::decode`], then the
//!    payload of a WRITE (at most 32 MiB, the advertised maximum).
//! 4. The request is checked against the export size and submitted to the device with a
//!    completion; the task goes on to the next request without waiting.
//! 5. When the device completes the write (on any thread) the completion sends the simple
//!    reply, built by [`proto::encode`], through the connection's one writer.
//! 6. A FLUSH waits for this connection's writes in flight, then flushes the device; a DISC
//!    waits for them and closes. The task parks while it waits, and the completion of the
//!    last of those writes wakes it.
//!
//! The protocol module [`proto`] does no I/O; the handshake and transmission modules do the
//! socket work around it. [`kernel`] connects the guest kernel's own nbd driver to the same
//! transmission code over a socket pair, without a handshake.

mod connection;
mod error;
mod handshake;
pub mod kernel;
pub mod proto;
mod server;
mod stream;
mod sys;

pub use error::NbdError;
pub use server::{Listen, NbdServer, ServerHandle, HANDSHAKE_TIMEOUT, REPLY_WRITE_TIMEOUT, SHUTDOWN_GRACE};
