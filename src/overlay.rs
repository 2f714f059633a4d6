//! The overlay of a writable export: what clients write to an exported point goes to a sparse
//! file of the volume's size, never into the history or the replicas. A map of 4 KiB blocks
//! says which blocks the overlay holds; a read takes those from the overlay and the rest from
//! the point. A write that covers part of a block first copies the block from the point.
//!
//! A scratch overlay (beside the group's journal) is deleted when the export stops. A kept one
//! (`--overlay DIR`) writes its map to `<volume>.map` at every flush and when the export stops,
//! after the data it describes is synced, so a later export of the same point reuses it:
//!
//! ```text
//!         0        1        2        3        4        5        6        7
//!    0  | magic "HSOVMAP1"                                                  |
//!    8  | version (u32) = 1                 | block_size (u32) = 4096       |
//!   16  | volume_size (u64)                                                 |
//!   24  | words: ceil(blocks / 64) × u64 (bit b of word w: block 64 w + b)   |
//!       | crc32c (u32) of every byte before it                               |
//! ```
//!
//! Grammar: `{ magic | version | block_size | volume_size | words | crc32c }`. A map that does
//! not check out is refused (never guessed at): blocks written since the last flush are lost on
//! a crash, as on any disk, and nothing else.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hindsight_consistency::sync::lock;
use hindsight_splitter::block::{BlockError, WriteKind, WriteOp};

/// The overlay's block size.
pub const BLOCK: u64 = 4096;

/// The map file's first eight bytes.
const MAP_MAGIC: &[u8; 8] = b"HSOVMAP1";
/// Bytes of the map file before the words.
const MAP_HEADER: usize = 24;

/// One volume's overlay.
pub struct Overlay {
    file: File,
    path: PathBuf,
    size: u64,
    /// Bit `b` set: block `b` is in the overlay. Writes hold it while they run.
    map: Mutex<Vec<u64>>,
    /// Where a kept overlay writes its map; `None` for a scratch one.
    map_path: Option<PathBuf>,
}

fn words_for(size: u64) -> io::Result<usize> {
    usize::try_from(size.div_ceil(BLOCK).div_ceil(64)).map_err(|_| io::Error::other("volume too large"))
}

