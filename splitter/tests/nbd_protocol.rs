//! System tests: the NBD server driven by a hand-written client over real sockets, for the
//! cases ordinary clients never produce (bad requests, vanishing clients, pipelining).

mod nbd_support;

use std::fs;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hindsight_splitter::block::BlockDevice;
use hindsight_splitter::file_device::{CompletionMode, FileDevice};
use hindsight_splitter::nbd::{Listen, NbdError, NbdServer};
use nbd_support::*;

const MIB: u64 = 1024 * 1024;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
const FLAG_NO_HOLE: u16 = 2;
const FLAG_DF: u16 = 4;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const REP_ACK: u32 = 1;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const OPT_EXPORT_NAME: u32 = 1;

const DEFERRED: CompletionMode = CompletionMode::Deferred { max_delay: Duration::from_millis(5) };

fn server(mode: CompletionMode) -> TestServer {
    TestServer::unix(&[("disk", MIB)], mode)
}

/// A read at the start of the export still works: the stream is in step.
fn assert_in_step(c: &mut Raw) {
    assert_eq!(c.read(0xfeed, 0, 512).len(), 512);
}

#[test]
fn export_name_without_no_zeroes_sends_size_flags_and_padding() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect();
    c.greet(1); // fixed newstyle only
    c.option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.u64(), MIB);
    let flags = c.u16();
    assert_eq!(flags, 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100);
    assert!(c.read_n(124).iter().all(|&b| b == 0));
    assert_in_step(&mut c);
}

#[test]
fn export_name_with_no_zeroes_sends_no_padding() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect();
    c.greet(3);
    c.option(OPT_EXPORT_NAME, b"disk");
    assert_eq!(c.u64(), MIB);
    c.u16();
    assert_in_step(&mut c);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect();
    c.greet(1 | 0x10);
    assert!(c.closed_by_server());
}

#[test]
fn oversized_option_gets_too_big_and_haggling_continues() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect();
    c.greet(3);
    c.option(0x1234, &vec![0xaa; 100 * 1024]);
    let (opt, typ, _) = c.option_reply();
    assert_eq!((opt, typ), (0x1234, REP_ERR_TOO_BIG));
    let replies = c.go("disk");
    assert_eq!(replies.last().unwrap().1, REP_ACK);
    assert_in_step(&mut c);
}

#[test]
fn read_past_the_end_gets_einval_and_no_payload() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    c.request(0, CMD_READ, 1, MIB - 512, 1024);
    assert_eq!(c.reply(), (EINVAL, 1));
    c.request(0, CMD_READ, 2, u64::MAX - 10, 512);
    assert_eq!(c.reply(), (EINVAL, 2));
    assert_in_step(&mut c);
}

#[test]
fn read_over_the_maximum_block_size_gets_einval() {
    let s = TestServer::unix(&[("disk", 64 * MIB)], CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    c.request(0, CMD_READ, 1, 0, 32 * 1024 * 1024 + 1);
    assert_eq!(c.reply(), (EINVAL, 1));
    // The maximum itself is served.
    assert_eq!(c.read(2, 0, 32 * 1024 * 1024).len(), 32 * 1024 * 1024);
}

#[test]
fn write_past_the_end_gets_enospc_and_its_payload_is_skipped() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    c.write(1, MIB - 512, &[0x77; 1024]);
    assert_eq!(c.reply(), (ENOSPC, 1));
    c.request(0, CMD_WRITE_ZEROES, 2, MIB, 512);
    assert_eq!(c.reply(), (ENOSPC, 2));
    c.request(0, CMD_TRIM, 3, MIB, 512);
    assert_eq!(c.reply(), (EINVAL, 3));
    assert_in_step(&mut c);
    let bytes = fs::read(s.backing("disk")).unwrap();
    assert!(bytes.iter().all(|&b| b == 0), "refused write changed the disk");
}

