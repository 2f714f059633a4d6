//! The small file-system trait all journal and replica I/O goes through.
//!
//! Production code uses [`StdStorage`]; tests can swap in a backend that separates written
//! bytes from durable bytes, or fails and tears writes at a chosen point.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; created empty if absent, kept as it is if present.
    Create,
    /// Read and write; created empty, replacing any existing file.
    Truncate,
}

/// A file opened through a [`Storage`].
pub trait StorageFile: Send + Sync {
    /// Reads at `offset`; returns the bytes read (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the file holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (sparse) to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes a range read back as zeroes, freeing space where the file system can.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `offset..offset + len` read back as zeroes and keeps its space reserved (a
    /// preallocated replica stays preallocated). The default is [`StorageFile::zero_range`].
    fn zero_range_reserved(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }
    /// Sets the length to `len` and reserves disk space for all of it, so that later writes
    /// neither allocate nor run out of space. The default only sets the length.
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    /// False when `start..end` is known to read back as zeroes without being read (a hole,
    /// or space reserved and never written); true when it may hold data or nobody can tell.
    fn may_hold_data(&self, start: u64, end: u64) -> bool {
        let _ = (start, end);
        true
    }
    /// Drops `len` bytes at `offset` from the page cache (after reading them once, so that a
    /// scan does not fill the cache); the default does nothing.
    fn drop_cached(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    done += n;
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// A place files live in.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Lists the names of the entries of a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes a directory's entries (creations, removals, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// True if the path exists.
    fn exists(&self, path: &Path) -> bool;
    /// Opens an existing file for reading and writing with direct I/O (`O_DIRECT`: writes go
    /// to the device without the page cache; buffers, offsets and lengths must be multiples
    /// of [`DIRECT_IO_ALIGN`]). `None` where direct I/O is not available (tmpfs, or a backend
    /// that models the page cache, like the fault-injecting one of the tests).
    fn open_direct(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        let _ = path;
        Ok(None)
    }
}

/// Alignment of buffers, offsets and lengths of direct I/O.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A reusable buffer whose contents start at a [`DIRECT_IO_ALIGN`]-aligned address, for direct
/// I/O writes (the global allocator does not promise that alignment for a `Vec<u8>`).
#[derive(Debug, Default)]
pub struct AlignedBuf {
    buf: Vec<u8>,
}

impl AlignedBuf {
    /// `bytes` followed by zeroes up to the next multiple of [`DIRECT_IO_ALIGN`], at an
    /// aligned address.
    pub fn padded(&mut self, bytes: &[u8]) -> &[u8] {
        let len = bytes.len().div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN;
        if self.buf.len() < len + DIRECT_IO_ALIGN {
            self.buf = vec![0; len + DIRECT_IO_ALIGN];
        }
        let at = self.buf.as_ptr().align_offset(DIRECT_IO_ALIGN);
        let out = &mut self.buf[at..at + len];
        out[..bytes.len()].copy_from_slice(bytes);
        out[bytes.len()..].fill(0);
        out
    }
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdStorage;

impl StdStorage {
    /// A shared handle to the real file system.
    pub fn shared() -> Arc<dyn Storage> {
        Arc::new(StdStorage)
    }
}

struct StdFile(File);

impl StorageFile for StdFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        // Seeking works for block devices too, where metadata().len() is 0.
        let meta = self.0.metadata()?;
        if meta.is_file() {
            return Ok(meta.len());
        }
        let mut f = &self.0;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(&self.0, offset, len)
    }
    fn zero_range_reserved(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range_reserved(&self.0, offset, len)
    }
    fn may_hold_data(&self, start: u64, end: u64) -> bool {
        may_hold_data(&self.0, start, end)
    }
    fn drop_cached(&self, offset: u64, len: u64) {
        drop_cached(&self.0, offset, len)
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let l = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.0), FallocateFlags::empty(), 0, l) {
            Ok(()) => Ok(()),
            // A file system without fallocate: a sparse file still works, it just allocates
            // as it is written.
            Err(nix::errno::Errno::EOPNOTSUPP) => self.0.set_len(len),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

/// False when `start..end` of `file` is known to read back as zeroes without being read
/// (`SEEK_DATA` finds no data before `end`: a hole, or space reserved and never written); true
/// when it may hold data, or when the file system cannot tell (a block device).
pub fn may_hold_data(file: &File, start: u64, end: u64) -> bool {
    use nix::unistd::{lseek, Whence};
    let Ok(from) = i64::try_from(start) else { return true };
    match lseek(std::os::fd::AsRawFd::as_raw_fd(file), from, Whence::SeekData) {
        Ok(data) => u64::try_from(data).map_or(true, |d| d < end),
        // ENXIO: no data at or after `start`.
        Err(nix::errno::Errno::ENXIO) => false,
        Err(_) => true,
    }
}

/// Asks the kernel to drop `len` bytes at `offset` of `file` from the page cache.
pub fn drop_cached(file: &File, offset: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    if let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) {
        let _ = posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(file), off, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
    }
}

