//! `group.toml`: what the target knows about a group besides its journal.
//!
//! ```toml
//! version = 1
//! engine = "10.0.0.5:7400"
//! owner = 812          # the largest ownership token seen (clustered engines only)
//!
//! [[volume]]
//! name = "db-data"
//! vm = "erp-db"
//! size = 107374182400
//! ```
//!
//! Written (atomically) when a group is first seen and whenever its engine or volume list
//! changes. It is the last file written when a group is created, so a group directory
//! without it is a creation that was interrupted and holds nothing acknowledged.

use std::path::Path;

use hindsight_consistency::storage::{write_file_atomic, Storage};
use serde::{Deserialize, Serialize};

use crate::error::TargetError;
use crate::model::Volume;

/// Version of the `group.toml` layout.
const META_VERSION: u32 = 1;

/// Longest `group.toml` read; a real one is a few hundred bytes per volume.
const MAX_META_LEN: u64 = 4 << 20;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The contents of `group.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupMeta {
    /// Layout version.
    pub version: u32,
    /// The engine that ships the group (its name from the hello).
    pub engine: String,
    /// The group's epoch: an engine's hello must carry it (docs/failover.md, "Fencing"); 0
    /// until a failover is undone by a failback.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// The largest ownership token an engine's hello has carried (docs/ha.md, "Fencing"):
    /// hellos with a smaller one are refused. 0 while no clustered engine shipped the group.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub owner: u64,
    /// The volumes, in the order the engine first listed them.
    #[serde(rename = "volume", default)]
    pub volumes: Vec<Volume>,
}

impl GroupMeta {
    pub fn new(engine: String, volumes: Vec<Volume>) -> GroupMeta {
        GroupMeta { version: META_VERSION, engine, epoch: 0, owner: 0, volumes }
    }

    pub fn volume(&self, name: &str) -> Option<&Volume> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn volume_names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.name.clone()).collect()
    }

    /// Reads and checks `group.toml`.
    pub fn load(fs: &dyn Storage, group: &str, path: &Path) -> Result<GroupMeta, TargetError> {
        let bad = |reason: String| TargetError::GroupMeta { group: group.to_owned(), path: path.to_owned(), reason };
        let meta: GroupMeta = crate::toml_file::read(fs, path, MAX_META_LEN, "group.toml").map_err(bad)?;
        if meta.version != META_VERSION {
            return Err(bad(format!("has version {}, this target reads version {META_VERSION}; use a matching hindsight", meta.version)));
        }
        Ok(meta)
    }

    /// Writes `group.toml` atomically and durably.
    pub fn store(&self, fs: &dyn Storage, path: &Path) -> Result<(), TargetError> {
        let text = toml::to_string(self).expect("a group description always serializes");
        write_file_atomic(fs, path, text.as_bytes()).map_err(crate::error::data_dir_err(path, "write group.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    #[test]
    fn round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.toml");
        let m = GroupMeta::new(
            "engine-1".into(),
            vec![
                Volume { name: "db".into(), vm: "erp".into(), size: 1 << 40 },
                Volume { name: "logs".into(), vm: "erp".into(), size: 4096 },
            ],
        );
        m.store(&StdStorage, &path).unwrap();
        assert_eq!(GroupMeta::load(&StdStorage, "g", &path).unwrap(), m);
    }

    #[test]
    fn unknown_version_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("group.toml");
        std::fs::write(&path, "version = 7\nengine = \"e\"\n").unwrap();
        let e = GroupMeta::load(&StdStorage, "g", &path).unwrap_err().to_string();
        assert!(e.contains("group.toml") && e.contains("version 7"), "{e}");
    }
}
