//! The only `unsafe` of the kernel NBD attach: the nbd driver's ioctls (`linux/nbd.h`).

#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use nix::libc;

/// `_IO(0xab, nr)`.
const fn nbd_io(nr: u64) -> u64 {
    (0xab << 8) | nr
}
const SET_SOCK: u64 = nbd_io(0);
const SET_BLKSIZE: u64 = nbd_io(1);
const SET_SIZE: u64 = nbd_io(2);
const DO_IT: u64 = nbd_io(3);
const CLEAR_SOCK: u64 = nbd_io(4);
const DISCONNECT: u64 = nbd_io(8);
const SET_TIMEOUT: u64 = nbd_io(9);
const SET_FLAGS: u64 = nbd_io(10);

/// Runs one nbd ioctl whose argument is a plain integer.
fn ioctl(dev: &File, request: u64, arg: u64) -> io::Result<()> {
    // SAFETY: every nbd ioctl used here takes its argument by value (an integer or a file
    // descriptor), never as a pointer, so no memory is shared with the kernel; `dev` is an
    // open file for the duration of the call.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), request as libc::Ioctl, arg as libc::c_ulong) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Gives the driver one connected socket (the kernel's end of the pair).
pub fn set_sock(dev: &File, sock: RawFd) -> io::Result<()> {
    ioctl(dev, SET_SOCK, u64::from(sock.unsigned_abs()))
}

pub fn set_blksize(dev: &File, bytes: u64) -> io::Result<()> {
    ioctl(dev, SET_BLKSIZE, bytes)
}

pub fn set_size(dev: &File, bytes: u64) -> io::Result<()> {
    ioctl(dev, SET_SIZE, bytes)
}

/// Seconds after which the kernel gives up on a request (0: never).
pub fn set_timeout(dev: &File, seconds: u64) -> io::Result<()> {
    ioctl(dev, SET_TIMEOUT, seconds)
}

/// The transmission flags the server would advertise (`NBD_FLAG_*`).
pub fn set_flags(dev: &File, flags: u16) -> io::Result<()> {
    ioctl(dev, SET_FLAGS, u64::from(flags))
}

/// Runs the device: blocks until the connection ends or the device is disconnected.
pub fn do_it(dev: &File) -> io::Result<()> {
    ioctl(dev, DO_IT, 0)
}

pub fn clear_sock(dev: &File) -> io::Result<()> {
    ioctl(dev, CLEAR_SOCK, 0)
}

/// Asks the driver to send `NBD_CMD_DISC` and end the connection.
pub fn disconnect(dev: &File) -> io::Result<()> {
    ioctl(dev, DISCONNECT, 0)
}
