//! The index of a group's bookmarks, `bookmarks.toml`, so that listing them never reads the
//! journal.
//!
//! The journal is the truth: a bookmark is a journal record (kind 4). The index is updated
//! after the commit that holds a bookmark and before the replicas' applied sequence number
//! passes it, so a crash in between is repaired by the start-up replay, which adds the
//! bookmarks it meets. Entries are unique by sequence number; readers keep those inside the
//! recoverable window.
//!
//! ```toml
//! [[bookmark]]
//! name = "before-upgrade"
//! seq = 1234
//! time_ns = 1795000000123456789
//! consistency = "app-consistent"
//! note = ""
//! ```

use std::path::Path;

use hindsight_consistency::storage::{write_file_atomic, Storage};
use hindsight_consistency::{BookmarkBody, RecordRef, WriteKind};
use serde::{Deserialize, Serialize};

use crate::index_file::{read_text, IndexError};
use crate::model::Bookmark;

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Index {
    #[serde(default)]
    bookmark: Vec<Bookmark>,
}

/// The bookmark a record is, if it is one.
pub(crate) fn from_record(rec: &RecordRef<'_>) -> Option<Bookmark> {
    if rec.header.kind != WriteKind::Bookmark {
        return None;
    }
    let body = BookmarkBody::decode(rec.data).ok()?;
    Some(Bookmark {
        name: rec.volume.to_owned(),
        seq: rec.header.seq,
        time_ns: rec.header.time_ns,
        consistency: body.consistency.as_str().to_owned(),
        note: body.note,
    })
}

/// Every bookmark of the index, oldest first (none if there is no index yet).
pub(crate) fn load(fs: &dyn Storage, path: &Path) -> Result<Vec<Bookmark>, IndexError> {
    match read_text(fs, path) {
        Ok(Some(text)) => {
            let i: Index = toml::from_str(&text).map_err(|source| IndexError::Parse { path: path.to_owned(), source })?;
            Ok(i.bookmark)
        }
        Ok(None) => Ok(Vec::new()),
        Err(source) => Err(IndexError::Read { path: path.to_owned(), source }),
    }
}

/// Adds bookmarks to the index (those already there, by sequence number, are kept as they
/// are) and replaces the file atomically.
pub(crate) fn add(fs: &dyn Storage, path: &Path, new: &[Bookmark]) -> Result<(), IndexError> {
    if new.is_empty() {
        return Ok(());
    }
    let mut all = load(fs, path)?;
    let before = all.len();
    for b in new {
        if !all.iter().any(|o| o.seq == b.seq) {
            all.push(b.clone());
        }
    }
    if all.len() == before {
        return Ok(());
    }
    all.sort_by_key(|b| b.seq);
    let text = toml::to_string(&Index { bookmark: all }).map_err(|source| IndexError::Encode { source })?;
    write_file_atomic(fs, path, text.as_bytes()).map_err(|source| IndexError::Write { path: path.to_owned(), source })
}
