//! The only `unsafe` of the ublk front end: the io_uring submissions that hand the kernel
//! pointers, and the shared mappings (request descriptors, I/O buffers).
//!
//! Soundness rests on one rule: memory the kernel may write into stays mapped while any
//! command that names it is outstanding. [`Control`] waits for every command it submits.
//! [`QueueIo`] owns its I/O buffers and counts its outstanding commands; if it is dropped
//! with commands still in the kernel, it leaks the buffers instead of unmapping them.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use super::abi::{self, CtrlCmd, DevInfo, IoDesc, Params, DEV_INFO_LEN, IO_DESC_LEN, MAX_QUEUE_DEPTH};

/// The control device every ublk device is created and removed through.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().and_then(|p| usize::try_from(p).ok()).unwrap_or(4096)
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Control commands on `/dev/ublk-control`, each submitted and waited for.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    /// Opens the control device.
    pub fn open() -> io::Result<Control> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL_PATH)?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Control { file, ring })
    }

    /// Runs one command; `buf` is the structure the command reads or fills. Returns the
    /// command's non-negative result.
    fn command(&mut self, op: u32, dev_id: u32, data0: u64, buf: Option<&mut [u8]>) -> io::Result<i32> {
        let (addr, len) = match buf {
            Some(b) => (b.as_mut_ptr() as u64, u16::try_from(b.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?),
            None => (0, 0),
        };
        let cmd = CtrlCmd { dev_id, queue_id: u16::MAX, len, addr, data0 };
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op).cmd(cmd.encode()).build().user_data(1);
        // SAFETY: the command names `buf` (or nothing), which is borrowed mutably for this
        // whole call, and the call does not return until the command's completion has been
        // reaped (or the ring is unusable, in which case `ring` is leaked below).
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| io::Error::other("ublk control ring is full"))?;
        loop {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The command may still be in the kernel and may write `buf` later: never
                // give its memory back while that can happen.
                let dead = std::mem::replace(&mut self.ring, IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?);
                std::mem::forget(dead);
                return Err(e);
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                return if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res) };
            }
        }
    }

    /// Adds a device; `info.dev_id` is the wanted id or `u32::MAX` for any. Returns the
    /// device as the kernel created it.
    pub fn add(&mut self, info: &DevInfo) -> io::Result<DevInfo> {
        let mut buf = info.encode();
        self.command(abi::CMD_ADD_DEV, info.dev_id, 0, Some(&mut buf))?;
        Ok(DevInfo::decode(&buf))
    }

    /// The device's description and state.
    pub fn info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut buf = [0u8; DEV_INFO_LEN];
        self.command(abi::CMD_GET_DEV_INFO, dev_id, 0, Some(&mut buf))?;
        Ok(DevInfo::decode(&buf))
    }

    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> io::Result<()> {
        let mut buf = params.encode();
        self.command(abi::CMD_SET_PARAMS, dev_id, 0, Some(&mut buf)).map(drop)
    }

    /// Starts the device; returns once every queue has fetched all its tags and the block
    /// device exists.
    pub fn start(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        self.command(abi::CMD_START_DEV, dev_id, u64::from(pid.unsigned_abs()), None).map(drop)
    }

    pub fn stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(abi::CMD_STOP_DEV, dev_id, 0, None).map(drop)
    }

    pub fn delete(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(abi::CMD_DEL_DEV, dev_id, 0, None).map(drop)
    }

    pub fn start_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.command(abi::CMD_START_USER_RECOVERY, dev_id, 0, None).map(drop)
    }

    /// Ends a recovery: like [`Control::start`], returns once every queue is serving again.
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> io::Result<()> {
        self.command(abi::CMD_END_USER_RECOVERY, dev_id, u64::from(pid.unsigned_abs()), None).map(drop)
    }
}

/// A private anonymous mapping (page aligned, zero filled).
struct Mapping {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory; access to it is coordinated by `QueueIo` / `DescArea`.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this struct created and nothing else unmaps.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

/// The request descriptors of one queue, mapped read-only from the char device.
pub struct DescArea {
    map: Mapping,
    depth: usize,
}

impl DescArea {
    pub fn map(cdev: &File, queue: u16, depth: usize) -> io::Result<DescArea> {
        let page = page_size();
        let len = round_up(depth * IO_DESC_LEN, page);
        let stride = round_up(MAX_QUEUE_DEPTH * IO_DESC_LEN, page);
        let offset = i64::try_from(usize::from(queue) * stride).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let nz = NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared read-only mapping of the device's descriptor area; the
        // kernel checks offset and length.
        let ptr = unsafe { mmap(None, nz, ProtFlags::PROT_READ, MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE, cdev.as_fd(), offset) }?;
        Ok(DescArea { map: Mapping { ptr, len }, depth })
    }

    /// The descriptor of `tag`, as the kernel last wrote it.
    pub fn get(&self, tag: u16) -> IoDesc {
        assert!(usize::from(tag) < self.depth, "tag {tag} beyond the queue depth");
        let mut b = [0u8; IO_DESC_LEN];
        let base = self.map.ptr.as_ptr().cast::<u8>();
        for (i, byte) in b.iter_mut().enumerate() {
            // SAFETY: in bounds (tag < depth, the mapping holds depth descriptors); the kernel
            // wrote this descriptor before completing the tag's fetch, so volatile byte reads
            // see it without tearing concerns.
            *byte = unsafe { base.add(usize::from(tag) * IO_DESC_LEN + i).read_volatile() };
        }
        IoDesc::decode(&b)
    }
}

/// What one completion on a queue's ring means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The kernel handed a request to `tag`: its descriptor is ready (and, for a write, its
    /// data is in the tag's buffer).
    Request(u16),
    /// `tag`'s command ended without a request (`res` < 0): the queue is stopping or the
    /// command failed. The tag is idle for good.
    Ended { tag: u16, res: i32 },
    /// The wake-up event fired: completions are waiting on the channel.
    Woken,
}

