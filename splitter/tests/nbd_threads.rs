//! System test: idle NBD connections hold no thread. A test binary of its own, so that no
//! other test's threads come and go while this one counts the process's threads.

mod nbd_support;

use std::time::{Duration, Instant};

use hindsight_splitter::file_device::CompletionMode;
use nbd_support::*;

const MIB: u64 = 1024 * 1024;
const IDLE: usize = 50;

/// The threads of this process, as the kernel lists them.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn fifty_idle_connections_hold_no_thread_and_all_serve_afterwards() {
    let s = TestServer::unix(&[("disk", MIB)], CompletionMode::Inline);
    // One connection served first: whatever the server starts once (its pool, the readiness
    // thread) is running before the count.
    let mut first = s.connect().open("disk");
    first.write(1, 0, &[0xee; 512]);
    assert_eq!(first.reply(), (0, 1));
    let before = threads();

    let mut idle: Vec<Raw> = (0..IDLE).map(|_| s.connect().open("disk")).collect();
    let handle = s.handle.as_ref().unwrap();
    // Negotiated (GO answered), and the short-lived handshake threads gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.connections() != 1 + IDLE || threads() > before {
        assert!(
            Instant::now() < deadline,
            "{} connections open, {} threads with {IDLE} idle connections, {before} before them",
            handle.connections(),
            threads()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{before} threads with one connection, {} with {IDLE} more idle ones", threads());

    // Every idle connection still serves, each its own 4 KiB.
    for (i, c) in (0u64..).zip(idle.iter_mut()) {
        c.write(100 + i, 4096 * (i + 1), &[u8::try_from(i).unwrap(); 4096]);
    }
    for (i, c) in (0u64..).zip(idle.iter_mut()) {
        assert_eq!(c.reply(), (0, 100 + i));
        assert_eq!(c.read(200 + i, 4096 * (i + 1), 4096), vec![u8::try_from(i).unwrap(); 4096]);
    }
    assert_eq!(first.read(2, 0, 512), vec![0xee; 512]);
    assert!(threads() <= before, "{} threads after the idle connections served, {before} before them", threads());
}
