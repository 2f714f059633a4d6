//! Wakes a task when a socket has something to read, so that an idle connection holds no
//! thread: its task parks ([`Watch::arm`], then returns `Next::Idle`) and one thread waiting in
//! `epoll_wait` for every parked socket of the process wakes it when bytes (or the end of the
//! stream) arrive.
//!
//! Each watch is one-shot (`EPOLLONESHOT`): it fires once per arming, and the task arms it
//! again each time it parks. Readiness is level-triggered, so bytes that arrived between the
//! task's last read and its arming still wake it. A watch holds a reference to its socket (not
//! a duplicate descriptor: that would cost a descriptor per connection, and descriptors are
//! what thousands of groups run out of first), so the socket stays open, and its descriptor
//! number taken, until the watch has removed its registration.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{recv, MsgFlags};

use super::Waker;
use crate::sync::lock;

/// True if a read of `fd` (a socket) would not wait: bytes, the end of the stream, or an
/// error for the read to report, are waiting in it. Never blocks.
pub fn socket_readable(fd: BorrowedFd<'_>) -> bool {
    let mut one = [0u8; 1];
    loop {
        match recv(fd.as_raw_fd(), &mut one, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return false,
            // Bytes, the end of the stream, or an error for the read to report.
            _ => return true,
        }
    }
}

/// Waits up to `ms` milliseconds until a read of `fd` would not wait (see
/// [`socket_readable`]). A connection's task calls it once after a message before it parks:
/// during a burst the next one usually comes within that time, and is read without the
/// wake-ups of parking.
pub fn wait_socket_readable(fd: BorrowedFd<'_>, ms: u8) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, ms) {
            Ok(n) => return n > 0,
            Err(Errno::EINTR) => {}
            // Let the read report it.
            Err(_) => return true,
        }
    }
}

/// The process's watcher: one epoll instance and the thread that waits on it.
pub struct Readiness {
    epoll: Epoll,
    wakers: Mutex<HashMap<u64, Waker>>,
    next: AtomicU64,
}

/// A socket, shared with the connection that reads it.
pub type Socket = Arc<dyn AsFd + Send + Sync>;

/// One socket watched for one task. Dropping it ends the watch.
pub struct Watch {
    readiness: &'static Readiness,
    socket: Socket,
    token: u64,
}

fn interest() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT
}

impl Readiness {
    /// The process's watcher, started on first use.
    pub fn global() -> io::Result<&'static Readiness> {
        static GLOBAL: OnceLock<&'static Readiness> = OnceLock::new();
        if let Some(r) = GLOBAL.get() {
            return Ok(r);
        }
        static START: Mutex<()> = Mutex::new(());
        let _one = lock(&START);
        if let Some(r) = GLOBAL.get() {
            return Ok(r);
        }
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // Lives as long as the process: connections in any daemon of it may be watched.
        let r: &'static Readiness = Box::leak(Box::new(Readiness { epoll, wakers: Mutex::new(HashMap::new()), next: AtomicU64::new(1) }));
        std::thread::Builder::new().name("readiness".into()).spawn(move || r.wait_loop())?;
        Ok(*GLOBAL.get_or_init(|| r))
    }

    /// Watches `fd` for `waker`'s task. The watch is armed at once (a task woken for nothing
    /// looks and parks again).
    pub fn watch(&'static self, socket: Socket, waker: Waker) -> io::Result<Watch> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.wakers).insert(token, waker);
        if let Err(e) = self.epoll.add(socket.as_fd(), EpollEvent::new(interest(), token)) {
            lock(&self.wakers).remove(&token);
            return Err(e.into());
        }
        Ok(Watch { readiness: self, socket, token })
    }

    fn wait_loop(&self) {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => {
                    let wakers = lock(&self.wakers);
                    for e in &events[..n] {
                        if let Some(w) = wakers.get(&e.data()) {
                            w.wake();
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    log::error!("waiting for sockets to read: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

impl Watch {
    /// Arms the watch again: the task is woken once when the socket is readable (or closed),
    /// at once if it already is.
    pub fn arm(&self) -> io::Result<()> {
        let mut event = EpollEvent::new(interest(), self.token);
        self.readiness.epoll.modify(self.socket.as_fd(), &mut event)?;
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.readiness.epoll.delete(self.socket.as_fd());
        lock(&self.readiness.wakers).remove(&self.token);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::super::tests::wait_for;
    use super::super::{Next, Pool, Task};
    use super::*;

    struct Count(Arc<AtomicUsize>);
    impl Task for Count {
        fn run(&self) -> Next {
            self.0.fetch_add(1, Ordering::SeqCst);
            Next::Idle
        }
    }

    #[test]
    fn an_armed_watch_wakes_its_task_once_bytes_arrive_and_only_once_per_arming() {
        let pool = Pool::new("t", 1).unwrap();
        let rounds = Arc::new(AtomicUsize::new(0));
        let waker = pool.add("c", Count(Arc::clone(&rounds)));
        wait_for(|| rounds.load(Ordering::SeqCst) == 1);
        let (mut a, b) = UnixStream::pair().unwrap();
        let watch = Readiness::global().unwrap().watch(Arc::new(b), waker).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "woken with nothing to read");
        a.write_all(b"x").unwrap();
        wait_for(|| rounds.load(Ordering::SeqCst) == 2);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), 2, "one-shot: not woken again before it is armed");
        // Still unread: arming wakes it at once.
        watch.arm().unwrap();
        wait_for(|| rounds.load(Ordering::SeqCst) == 3);
        drop(watch);
        drop(a);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), 3, "a dropped watch wakes nothing");
    }
}
