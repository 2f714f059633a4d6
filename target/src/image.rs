//! Volume images, and applying journal records to them: the one code path that keeps the replicas
//! current, rolls the base images forward and builds recovered images.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use hindsight_consistency::storage::{AlignedBuf, OpenMode, Storage, StorageFile, DIRECT_IO_ALIGN};
use hindsight_consistency::sync::lock;
use hindsight_consistency::{RecordRef, WriteKind};

use crate::error::TargetError;
use crate::layout::image_name;
use crate::model::Volume;

/// Applies one record to the image of its volume: data and resync data are written, zeroes
/// and trims make the range read back as zeroes (punching a hole where the file system can).
pub(crate) fn apply_record(file: &dyn StorageFile, rec: &RecordRef<'_>, reserved: bool) -> io::Result<()> {
    let h = &rec.header;
    match h.kind {
        // Resync data is the agent's disk content: written like data.
        WriteKind::Data | WriteKind::Resync => file.write_all_at(rec.data, h.offset),
        // A replica keeps its space reserved (it must not run out halfway); other images stay
        // sparse.
        WriteKind::Zeroes | WriteKind::Trim if reserved => file.zero_range_reserved(h.offset, u64::from(h.length)),
        WriteKind::Zeroes | WriteKind::Trim => file.zero_range(h.offset, u64::from(h.length)),
        WriteKind::Bookmark | WriteKind::Point | WriteKind::Superseded => Ok(()),
    }
}

/// True if the record lies inside a volume of `size` bytes.
pub(crate) fn in_bounds(rec: &RecordRef<'_>, size: u64) -> bool {
    rec.header.offset.checked_add(u64::from(rec.header.length)).is_some_and(|end| end <= size)
}

/// Writes of at least this many bytes go to a replica with direct I/O (when aligned and the
/// file system allows it): copying them through the page cache was most of the target's CPU
/// for large writes. Smaller ones stay buffered, where the page cache gathers them and a
/// direct write each would wait for the device.
const DIRECT_MIN: usize = 64 << 10;

/// One volume image file.
pub(crate) struct Image {
    pub volume: String,
    pub size: u64,
    pub path: PathBuf,
    pub file: Box<dyn StorageFile>,
    /// The same file for direct I/O, for large aligned writes (replicas only), opened on the
    /// first such write: an idle replica holds one descriptor.
    direct: Option<LazyDirect>,
    /// All its space is reserved and stays so: zeroes and trims keep it allocated (replicas).
    reserved: bool,
}

/// A file opened for direct I/O and the staging buffer its writes are aligned in.
type DirectFile = (Box<dyn StorageFile>, Mutex<AlignedBuf>);

/// An image's file for direct I/O, opened when first needed.
struct LazyDirect {
    fs: Arc<dyn Storage>,
    group: String,
    /// `Some(None)` once opening failed or the file system refused direct I/O: buffered then.
    opened: OnceLock<Option<DirectFile>>,
}

impl LazyDirect {
    fn get(&self, volume: &str, path: &Path) -> Option<&DirectFile> {
        self.opened
            .get_or_init(|| match self.fs.open_direct(path) {
                Ok(d) => d.map(|f| (f, Mutex::new(AlignedBuf::default()))),
                Err(e) => {
                    log::warn!(
                        "group {:?}: volume {volume:?}: cannot open {} for direct I/O ({e}); large writes go through the page cache",
                        self.group,
                        path.display()
                    );
                    None
                }
            })
            .as_ref()
    }
}

impl Image {
    /// Creates a blank image, replacing any leftover file: sparse, or with all its space
    /// reserved when `preallocate` (replicas: random writes into holes cost the file system
    /// far more than writes into allocated space, and a replica must not run out of space
    /// halfway).
    pub fn create(fs: &dyn Storage, group: &str, dir: &Path, vol: &Volume, preallocate: bool) -> Result<Image, TargetError> {
        let path = dir.join(image_name(&vol.name));
        let err = |step, source| TargetError::Image { group: group.to_owned(), volume: vol.name.clone(), step, path: path.clone(), source };
        let file = fs.open(&path, OpenMode::Truncate).map_err(|e| err("create", e))?;
        if preallocate {
            file.allocate(vol.size).map_err(|e| err("reserve space for", e))?;
        } else {
            file.set_len(vol.size).map_err(|e| err("set the size of", e))?;
        }
        file.sync_data().map_err(|e| err("sync", e))?;
        Ok(Image { volume: vol.name.clone(), size: vol.size, path, file, direct: None, reserved: preallocate })
    }

