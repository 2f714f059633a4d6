//! Shared pieces of the NBD system tests: a server on a file-backed device, a bounded runner
//! for client programs, and a minimal raw NBD client for protocol edge cases.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hindsight_splitter::block::BlockDevice;
use hindsight_splitter::file_device::{CompletionMode, FileDevice};
use hindsight_splitter::nbd::{Listen, NbdServer, ServerHandle};

/// Longest any one client program may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn init_logging() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// True if `bin` is an executable on PATH.
pub fn have(bin: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(bin);
            fs::metadata(&p).is_ok_and(|m| m.is_file())
        })
    })
}

/// Returns early from a test, saying why, when a client program is not installed.
#[macro_export]
macro_rules! require_clients {
    ($($bin:expr),+ $(,)?) => {
        for bin in [$($bin),+] {
            if !$crate::nbd_support::have(bin) {
                eprintln!(
                    "SKIPPED: `{bin}` is not installed (apt-get install libnbd-bin qemu-utils fio)"
                );
                return;
            }
        }
    };
}

/// Kills the child on drop, so a failing test leaves no client running.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a client program to completion within `timeout`, capturing its output; kills it and
/// panics if it takes longer.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let mut guard = ChildGuard(Some(child));
    let deadline = Instant::now() + timeout;
    let status = loop {
        let child = guard.0.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            guard.0 = None;
            break status;
        }
        if Instant::now() > deadline {
            drop(guard);
            panic!("{shown} did not finish within {timeout:?}; killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out_t.join().unwrap(), stderr: err_t.join().unwrap() }
}

/// Runs a client program and panics with its output unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd, CLIENT_TIMEOUT);
    assert!(
        out.status.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A server on a temporary directory: one zero-filled backing file per export.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub handle: Option<ServerHandle>,
}

impl TestServer {
    /// Serves `exports` (name, size in bytes) on a unix socket.
    pub fn unix(exports: &[(&str, u64)], mode: CompletionMode) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listen = Listen::Unix(socket.clone());
        TestServer::start(dir, socket, listen, exports, mode)
    }

    /// Serves `exports` on 127.0.0.1 with a port picked by the kernel.
    pub fn tcp(exports: &[(&str, u64)], mode: CompletionMode) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let listen = "tcp:127.0.0.1:0".parse().unwrap();
        TestServer::start(dir, PathBuf::new(), listen, exports, mode)
    }

    fn start(dir: tempfile::TempDir, socket: PathBuf, listen: Listen, exports: &[(&str, u64)], mode: CompletionMode) -> TestServer {
        init_logging();
        let mut devices: Vec<(String, Arc<dyn BlockDevice>)> = Vec::new();
        for (name, size) in exports {
            let path = dir.path().join(format!("{name}.img"));
            let f = fs::File::create(&path).unwrap();
            f.set_len(*size).unwrap();
            drop(f);
            let dev = FileDevice::open(&path, mode).unwrap();
            devices.push(((*name).to_string(), Arc::new(dev)));
        }
        let handle = NbdServer::new(listen, devices).unwrap().spawn().unwrap();
        TestServer { dir, socket, handle: Some(handle) }
    }

    pub fn backing(&self, export: &str) -> PathBuf {
        self.dir.path().join(format!("{export}.img"))
    }

    /// The NBD URI of an export, as libnbd and qemu write it.
    pub fn uri(&self, export: &str) -> String {
        match self.handle.as_ref().unwrap().listen() {
            Listen::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            Listen::Tcp(addr) => format!("nbd://{addr}/{export}"),
        }
    }

    pub fn connect(&self) -> Raw {
        match self.handle.as_ref().unwrap().listen() {
            Listen::Unix(path) => Raw::new(Box::new(UnixStream::connect(path).unwrap())),
            Listen::Tcp(addr) => Raw::new(Box::new(std::net::TcpStream::connect(addr).unwrap())),
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---- A raw NBD client ----

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub trait Socket: Read + Write + Send {
    fn set_timeout(&self, d: Duration);
}
impl Socket for UnixStream {
    fn set_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
        self.set_write_timeout(Some(d)).unwrap();
    }
}
impl Socket for std::net::TcpStream {
    fn set_timeout(&self, d: Duration) {
        self.set_read_timeout(Some(d)).unwrap();
        self.set_write_timeout(Some(d)).unwrap();
    }
}

/// A hand-driven NBD client; every read times out so a test cannot hang.
pub struct Raw {
    pub s: Box<dyn Socket>,
}

impl Raw {
    /// A client on a connected socket.
    pub fn new(s: Box<dyn Socket>) -> Raw {
        s.set_timeout(Duration::from_secs(20));
        Raw { s }
    }

    /// Connects to a unix socket.
    pub fn unix(path: &Path) -> Raw {
        Raw::new(Box::new(UnixStream::connect(path).unwrap()))
    }

    /// Connects to a TCP address.
    pub fn tcp(addr: std::net::SocketAddr) -> Raw {
        Raw::new(Box::new(std::net::TcpStream::connect(addr).unwrap()))
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_n(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_n(8).try_into().unwrap())
    }

    /// True once the server has closed the connection (reads EOF or a reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
        }
    }

    /// Reads the greeting and answers with `client_flags`.
    pub fn greet(&mut self, client_flags: u32) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        let flags = self.u16();
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
        flags
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Reads one option reply: (option, reply type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REPLY_MAGIC);
        let option = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        (option, typ, self.read_n(len))
    }

    /// Sends NBD_OPT_GO for `export`; returns every reply up to the final one.
    pub fn go(&mut self, export: &str) -> Vec<(u32, u32, Vec<u8>)> {
        let mut d = u32::try_from(export.len()).unwrap().to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(7, &d);
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            let last = r.1 != 3; // anything but NBD_REP_INFO ends the list
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Greets with FIXED_NEWSTYLE | NO_ZEROES and enters transmission on `export`.
    pub fn open(mut self, export: &str) -> Raw {
        self.greet(3);
        let replies = self.go(export);
        assert_eq!(replies.last().unwrap().1, 1, "GO failed: {replies:?}");
        self
    }

    pub fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).unwrap();
    }

    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(0, 1, handle, offset, u32::try_from(data.len()).unwrap());
        self.s.write_all(data).unwrap();
    }

    /// Reads one simple reply header: (error, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let error = self.u32();
        (error, self.u64())
    }

    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, 0, handle, offset, len);
        assert_eq!(self.reply(), (0, handle));
        self.read_n(len as usize)
    }
}

/// Compares two files byte for byte.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    fs::read(a).unwrap() == fs::read(b).unwrap()
}
