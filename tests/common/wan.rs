//! A WAN emulator for tests: a TCP proxy on 127.0.0.1 in front of one upstream address that
//! can add a one-way delay, cap the bandwidth, stall, and cut every connection (refusing new
//! ones until restored). It counts the bytes it forwards in each direction.
//!
//! Each connection has one pump per direction: a reader thread stamps each chunk with the
//! time it may leave (now + delay) and a writer thread sends it then, paced by the bandwidth
//! cap, so a delay adds latency without limiting throughput.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Knobs {
    delay: Duration,
    /// Bytes per second in each direction; 0: unlimited.
    rate: u64,
}

struct Shared {
    upstream: SocketAddr,
    knobs: Mutex<Knobs>,
    cut: AtomicBool,
    stalled: AtomicBool,
    stop: AtomicBool,
    /// Client → upstream.
    up: AtomicU64,
    /// Upstream → client.
    down: AtomicU64,
    conns: Mutex<Vec<TcpStream>>,
}

/// A running proxy; stops (and closes its connections) when dropped.
pub struct WanProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl WanProxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1.
    pub fn start(upstream: SocketAddr) -> WanProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            knobs: Mutex::new(Knobs::default()),
            cut: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        thread::Builder::new().name("wan-accept".into()).spawn(move || accept(&listener, &s)).unwrap();
        WanProxy { addr, shared }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// One-way delay added to every chunk, in both directions.
    pub fn set_delay(&self, d: Duration) {
        self.shared.knobs.lock().unwrap().delay = d;
    }

    /// Bandwidth cap per direction in bytes per second (0: none).
    pub fn set_rate(&self, bytes_per_second: u64) {
        self.shared.knobs.lock().unwrap().rate = bytes_per_second;
    }

    /// Holds every byte in flight (connections stay open) until `stall(false)`.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// Closes every connection and refuses new ones until [`WanProxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        close_all(&self.shared);
    }

    /// Accepts connections again after a cut.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes forwarded from clients to the upstream.
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the upstream to clients.
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }
}

impl Drop for WanProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.cut.store(true, Ordering::SeqCst);
        close_all(&self.shared);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn close_all(shared: &Shared) {
    for s in shared.conns.lock().unwrap().drain(..) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        {
            let mut conns = shared.conns.lock().unwrap();
            conns.push(client.try_clone().unwrap());
            conns.push(server.try_clone().unwrap());
        }
        pump(client.try_clone().unwrap(), server.try_clone().unwrap(), Arc::clone(shared), true);
        pump(server, client, Arc::clone(shared), false);
    }
}

/// Forwards `from` → `to` through a delay queue.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: Arc<Shared>, upward: bool) {
    let (tx, rx) = crossbeam_channel::unbounded::<(Instant, Vec<u8>)>();
    let reader_shared = Arc::clone(&shared);
    thread::Builder::new()
        .name("wan-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let due = Instant::now() + reader_shared.knobs.lock().unwrap().delay;
                        if tx.send((due, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        })
        .unwrap();
    thread::Builder::new()
        .name("wan-write".into())
        .spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                while shared.stalled.load(Ordering::SeqCst) && !shared.cut.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                if shared.cut.load(Ordering::SeqCst) {
                    break;
                }
                let rate = shared.knobs.lock().unwrap().rate;
                // Paced in slices of at most 16 KiB so a cap holds on a short scale too.
                for piece in chunk.chunks(16 << 10) {
                    let started = Instant::now();
                    if to.write_all(piece).is_err() {
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                    let counter = if upward { &shared.up } else { &shared.down };
                    counter.fetch_add(piece.len() as u64, Ordering::SeqCst);
                    if rate > 0 {
                        let should = Duration::from_secs_f64(piece.len() as f64 / rate as f64);
                        if let Some(left) = should.checked_sub(started.elapsed()) {
                            thread::sleep(left);
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
        .unwrap();
}