    /// Opens an existing image for reading (and writing if `write`).
    pub fn open(fs: &dyn Storage, group: &str, dir: &Path, vol: &Volume, write: bool) -> Result<Image, TargetError> {
        let path = dir.join(image_name(&vol.name));
        let err = |step, source| TargetError::Image { group: group.to_owned(), volume: vol.name.clone(), step, path: path.clone(), source };
        let mode = if write { OpenMode::ReadWrite } else { OpenMode::Read };
        let file = fs.open(&path, mode).map_err(|e| err("open", e))?;
        let len = file.len().map_err(|e| err("stat", e))?;
        if len != vol.size {
            if !write {
                return Err(err("check the size of", io::Error::other(format!("{len} bytes, the volume has {}", vol.size))));
            }
            log::warn!(
                "group {group:?}: volume {:?}: {} is {len} bytes, the volume has {}; resizing it",
                vol.name,
                path.display(),
                vol.size
            );
            file.set_len(vol.size).map_err(|e| err("resize", e))?;
        }
        Ok(Image { volume: vol.name.clone(), size: vol.size, path, file, direct: None, reserved: false })
    }

    /// Writes large aligned records with direct I/O (when `on` and the file system allows it;
    /// the file is opened for it on the first such write), so that they bypass the page cache.
    pub fn with_direct_io(mut self, fs: &Arc<dyn Storage>, group: &str, on: bool) -> Image {
        if on {
            self.direct = Some(LazyDirect { fs: Arc::clone(fs), group: group.to_owned(), opened: OnceLock::new() });
        }
        self
    }

    /// Writes a record's data with direct I/O if it is large and aligned; false if it must
    /// take the buffered path.
    fn write_direct(&self, rec: &RecordRef<'_>) -> io::Result<bool> {
        let Some(lazy) = &self.direct else { return Ok(false) };
        let align = DIRECT_IO_ALIGN as u64;
        let aligned = rec.header.offset.is_multiple_of(align) && rec.data.len().is_multiple_of(DIRECT_IO_ALIGN);
        if !matches!(rec.header.kind, WriteKind::Data | WriteKind::Resync) || rec.data.len() < DIRECT_MIN || !aligned {
            return Ok(false);
        }
        let Some((file, staging)) = lazy.get(&self.volume, &self.path) else { return Ok(false) };
        let mut staging = lock(staging);
        file.write_all_at(staging.padded(rec.data), rec.header.offset)?;
        Ok(true)
    }

    /// Applies a record of this image's volume.
    pub fn apply(&self, group: &str, rec: &RecordRef<'_>) -> Result<(), TargetError> {
        if !in_bounds(rec, self.size) {
            return Err(TargetError::Inconsistent {
                group: group.to_owned(),
                reason: format!(
                    "seq {} writes {}+{} past the end of volume {:?} ({} bytes)",
                    rec.header.seq, rec.header.offset, rec.header.length, self.volume, self.size
                ),
            });
        }
        let res = match self.write_direct(rec) {
            Ok(true) => Ok(()),
            Ok(false) => apply_record(self.file.as_ref(), rec, self.reserved),
            Err(e) => Err(e),
        };
        res.map_err(|source| TargetError::Apply {
            group: group.to_owned(),
            volume: self.volume.clone(),
            seq: rec.header.seq,
            path: self.path.clone(),
            source,
        })
    }

    /// fdatasync.
    pub fn sync(&self, group: &str) -> Result<(), TargetError> {
        self.file.sync_data().map_err(|source| TargetError::Image {
            group: group.to_owned(),
            volume: self.volume.clone(),
            step: "sync",
            path: self.path.clone(),
            source,
        })
    }
}

/// The images of all volumes of a group in one directory (`replica/` or `base/`).
#[derive(Clone)]
pub(crate) struct ImageSet {
    group: String,
    images: BTreeMap<String, Arc<Image>>,
}

impl ImageSet {
    pub fn empty(group: &str) -> ImageSet {
        ImageSet { group: group.to_owned(), images: BTreeMap::new() }
    }