const WAKE_USER_DATA: u64 = u64::MAX;

/// One queue's io_uring, its per-tag I/O buffers and its wake-up eventfd. Used only by the
/// queue's own thread: ublk requires one task to issue every command of a queue.
pub struct QueueIo {
    ring: IoUring,
    cdev: File,
    queue: u16,
    buffers: Option<Mapping>,
    buf_size: usize,
    depth: u16,
    outstanding: usize,
    wake: std::sync::Arc<EventFd>,
}

impl QueueIo {
    pub fn new(cdev: &File, queue: u16, depth: u16, buf_size: usize) -> io::Result<QueueIo> {
        let ring = IoUring::builder().setup_cqsize(u32::from(depth) * 2 + 2).build(u32::from(depth) + 2)?;
        // The tags' buffers, then 8 bytes for the eventfd reads.
        let len = buf_size * usize::from(depth) + 8;
        let nz = NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh private anonymous mapping, owned by the returned value.
        let ptr = unsafe {
            mmap_anonymous(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE)
        }?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
        Ok(QueueIo {
            ring,
            cdev: cdev.try_clone()?,
            queue,
            buffers: Some(Mapping { ptr, len }),
            buf_size,
            outstanding: 0,
            wake: std::sync::Arc::new(wake),
            depth,
        })
    }

    /// The eventfd a completion writes to wake this queue's thread.
    pub fn waker(&self) -> std::sync::Arc<EventFd> {
        std::sync::Arc::clone(&self.wake)
    }

    /// Address of `tag`'s buffer (of the eventfd bytes for `tag == depth`).
    fn buffer_addr(&self, tag: u16) -> usize {
        let base = self.buffers.as_ref().map_or(0, |m| m.ptr.as_ptr() as usize);
        base + usize::from(tag) * self.buf_size
    }

    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every entry pushed here names only memory of `buffers` (a tag's buffer, or
        // the eventfd's 8 bytes after them), which stays mapped while `outstanding` > 0
        // (see Drop).
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }.map_err(|_| io::Error::other("ublk queue ring is full"))?;
        }
        self.outstanding += 1;
        Ok(())
    }

    /// Queues `FETCH_REQ` for `tag`: the tag waits for its first request.
    pub fn fetch(&mut self, tag: u16) -> io::Result<()> {
        let cmd = abi::io_cmd(self.queue, tag, -1, self.buffer_addr(tag) as u64);
        let sqe = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), abi::IO_FETCH_REQ).cmd(cmd).build().user_data(u64::from(tag));
        self.push(&sqe)
    }

    /// Queues `COMMIT_AND_FETCH_REQ`: completes `tag`'s request with `result` (bytes done, or
    /// a negative errno) and waits for the tag's next request.
    pub fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
        let cmd = abi::io_cmd(self.queue, tag, result, self.buffer_addr(tag) as u64);
        let sqe = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), abi::IO_COMMIT_AND_FETCH_REQ)
            .cmd(cmd)
            .build()
            .user_data(u64::from(tag));
        self.push(&sqe)
    }

    /// Queues a read of the wake-up eventfd.
    pub fn arm_wake(&mut self) -> io::Result<()> {
        let at = self.buffer_addr(self.depth) as *mut u8;
        let sqe = opcode::Read::new(types::Fd(self.wake.as_fd().as_raw_fd()), at, 8).build().user_data(WAKE_USER_DATA);
        self.push(&sqe)
    }

    /// Submits what was queued, waits for at least one completion and returns them all.
    pub fn submit_and_wait(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        events.clear();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        for cqe in self.ring.completion() {
            self.outstanding -= 1;
            let res = cqe.result();
            let event = match cqe.user_data() {
                WAKE_USER_DATA => Event::Woken,
                tag => {
                    let tag = u16::try_from(tag).map_err(|_| io::Error::other("ublk: completion for an unknown tag"))?;
                    if res == 0 {
                        Event::Request(tag)
                    } else {
                        Event::Ended { tag, res }
                    }
                }
            };
            events.push(event);
        }
        Ok(())
    }

    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// The first `len` bytes of `tag`'s buffer, to read a write's data or fill a read's.
    /// Only valid between the tag's `Request` event and its `commit`, when the kernel does
    /// not touch that buffer.
    pub fn buffer(&mut self, tag: u16, len: usize) -> &mut [u8] {
        assert!(tag < self.depth, "tag {tag} beyond the queue depth");
        assert!(len <= self.buf_size, "request of {len} bytes beyond the {} byte buffer", self.buf_size);
        let addr = self.buffer_addr(tag) as *mut u8;
        // SAFETY: in bounds of the mapping (tag < depth and len <= buf_size); the caller holds
        // `&mut self`, and between a tag's request and its commit the kernel leaves this
        // tag's buffer alone, so no one else reads or writes these bytes meanwhile.
        unsafe { std::slice::from_raw_parts_mut(addr, len) }
    }
}

impl Drop for QueueIo {
    fn drop(&mut self) {
        if self.outstanding > 0 {
            // Commands still in the kernel may write into the buffers: keep them mapped.
            std::mem::forget(self.buffers.take());
        }
    }
}
