//! Where a group's files live under the data directory (the layout is drawn in the crate
//! overview).

use std::path::{Path, PathBuf};

/// Directory under `data_dir` that holds one directory per group.
pub(crate) const GROUPS_DIR: &str = "groups";
/// File in `data_dir` that `hindsight failover` creates after a group's `failover.toml`: the
/// daemon looks for it often, and for the groups' files only when it is there (or once a
/// second).
pub(crate) const FAILOVER_ASKED: &str = "failover-asked";
/// Lock file in `data_dir` held exclusively by the running daemon.
pub(crate) const DAEMON_LOCK: &str = "target.lock";

/// The paths of one group.
#[derive(Debug, Clone)]
pub(crate) struct GroupPaths {
    /// `<data_dir>/groups/<group>`.
    pub dir: PathBuf,
}

impl GroupPaths {
    pub fn new(data_dir: &Path, group: &str) -> GroupPaths {
        GroupPaths { dir: groups_dir(data_dir).join(group) }
    }

    /// `group.toml`: volumes and engine; its presence marks a fully created group.
    pub fn meta(&self) -> PathBuf {
        self.dir.join("group.toml")
    }

    /// `journal/`.
    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// `replica/`.
    pub fn replica_dir(&self) -> PathBuf {
        self.dir.join("replica")
    }

    /// `base/`.
    pub fn base_dir(&self) -> PathBuf {
        self.dir.join("base")
    }

    /// `state`: applied_seq, base_seq, base_time_ns.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// `state.next`: the state the base images are being rolled forward to.
    pub fn state_next(&self) -> PathBuf {
        self.dir.join("state.next")
    }

    /// The index of the group's bookmarks.
    pub fn bookmarks(&self) -> PathBuf {
        self.dir.join("bookmarks.toml")
    }

    /// The index of the spans that are not consistent points (async deltas).
    pub fn spans(&self) -> PathBuf {
        self.dir.join("spans.toml")
    }

    /// `index/`: the point-in-time index, one file per sealed journal segment.
    pub fn index_dir(&self) -> PathBuf {
        self.dir.join("index")
    }

    /// `thin/`: thinned segments, history past the first retention tier
    /// (docs/retention-tiers.md).
    pub fn thin_dir(&self) -> PathBuf {
        self.dir.join("thin")
    }

    /// `exports/`: the registrations of running exports and their scratch overlays.
    pub fn exports_dir(&self) -> PathBuf {
        self.dir.join("exports")
    }

    /// `failover.toml`: the group's failover state (docs/failover.md); absent for a replica.
    pub fn failover(&self) -> PathBuf {
        self.dir.join("failover.toml")
    }

    /// `promoted/`: the production volumes after a failover.
    pub fn promoted_dir(&self) -> PathBuf {
        self.dir.join("promoted")
    }

    /// `lock`: shared by readers, exclusive while retention changes base/ and the journal.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
}

/// `<data_dir>/groups`.
pub(crate) fn groups_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(GROUPS_DIR)
}

/// File name of a volume's image in `replica/` and `base/`.
pub(crate) fn image_name(volume: &str) -> String {
    format!("{volume}.img")
}