#[test]
fn write_over_the_maximum_block_size_gets_einval_and_its_payload_is_skipped() {
    let s = TestServer::unix(&[("disk", 64 * MIB)], CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    let big = vec![0x55u8; 32 * 1024 * 1024 + 4096];
    // Written from another thread: the server reads the payload while we wait for its reply.
    let mut w = s.connect().open("disk");
    let writer = thread::spawn(move || {
        w.write(1, 0, &big);
        w
    });
    let mut w = writer.join().unwrap();
    assert_eq!(w.reply(), (EINVAL, 1));
    assert_in_step(&mut w);
    assert_in_step(&mut c);
}

#[test]
fn unknown_commands_flags_and_zero_lengths_get_einval() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    c.request(0, 5, 1, 0, 512); // CACHE, not advertised
    assert_eq!(c.reply(), (EINVAL, 1));
    c.request(0, 200, 2, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 2));
    c.request(FLAG_DF, CMD_READ, 3, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 3));
    c.request(0x8000, CMD_TRIM, 4, 0, 512);
    assert_eq!(c.reply(), (EINVAL, 4));
    c.request(0, CMD_READ, 5, 0, 0);
    assert_eq!(c.reply(), (EINVAL, 5));
    c.request(0, CMD_WRITE, 6, 0, 0);
    assert_eq!(c.reply(), (EINVAL, 6));
    c.request(0, CMD_FLUSH, 7, 4096, 0);
    assert_eq!(c.reply(), (EINVAL, 7));
    // A write with a bad flag still has its payload skipped.
    c.request(FLAG_NO_HOLE, CMD_WRITE, 8, 0, 4);
    c.s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(c.reply(), (EINVAL, 8));
    assert_in_step(&mut c);
}

#[test]
fn fua_writes_zeroes_trim_and_flush_succeed() {
    let s = server(CompletionMode::Inline);
    let mut c = s.connect().open("disk");
    c.request(FLAG_FUA, CMD_WRITE, 1, 4096, 8);
    c.s.write_all(b"abcdefgh").unwrap();
    assert_eq!(c.reply(), (0, 1));
    c.request(FLAG_FUA | FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 4096, 4);
    assert_eq!(c.reply(), (0, 2));
    c.request(FLAG_FUA, CMD_TRIM, 3, 8192, 4096);
    assert_eq!(c.reply(), (0, 3));
    c.request(FLAG_FUA, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.reply(), (0, 4));
    assert_eq!(c.read(5, 4096, 8), b"\0\0\0\0efgh");
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let s = server(CompletionMode::Inline);
    let mut good = s.connect().open("disk");
    let mut bad = s.connect().open("disk");
    bad.s.write_all(&[0x12; 28]).unwrap();
    assert!(bad.closed_by_server());
    good.write(1, 0, &[9; 512]);
    assert_eq!(good.reply(), (0, 1));
    assert_eq!(good.read(2, 0, 512), vec![9; 512]);
}

