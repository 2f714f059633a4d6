//! The scratch overlay of a writable export: what clients write to an exported point goes to a
//! sparse file of the volume's size beside the group's journal, never into the history or the
//! replicas. A map of 4 KiB blocks says which blocks the overlay holds; a read takes those
//! from the overlay and the rest from the point. A write that covers part of a block first
//! copies the block from the point. The overlay is deleted when the export stops.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hindsight_consistency::sync::lock;
use hindsight_splitter::block::{BlockError, WriteKind, WriteOp};

/// The overlay's block size.
pub const BLOCK: u64 = 4096;

/// One volume's overlay.
pub struct Overlay {
    file: File,
    path: PathBuf,
    size: u64,
    /// Bit `b` set: block `b` is in the overlay. Writes hold it while they run.
    map: Mutex<Vec<u64>>,
}

impl Overlay {
    /// Creates the overlay file of a volume of `size` bytes (sparse: it takes space only as
    /// clients write).
    pub fn create(path: &Path, size: u64) -> io::Result<Overlay> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(size)?;
        let blocks = usize::try_from(size.div_ceil(BLOCK)).map_err(|_| io::Error::other("volume too large"))?;
        Ok(Overlay { file, path: path.to_owned(), size, map: Mutex::new(vec![0; blocks.div_ceil(64)]) })
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
            log::warn!("export overlay {}: {e}", self.path.display());
            BlockError::from_io(&e)
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

    /// Makes the written blocks durable in the overlay file.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deletes the overlay file.
    pub fn discard(self) -> io::Result<()> {
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
        let o = Overlay::create(&d.path().join("v.overlay"), size).unwrap();
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
        o.discard().unwrap();
        assert!(!d.path().join("v.overlay").exists());
    }
}
