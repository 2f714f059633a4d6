//! The listener's thread: accepts engine connections and gives each a thread for its
//! handshake (then the receive pool takes it over), until the daemon stops.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hindsight_consistency::sync::lock;

use super::connection::serve_connection;
use super::shared::{ConnClose, Shared};

/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

pub(super) fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let registered = stream.try_clone().map(|c| lock(&shared.conns).insert(id, ConnClose::Handshake(c)));
                if let Err(e) = registered {
                    log::warn!("engine connection from {peer}: {e}; closing it");
                    continue;
                }
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new().name(format!("target-conn-{id}")).spawn(move || {
                    if !serve_connection(&s, stream, peer, id) {
                        lock(&s.conns).remove(&id);
                    }
                });
                let mut threads = lock(&shared.conn_threads);
                threads.retain(|t| !t.is_finished());
                match spawned {
                    Ok(t) => threads.push(t),
                    Err(e) => {
                        log::error!("engine connection from {peer}: cannot start a thread ({e}); closing it");
                        if let Some(s) = lock(&shared.conns).remove(&id) {
                            s.shutdown();
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                log::warn!("accepting on {}: {e}", shared.config.listen);
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}