#[test]
fn client_vanishing_mid_write_leaves_other_connections_working() {
    let s = server(DEFERRED);
    let mut good = s.connect().open("disk");
    {
        let mut gone = s.connect().open("disk");
        for h in 0..8 {
            gone.write(h, h * 4096, &[3; 4096]);
        }
        gone.request(0, CMD_WRITE, 99, 0, 65536);
        gone.s.write_all(&[1; 1000]).unwrap();
    } // dropped mid-payload, with replies unread
    for h in 0..16 {
        good.write(h, 512 * 1024 + h * 4096, &[4; 4096]);
    }
    let mut handles: Vec<u64> = (0..16)
        .map(|_| good.reply())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (0..16).collect::<Vec<_>>());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.handle.as_ref().unwrap().connections() > 1 {
        assert!(Instant::now() < deadline, "vanished connection never closed");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pipelined_writes_get_every_reply_possibly_out_of_order() {
    let s = server(DEFERRED);
    let mut c = s.connect().open("disk");
    let n = 64u64;
    for h in 0..n {
        c.write(h, h * 4096, &[u8::try_from(h).unwrap(); 4096]);
    }
    let order: Vec<u64> = (0..n)
        .map(|_| {
            let (e, h) = c.reply();
            assert_eq!(e, 0);
            h
        })
        .collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    assert_ne!(order, sorted, "replies came back in submission order");
    for h in 0..n {
        assert_eq!(c.read(1000 + h, h * 4096, 4096), vec![u8::try_from(h).unwrap(); 4096]);
    }
}

#[test]
fn writes_past_the_in_flight_limit_wait_for_room_and_every_one_is_answered() {
    // More than the 256 requests a connection may have in flight: the connection stops
    // reading at the limit, and a completion wakes it to read on.
    // Completions slow enough that the limit is reached.
    let s = TestServer::unix(&[("disk", 4 * MIB)], CompletionMode::Deferred { max_delay: Duration::from_millis(100) });
    let sock = UnixStream::connect(&s.socket).unwrap();
    let mut replies = Raw::new(Box::new(sock.try_clone().unwrap()));
    let mut c = Raw::new(Box::new(sock)).open("disk");
    let n = 600u64;
    // Replies are read while the writes go: a client that reads none would leave the
    // completions blocked on a full socket.
    let reader = thread::spawn(move || (0..=n).map(|_| replies.reply()).collect::<Vec<_>>());
    for h in 0..n {
        c.write(h, h * 4096, &[u8::try_from(h % 251).unwrap(); 4096]);
    }
    c.request(0, CMD_FLUSH, 9999, 0, 0);
    let mut got = reader.join().unwrap();
    assert_eq!(got.pop(), Some((0, 9999)), "the flush comes after every write");
    assert!(got.iter().all(|&(e, _)| e == 0), "a write failed: {got:?}");
    let mut handles: Vec<u64> = got.iter().map(|&(_, h)| h).collect();
    handles.sort_unstable();
    assert_eq!(handles, (0..n).collect::<Vec<_>>());
    for h in [0, 255, 256, 257, n - 1] {
        assert_eq!(c.read(10_000 + h, h * 4096, 4096), vec![u8::try_from(h % 251).unwrap(); 4096]);
    }
}

#[test]
fn flush_replies_after_every_write_submitted_before_it() {
    let s = server(DEFERRED);
    let mut c = s.connect().open("disk");
    for round in 0..5u64 {
        for h in 0..32 {
            c.write(round * 100 + h, h * 8192, &[7; 8192]);
        }
        c.request(0, CMD_FLUSH, 9999, 0, 0);
        for _ in 0..32 {
            let (e, h) = c.reply();
            assert_eq!(e, 0);
            assert_ne!(h, 9999, "flush replied before an earlier write");
        }
        assert_eq!(c.reply(), (0, 9999));
    }
}

#[test]
fn disc_waits_for_outstanding_writes_then_closes() {
    let s = server(DEFERRED);
    let mut c = s.connect().open("disk");
    for h in 0..32u64 {
        c.write(h, h * 4096, &[0xd1; 4096]);
    }
    c.request(0, CMD_DISC, 0, 0, 0);
    for _ in 0..32 {
        assert_eq!(c.reply().0, 0);
    }
    assert!(c.closed_by_server());
    let bytes = fs::read(s.backing("disk")).unwrap();
    assert!(bytes[..32 * 4096].iter().all(|&b| b == 0xd1));
}

#[test]
fn shutdown_with_connected_clients_finishes_promptly() {
    let mut s = server(DEFERRED);
    let mut idle = s.connect(); // still in the handshake
    idle.greet(3);
    let mut busy = s.connect().open("disk");
    for h in 0..16u64 {
        busy.write(h, h * 4096, &[1; 4096]);
    }
    let start = Instant::now();
    s.shutdown();
    assert!(start.elapsed() < Duration::from_secs(5), "shutdown took {:?}", start.elapsed());
    // Outstanding writes were answered before the connection closed.
    for _ in 0..16 {
        assert_eq!(busy.reply().0, 0);
    }
    assert!(busy.closed_by_server());
    assert!(idle.closed_by_server());
    assert!(!s.socket.exists(), "socket file left behind");
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, CompletionMode::Inline).unwrap());

    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap()); // leaves the socket file behind
    assert!(sock.exists());
    let h = NbdServer::new(Listen::Unix(sock.clone()), vec![("d".into(), Arc::clone(&dev))]).unwrap().spawn().unwrap();
    // A second server on a live socket is refused.
    let second = NbdServer::new(Listen::Unix(sock.clone()), vec![("d".into(), Arc::clone(&dev))]).unwrap().spawn();
    assert!(matches!(second, Err(NbdError::SocketPathInUse { .. })));
    h.shutdown().unwrap();

    let plain = dir.path().join("plain");
    fs::write(&plain, b"keep me").unwrap();
    let r = NbdServer::new(Listen::Unix(plain.clone()), vec![("d".into(), dev)]).unwrap().spawn();
    assert!(matches!(r, Err(NbdError::SocketPathInUse { .. })));
    assert_eq!(fs::read(&plain).unwrap(), b"keep me");
}

#[test]
fn invalid_export_lists_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&img, CompletionMode::Inline).unwrap());
    let listen: Listen = "tcp:127.0.0.1:0".parse().unwrap();
    assert!(matches!(NbdServer::new(listen.clone(), vec![]), Err(NbdError::NoExports)));
    let dup = vec![("a".to_string(), Arc::clone(&dev)), ("a".to_string(), Arc::clone(&dev))];
    assert!(matches!(NbdServer::new(listen.clone(), dup), Err(NbdError::DuplicateExport(_))));
    let long = vec![("x".repeat(4097), Arc::clone(&dev))];
    assert!(matches!(NbdServer::new(listen.clone(), long), Err(NbdError::InvalidExportName { .. })));
    let nul = vec![("a\0b".to_string(), dev)];
    assert!(matches!(NbdServer::new(listen, nul), Err(NbdError::InvalidExportName { .. })));
}