    /// Opens the images of `volumes` in `dir` for writing.
    pub fn open(fs: &dyn Storage, group: &str, dir: &Path, volumes: &[Volume]) -> Result<ImageSet, TargetError> {
        let mut set = ImageSet::empty(group);
        for v in volumes {
            set.insert(Image::open(fs, group, dir, v, true)?);
        }
        Ok(set)
    }

    /// Opens the replicas of `volumes` in `dir`: for writing, and large writes with direct
    /// I/O where the file system allows it.
    pub fn open_replicas(
        fs: &Arc<dyn Storage>,
        group: &str,
        dir: &Path,
        volumes: &[Volume],
        direct_io: bool,
    ) -> Result<ImageSet, TargetError> {
        let mut set = ImageSet::empty(group);
        for v in volumes {
            let mut image = Image::open(fs.as_ref(), group, dir, v, true)?.with_direct_io(fs, group, direct_io);
            // Holes a replica may have from an earlier version (which punched trims) are
            // reserved again; allocated space is left as it is.
            if let Err(e) = image.file.allocate(v.size) {
                log::warn!(
                    "group {group:?}: volume {:?}: cannot reserve the space of {} ({e}); it may run out of space",
                    v.name,
                    image.path.display()
                );
            }
            image.reserved = true;
            set.insert(image);
        }
        Ok(set)
    }

    pub fn insert(&mut self, image: Image) {
        self.images.insert(image.volume.clone(), Arc::new(image));
    }

    /// The image of a volume.
    pub fn image(&self, volume: &str) -> Option<&Image> {
        self.images.get(volume).map(|i| &**i)
    }

    /// Applies a record to the image of its volume.
    pub fn apply(&self, rec: &RecordRef<'_>) -> Result<(), TargetError> {
        if !rec.header.kind.changes_volume() {
            // A point in the sequence or a superseded write, not a change.
            return Ok(());
        }
        match self.images.get(rec.volume) {
            Some(img) => img.apply(&self.group, rec),
            None => Err(TargetError::Inconsistent {
                group: self.group.clone(),
                reason: format!("seq {} is for volume {:?}, which the group does not have", rec.header.seq, rec.volume),
            }),
        }
    }

    /// fdatasync of every image.
    pub fn sync(&self) -> Result<(), TargetError> {
        self.images.values().try_for_each(|img| img.sync(&self.group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::record::RecordHeader;
    use hindsight_consistency::storage::StdStorage;
    use std::os::unix::fs::MetadataExt;

    fn record<'a>(seq: u64, kind: WriteKind, offset: u64, length: u32, data: &'a [u8]) -> RecordRef<'a> {
        RecordRef { header: RecordHeader { seq, time_ns: seq, kind, offset, length }, volume: "db", data }
    }

    fn blocks(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks()
    }

    #[test]
    fn a_trim_keeps_a_replicas_space_and_frees_a_base_images() {
        let d = tempfile::tempdir().unwrap();
        let vol = Volume { name: "db".into(), vm: "vm1".into(), size: 1 << 20 };
        let (rdir, bdir) = (d.path().join("replica"), d.path().join("base"));
        std::fs::create_dir_all(&rdir).unwrap();
        std::fs::create_dir_all(&bdir).unwrap();
        let replica = Image::create(&StdStorage, "erp", &rdir, &vol, true).unwrap();
        let base = Image::create(&StdStorage, "erp", &bdir, &vol, false).unwrap();
        let data = vec![9u8; 1 << 20];
        for image in [&replica, &base] {
            image.apply("erp", &record(1, WriteKind::Data, 0, 1 << 20, &data)).unwrap();
            image.sync("erp").unwrap();
        }
        let (r_before, b_before) = (blocks(&replica.path), blocks(&base.path));
        for image in [&replica, &base] {
            image.apply("erp", &record(2, WriteKind::Trim, 0, 512 << 10, &[])).unwrap();
            image.apply("erp", &record(3, WriteKind::Zeroes, 512 << 10, 256 << 10, &[])).unwrap();
            let mut buf = vec![1u8; 1 << 20];
            image.file.read_exact_at(&mut buf, 0).unwrap();
            assert!(buf[..768 << 10].iter().all(|&b| b == 0) && buf[768 << 10..].iter().all(|&b| b == 9));
        }
        assert_eq!(blocks(&replica.path), r_before, "the replica gave space back");
        assert!(blocks(&base.path) < b_before, "the base image stays sparse");
    }
}
