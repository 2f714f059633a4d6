//! Reading a group's small index files (`bookmarks.toml`, `spans.toml`) whole, through
//! [`Storage`] like every other file of the data directory, and what can go wrong with them.

use std::io;
use std::path::{Path, PathBuf};

use hindsight_consistency::storage::{OpenMode, Storage};
use thiserror::Error;

/// Read size; an index is a few KiB.
const CHUNK: usize = 64 << 10;

/// Why a group's bookmark or span index could not be read or replaced.
#[derive(Debug, Error)]
#[non_exhaustive]
pub(crate) enum IndexError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a valid index.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: toml::de::Error,
    },
    /// The new index could not be encoded.
    #[error("{source}")]
    Encode {
        /// The cause.
        #[source]
        source: toml::ser::Error,
    },
    /// The new index could not be written in place of the old one.
    #[error("{}: {source}", path.display())]
    Write {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The text of the file at `path`, or `None` if there is none. Its errors read like those of
/// `std::fs::read_to_string`.
pub(crate) fn read_text(fs: &dyn Storage, path: &Path) -> io::Result<Option<String>> {
    let f = match fs.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // To the end, whatever the file's length says (a directory's is no size at all).
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        match f.read_at(&mut chunk, buf.len() as u64) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(buf).map(Some).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    #[test]
    fn reads_like_read_to_string() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.toml");
        assert_eq!(read_text(&StdStorage, &path).unwrap(), None, "a missing file is no text");
        std::fs::write(&path, "through = 4\n").unwrap();
        assert_eq!(read_text(&StdStorage, &path).unwrap().as_deref(), Some("through = 4\n"));
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let (ours, std) = (read_text(&StdStorage, &path).unwrap_err(), std::fs::read_to_string(&path).unwrap_err());
        assert_eq!((ours.kind(), ours.to_string()), (std.kind(), std.to_string()));
        let (ours, std) = (read_text(&StdStorage, dir.path()).unwrap_err(), std::fs::read_to_string(dir.path()).unwrap_err());
        assert_eq!(ours.to_string(), std.to_string());
    }
}
