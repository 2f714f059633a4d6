//! The real clients the tests drive: qemu-io, one-shot or fed command by command, and
//! nbdfuse + a loop device + ext4.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

/// Runs qemu-io on an NBD URI with one `-c` per command. qemu-io waits for each request's
/// reply before it sends the next, so the acknowledged order is the command order. Panics if
/// qemu-io or any command fails; returns its output.
pub fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let desc = format!("qemu-io on {uri} ({} commands)", commands.len());
    let (ok, out, err) = run_timeout(&mut cmd, Duration::from_secs(120));
    let all = format!("{out}{err}");
    assert!(ok, "{desc} failed:\n{all}");
    for bad in ["failed", "error", "Error"] {
        assert!(!all.contains(bad), "{desc} reported {bad:?}:\n{all}");
    }
    all
}

/// A long-lived qemu-io on an NBD URI, fed one command at a time on its standard input: each
/// command is sent only after the previous one was answered, so a write is acknowledged when
/// `write_file` returns. Killed on drop if still running.
pub struct QemuIoSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    what: String,
}

impl QemuIoSession {
    pub fn start(uri: &str) -> QemuIoSession {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn qemu-io on {uri}: {e}"));
        let (tx, lines) = std::sync::mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        QemuIoSession { child, stdin, lines, what: format!("qemu-io on {uri}") }
    }

    /// Writes `len` bytes read from the file `src` at `off` and waits for the reply.
    pub fn write_file(&mut self, src: &Path, off: u64, len: u64) {
        if let Err(e) = self.try_write_file(src, off, len, Duration::from_secs(60)) {
            panic!("{e}");
        }
    }

    /// Like `write_file`, but a failed or unanswered write is an error, not a panic.
    pub fn try_write_file(&mut self, src: &Path, off: u64, len: u64, wait: Duration) -> Result<(), String> {
        use std::io::Write;
        let cmd = format!("write -s {} {off} {len}\n", src.display());
        let stdin = self.stdin.as_mut().ok_or("session is closed")?;
        stdin.write_all(cmd.as_bytes()).and_then(|()| stdin.flush()).map_err(|e| format!("{}: send {cmd:?}: {e}", self.what))?;
        let done = format!("wrote {len}/{len} bytes at offset {off}");
        loop {
            let line = self.lines.recv_timeout(wait).map_err(|e| format!("{}: no reply to {:?} ({e})", self.what, cmd.trim()))?;
            if line.contains(&done) {
                return Ok(());
            }
            for bad in ["failed", "error", "Error", "No such", "Invalid"] {
                if line.contains(bad) {
                    return Err(format!("{}: {:?} reported: {line}", self.what, cmd.trim()));
                }
            }
        }
    }

    /// Closes standard input and waits for qemu-io to exit cleanly.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{} did not exit after its input ended", self.what);
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success(), "{} exited with {status}", self.what);
    }
}

impl Drop for QemuIoSession {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// nbdfuse serving the export as a file, a loop device on that file and an ext4 mount on the
/// loop device; undone in reverse order on drop, also when the test fails.
pub struct Ext4Stack {
    pub nbdfuse: Option<Child>,
    pub fuse_dir: PathBuf,
    pub loop_dev: Option<String>,
    pub mount_dir: Option<PathBuf>,
}

impl Ext4Stack {
    pub fn unmount(&mut self) {
        if let Some(m) = self.mount_dir.take() {
            run_ok(Command::new("umount").arg(&m));
        }
    }

    pub fn detach_loop(&mut self) {
        if let Some(dev) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&dev));
        }
    }

    /// Unmounts the FUSE file system, which ends nbdfuse after it has flushed and
    /// disconnected.
    pub fn stop_nbdfuse(&mut self) {
        if let Some(mut child) = self.nbdfuse.take() {
            let (ok, _, err) = run_timeout(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir), Duration::from_secs(30));
            assert!(ok, "fusermount3 -u failed: {err}");
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nbdfuse did not exit after its file system was unmounted");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Ext4Stack {
    fn drop(&mut self) {
        let quiet = |cmd: &mut Command| {
            let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        if let Some(m) = self.mount_dir.take() {
            quiet(Command::new("umount").arg("-l").arg(&m));
        }
        if let Some(dev) = self.loop_dev.take() {
            quiet(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut child) = self.nbdfuse.take() {
            quiet(Command::new("fusermount3").arg("-u").arg("-z").arg(&self.fuse_dir));
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts nbdfuse on `uri`, serving it as the file `<fuse_dir>/disk`; `None` (after saying
/// why) if FUSE mounts are not possible here.
pub fn start_nbdfuse(dir: &Path, uri: &str) -> Option<Ext4Stack> {
    let fuse_dir = dir.join("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let errfile = dir.join("nbdfuse.err");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errfile).unwrap())
        .spawn()
        .unwrap();
    let mut stack = Ext4Stack { nbdfuse: Some(child), fuse_dir, loop_dev: None, mount_dir: None };
    // nbdfuse writes its pid file once the file is served.
    let start = Instant::now();
    while !pidfile.exists() {
        if let Some(status) = stack.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
            stack.nbdfuse = None;
            let err = std::fs::read_to_string(&errfile).unwrap_or_default();
            if err.contains("fuse") {
                eprintln!("SKIPPED: FUSE mounts are not possible here: {err}");
                return None;
            }
            panic!("nbdfuse exited ({status}) before serving: {err}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "nbdfuse did not start serving");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(stack)
}