#[test]
fn tcp_listener_serves_on_a_kernel_chosen_port() {
    let s = TestServer::tcp(&[("disk", MIB)], CompletionMode::Inline);
    let Listen::Tcp(addr) = s.handle.as_ref().unwrap().listen() else {
        panic!("not tcp");
    };
    assert_ne!(addr.port(), 0);
    let mut c = s.connect().open("disk");
    c.write(1, 0, &[6; 4096]);
    assert_eq!(c.reply(), (0, 1));
    assert_eq!(c.read(2, 0, 4096), vec![6; 4096]);
}

/// A 1 MiB file device in `dir`, named `name`.
fn file_device(dir: &std::path::Path, name: &str, size: u64) -> Arc<dyn BlockDevice> {
    let img = dir.join(format!("{name}.img"));
    fs::File::create(&img).unwrap().set_len(size).unwrap();
    Arc::new(FileDevice::open(&img, CompletionMode::Inline).unwrap())
}

#[test]
fn one_accept_thread_serves_every_listener_with_its_own_exports() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let servers = vec![
        NbdServer::new(Listen::Unix(a.clone()), vec![("one".into(), file_device(dir.path(), "one", MIB))]).unwrap(),
        NbdServer::new(Listen::Unix(b.clone()), vec![("two".into(), file_device(dir.path(), "two", 2 * MIB))]).unwrap(),
        NbdServer::new("tcp:127.0.0.1:0".parse().unwrap(), vec![("three".into(), file_device(dir.path(), "three", 3 * MIB))]).unwrap(),
    ];
    let h = NbdServer::spawn_all(servers).unwrap();
    assert_eq!(h.listens().len(), 3);
    assert_eq!(h.listens()[..2], [Listen::Unix(a.clone()), Listen::Unix(b.clone())]);
    let Listen::Tcp(addr) = h.listens()[2] else { panic!("not tcp") };
    assert_ne!(addr.port(), 0);
    // Several connections to every listener at once, each seeing the exports of its own.
    let mut clients = Vec::new();
    for round in 0..3u8 {
        let mut one = Raw::unix(&a).open("one");
        let mut two = Raw::unix(&b).open("two");
        let mut three = Raw::tcp(addr).open("three");
        one.write(1, 0, &[round + 1; 4096]);
        two.write(1, MIB, &[round + 2; 4096]);
        three.write(1, 2 * MIB, &[round + 3; 4096]);
        for c in [&mut one, &mut two, &mut three] {
            assert_eq!(c.reply(), (0, 1));
        }
        assert_eq!(one.read(2, 0, 4096), vec![round + 1; 4096]);
        assert_eq!(two.read(2, MIB, 4096), vec![round + 2; 4096]);
        assert_eq!(three.read(2, 2 * MIB, 4096), vec![round + 3; 4096]);
        clients.extend([one, two, three]);
    }
    // An export of another listener is unknown here.
    let mut wrong = Raw::unix(&a);
    wrong.greet(1);
    wrong.option(OPT_EXPORT_NAME, b"two");
    assert!(wrong.closed_by_server());
    let start = Instant::now();
    while h.connections() != 9 {
        assert!(start.elapsed() < Duration::from_secs(5), "{} connections open, not the 9 clients", h.connections());
        thread::sleep(Duration::from_millis(10));
    }
    h.shutdown().unwrap();
    for c in &mut clients {
        assert!(c.closed_by_server());
    }
    assert!(!a.exists() && !b.exists(), "socket files left behind");
}

#[test]
fn a_listener_that_cannot_be_bound_leaves_none_bound() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let dev = file_device(dir.path(), "d", MIB);
    let (a, plain) = (dir.path().join("a.sock"), dir.path().join("plain"));
    fs::write(&plain, b"keep me").unwrap();
    let servers = vec![
        NbdServer::new(Listen::Unix(a.clone()), vec![("d".into(), Arc::clone(&dev))]).unwrap(),
        NbdServer::new(Listen::Unix(plain.clone()), vec![("d".into(), dev)]).unwrap(),
    ];
    assert!(matches!(NbdServer::spawn_all(servers), Err(NbdError::SocketPathInUse { .. })));
    assert!(!a.exists(), "the first listener's socket file is left behind");
    assert_eq!(fs::read(&plain).unwrap(), b"keep me");
}

#[test]
fn ended_reports_the_end_of_the_accept_loop_at_shutdown() {
    let s = server(CompletionMode::Inline);
    let h = s.handle.as_ref().unwrap();
    assert!(matches!(h.ended().recv_timeout(Duration::from_millis(50)), Err(crossbeam_channel::RecvTimeoutError::Timeout)));
    let ended = h.ended().clone();
    drop(s);
    assert!(matches!(ended.recv_timeout(Duration::from_secs(5)), Err(crossbeam_channel::RecvTimeoutError::Disconnected)));
}
