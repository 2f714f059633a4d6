//! Reading the small TOML files of a group's directory (`group.toml`, `failover.toml`):
//! bounded in size, UTF-8, parsed whole. A failure is a reason for the caller's error, which
//! names the file.

use std::path::Path;

use hindsight_consistency::storage::{OpenMode, Storage};
use serde::de::DeserializeOwned;

/// Reads and parses `path`, refusing a file of more than `max_len` bytes (it is not one of
/// ours); `what` names the file in that refusal.
pub(crate) fn read<T: DeserializeOwned>(fs: &dyn Storage, path: &Path, max_len: u64, what: &str) -> Result<T, String> {
    let f = fs.open(path, OpenMode::Read).map_err(|e| format!("cannot open: {e}"))?;
    let len = f.len().map_err(|e| format!("cannot stat: {e}"))?;
    if len > max_len {
        return Err(format!("is {len} bytes, far larger than any {what}; it is not a {what}"));
    }
    let mut buf = vec![0u8; usize::try_from(len).expect("capped above")];
    f.read_exact_at(&mut buf, 0).map_err(|e| format!("cannot read: {e}"))?;
    let text = String::from_utf8(buf).map_err(|_| "is not UTF-8 text".to_owned())?;
    toml::from_str(&text).map_err(|e| e.to_string().trim_end().replace('\n', " "))
}