/// Makes `[offset, offset+len)` of `file` read back as zeroes: punches a hole where the file
/// system supports it, otherwise writes zeroes.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(std::os::fd::AsRawFd::as_raw_fd(file), flags, off, l).is_ok() {
        return Ok(());
    }
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        file.write_all_at(&zeroes[..usize::try_from(n).expect("at most 1 MiB")], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Makes a range of `file` read back as zeroes with its space still allocated: zeroed extents
/// where the file system has them (`FALLOC_FL_ZERO_RANGE`), else a punched hole allocated
/// again (tmpfs), else written zeroes.
pub fn zero_range_reserved(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    if fallocate(fd, FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE, off, l).is_ok() {
        return Ok(());
    }
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if fallocate(fd, punch, off, l).is_ok() {
        return fallocate(fd, FallocateFlags::FALLOC_FL_KEEP_SIZE, off, l).map_err(io::Error::from);
    }
    zero_range(file, offset, len)
}

impl Storage for StdStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::Create => o.read(true).write(true).create(true),
            OpenMode::Truncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Box::new(StdFile(o.open(path)?)))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            if let Ok(name) = e?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn open_direct(&self, path: &Path) -> io::Result<Option<Box<dyn StorageFile>>> {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new().read(true).write(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path) {
            Ok(f) => Ok(Some(Box::new(StdFile(f)))),
            // The file system does not do direct I/O.
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file, fsync, rename, fsync of
/// the directory.
pub fn write_file_atomic(fs: &dyn Storage, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp: PathBuf = {
        let mut s = path.as_os_str().to_owned();
        s.push(".tmp");
        s.into()
    };
    let f = fs.open(&tmp, OpenMode::Truncate)?;
    f.write_all_at(bytes, 0)?;
    f.sync_data()?;
    drop(f);
    fs.rename(&tmp, path)?;
    fs.sync_dir(path.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zeroing_a_reserved_range_keeps_its_space_and_reads_back_zeroes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("replica.img");
        let f = StdStorage.open(&path, OpenMode::Truncate).unwrap();
        f.allocate(1 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        f.sync_data().unwrap();
        let reserved = std::fs::metadata(&path).unwrap().blocks();
        f.zero_range_reserved(4096, 512 << 10).unwrap();
        let mut buf = vec![1u8; 1 << 20];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[4096..4096 + (512 << 10)].iter().all(|&b| b == 0));
        assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096 + (512 << 10)..].iter().all(|&b| b == 7));
        assert_eq!(std::fs::metadata(&path).unwrap().blocks(), reserved, "the zeroed range gave its space back");
        // A plain zero_range punches a hole: the space goes (where the file system can).
        f.zero_range(4096, 512 << 10).unwrap();
        assert!(std::fs::metadata(&path).unwrap().blocks() <= reserved);
    }
}