impl Overlay {
    /// Creates the overlay file of a volume of `size` bytes (sparse: it takes space only as
    /// clients write); with `map_path` it is kept, its map written there.
    pub fn create(path: &Path, size: u64, map_path: Option<PathBuf>) -> io::Result<Overlay> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        let overlay = Overlay { file, path: path.to_owned(), size, map: Mutex::new(vec![0; words_for(size)?]), map_path };
        overlay.save_map()?;
        Ok(overlay)
    }

    /// Opens a kept overlay again: its data file and its map, which must check out and be of
    /// a volume of `size` bytes.
    pub fn reopen(path: &Path, size: u64, map_path: PathBuf) -> io::Result<Overlay> {
        let bytes = std::fs::read(&map_path)?;
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", map_path.display()));
        let words = words_for(size)?;
        if bytes.len() != MAP_HEADER + 8 * words + 4 {
            return Err(bad("not the map of a volume of this size"));
        }
        let body = bytes.len() - 4;
        if &bytes[..8] != MAP_MAGIC || crc32c::crc32c(&bytes[..body]) != u32::from_le_bytes(bytes[body..].try_into().expect("4 bytes")) {
            return Err(bad("damaged (bad magic or checksum)"));
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let (version, block) =
            (u32::from_le_bytes(bytes[8..12].try_into().expect("4")), u32::from_le_bytes(bytes[12..16].try_into().expect("4")));
        if version != 1 || u64::from(block) != BLOCK || word(16) != size {
            return Err(bad("another version, block size or volume size"));
        }
        let map: Vec<u64> = (0..words).map(|w| word(MAP_HEADER + 8 * w)).collect();
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != size {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: not the size of the volume", path.display())));
        }
        Ok(Overlay { file, path: path.to_owned(), size, map: Mutex::new(map), map_path: Some(map_path) })
    }

    /// Writes the map of a kept overlay (atomically: a temporary file, synced, renamed).
    fn save_map(&self) -> io::Result<()> {
        let Some(path) = &self.map_path else { return Ok(()) };
        let map = lock(&self.map);
        let mut out = Vec::with_capacity(MAP_HEADER + 8 * map.len() + 4);
        out.extend_from_slice(MAP_MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&u32::try_from(BLOCK).expect("small").to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        for w in map.iter() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        drop(map);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        hindsight_consistency::storage::write_file_atomic(&hindsight_consistency::storage::StdStorage, path, &out)
    }

    /// Bytes of written blocks.
    pub fn bytes(&self) -> u64 {
        lock(&self.map).iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * BLOCK
    }

    /// Reads `buf.len()` bytes at `offset`: blocks the overlay holds from it, the rest through
    /// `point`.
    pub fn read(&self, offset: u64, buf: &mut [u8], point: &dyn Fn(u64, &mut [u8]) -> io::Result<()>) -> io::Result<()> {
        let map = lock(&self.map);
        self.read_locked(&map, offset, buf, point)
    }

    fn read_locked(&self, map: &[u64], offset: u64, buf: &mut [u8], point: &dyn Fn(u64, &mut [u8]) -> io::Result<()>) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let mine = held(map, at / BLOCK);
            // The stretch of blocks with the same source.
            let mut stop = (at / BLOCK + 1) * BLOCK;
            while stop < end && held(map, stop / BLOCK) == mine {
                stop += BLOCK;
            }
            let stop = stop.min(end);
            let out = &mut buf[usize::try_from(at - offset).expect("in buf")..usize::try_from(stop - offset).expect("in buf")];
            if mine {
                self.file.read_exact_at(out, at)?;
            } else {
                point(at, out)?;
            }
            at = stop;
        }
        Ok(())
    }

    /// Applies a client's write, write-zeroes or trim.
    pub fn write(&self, op: &WriteOp, point: &dyn Fn(u64, &mut [u8]) -> io::Result<()>) -> Result<(), BlockError> {
        let len = op.kind.len();
        let end = op.offset.checked_add(len).filter(|&e| e <= self.size).ok_or(BlockError::Invalid)?;
        let mut map = lock(&self.map);
        let io = |e: io::Error| {
            let err = BlockError::from_io(&e);
            if err == BlockError::NoSpace {
                log::warn!(
                    "export overlay {}: the file system holding it is full ({e}); the client's write got ENOSPC and nothing \
                     else changed: free space there, or export again with --overlay DIR on a larger file system",
                    self.path.display()
                );
            } else {
                log::warn!("export overlay {}: {e}; the client's write got {err}", self.path.display());
            }
            err
        };
        let mut block = vec![0u8; usize::try_from(BLOCK).expect("small")];
        let mut at = op.offset;
        while at < end {
            let b = at / BLOCK;
            let (start, stop) = (b * BLOCK, ((b + 1) * BLOCK).min(self.size));
            let piece_end = stop.min(end);
            let whole = at == start && piece_end == stop;
            let out = &mut block[..usize::try_from(stop - start).expect("a block")];
            if !whole {
                self.read_locked(&map, start, out, point).map_err(io)?;
            }
            let from = usize::try_from(at - start).expect("in block");
            let to = usize::try_from(piece_end - start).expect("in block");
            match &op.kind {
                WriteKind::Data(data) => {
                    let src = usize::try_from(at - op.offset).expect("in data");
                    out[from..to].copy_from_slice(&data[src..src + (to - from)]);
                }
                WriteKind::Zeroes { .. } | WriteKind::Trim { .. } => out[from..to].fill(0),
            }
            self.file.write_all_at(out, start).map_err(io)?;
            set(&mut map, b);
            at = piece_end;
        }
        if op.fua {
            self.file.sync_data().map_err(io)?;
        }
        Ok(())
    }

    /// Makes the written blocks durable in the overlay file, then (kept) its map.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()?;
        self.save_map()
    }

    /// Ends the overlay: a scratch one is deleted, a kept one flushed and left for reuse.
    pub fn finish(self) -> io::Result<()> {
        if self.map_path.is_some() {
            return self.flush();
        }
        std::fs::remove_file(&self.path)
    }
}

fn held(map: &[u64], block: u64) -> bool {
    let b = usize::try_from(block).expect("checked at creation");
    map[b / 64] & (1 << (b % 64)) != 0
}

fn set(map: &mut [u64], block: u64) {
    let b = usize::try_from(block).expect("checked at creation");
    map[b / 64] |= 1 << (b % 64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn reads_after_random_writes_equal_a_model_and_the_point_is_untouched() {
        let d = tempfile::tempdir().unwrap();
        let size = 64 * 1024 + 1000;
        let point_bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let point = |off: u64, buf: &mut [u8]| {
            let at = usize::try_from(off).unwrap();
            buf.copy_from_slice(&point_bytes[at..at + buf.len()]);
            Ok(())
        };
        let o = Overlay::create(&d.path().join("v.overlay"), size, None).unwrap();
        let mut model = point_bytes.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for i in 0..200 {
            let off = rng.gen_range(0..size - 1);
            let len = rng.gen_range(1..=(size - off).min(10_000));
            let (at, n) = (usize::try_from(off).unwrap(), usize::try_from(len).unwrap());
            let kind = if i % 7 == 0 {
                model[at..at + n].fill(0);
                WriteKind::Zeroes { len: u32::try_from(len).unwrap() }
            } else {
                let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                model[at..at + n].copy_from_slice(&data);
                WriteKind::Data(data)
            };
            o.write(&WriteOp { offset: off, kind, fua: i % 50 == 0 }, &point).unwrap();
        }
        let mut got = vec![0u8; usize::try_from(size).unwrap()];
        o.read(0, &mut got, &point).unwrap();
        assert!(got == model, "the overlay's reads differ from the model");
        let mut part = vec![0u8; 5000];
        o.read(12_345, &mut part, &point).unwrap();
        assert_eq!(&part[..], &model[12_345..17_345]);
        assert!(o.bytes() > 0);
        assert_eq!(
            o.write(&WriteOp { offset: size - 10, kind: WriteKind::Zeroes { len: 11 }, fua: false }, &point),
            Err(BlockError::Invalid)
        );
        o.finish().unwrap();
        assert!(!d.path().join("v.overlay").exists());
    }

    #[test]
    fn a_kept_overlay_is_reopened_with_its_writes_and_a_damaged_map_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let point = |_: u64, buf: &mut [u8]| {
            buf.fill(3);
            Ok(())
        };
        let (data, map) = (d.path().join("v.overlay"), d.path().join("v.map"));
        let o = Overlay::create(&data, size, Some(map.clone())).unwrap();
        o.write(&WriteOp { offset: 5000, kind: WriteKind::Data(vec![9; 10_000]), fua: false }, &point).unwrap();
        o.finish().unwrap();
        let o = Overlay::reopen(&data, size, map.clone()).unwrap();
        let mut buf = vec![0u8; 20_000];
        o.read(0, &mut buf, &point).unwrap();
        assert!(buf[..5000].iter().all(|&b| b == 3) && buf[5000..15_000].iter().all(|&b| b == 9) && buf[15_000..].iter().all(|&b| b == 3));
        drop(o);
        assert!(Overlay::reopen(&data, size * 2, map.clone()).is_err(), "another volume size");
        let mut bytes = std::fs::read(&map).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&map, bytes).unwrap();
        let e = Overlay::reopen(&data, size, map).err().unwrap();
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
