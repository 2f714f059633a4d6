//! A group's epoch at the engine (docs/failover.md, "Fencing"): the engine ships a group at
//! the epoch engine.toml gives, and keeps the epoch its journal was written at in the group's
//! `epoch` file. Raised after a failover and failback, the journal of the earlier epoch is set
//! aside, never shipped: its records belong to a history the target no longer continues.

use std::path::{Path, PathBuf};

use hindsight_consistency::storage::{write_file_atomic, Storage};

use crate::error::EngineError;

/// `<data_dir>/groups/<group>/epoch`.
fn epoch_file(group_dir: &Path) -> PathBuf {
    group_dir.join("epoch")
}

/// Brings the group's directory to `epoch`: refuses an epoch older than its journal's, sets
/// a journal of an older epoch aside (`journal.epoch-<N>`), and records the epoch.
pub fn enter(fs: &dyn Storage, group: &str, group_dir: &Path, epoch: u64) -> Result<(), EngineError> {
    let bad = |reason: String| EngineError::Epoch { group: group.to_owned(), reason };
    let path = epoch_file(group_dir);
    let recorded = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|_| bad(format!("{} does not hold an epoch: {text:?}", path.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(bad(format!("{}: {e}", path.display()))),
    };
    if epoch < recorded {
        return Err(bad(format!(
            "engine.toml gives epoch {epoch}, but this engine's journal of the group is at epoch {recorded}; give epoch = {recorded} \
             (an epoch never goes back)"
        )));
    }
    if epoch == recorded && fs.exists(&path) {
        return Ok(());
    }
    let journal = group_dir.join("journal");
    if epoch > recorded && fs.exists(&journal) {
        let aside = group_dir.join(format!("journal.epoch-{recorded}"));
        std::fs::rename(&journal, &aside).map_err(|e| bad(format!("cannot set {} aside: {e}", journal.display())))?;
        log::warn!(
            "group {group}: the group is at epoch {epoch} now (a failover and failback happened); the journal of epoch {recorded} is \
             set aside in {} and none of it is shipped; delete it once it is not needed",
            aside.display()
        );
    }
    fs.create_dir_all(group_dir).map_err(|e| bad(format!("{}: {e}", group_dir.display())))?;
    write_file_atomic(fs, &path, format!("{epoch}\n").as_bytes()).map_err(|e| bad(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    #[test]
    fn a_raised_epoch_sets_the_old_journal_aside_and_a_lower_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fs = StdStorage::shared();
        let g = dir.path().join("erp");
        enter(fs.as_ref(), "erp", &g, 0).unwrap();
        std::fs::create_dir_all(g.join("journal")).unwrap();
        std::fs::write(g.join("journal/1.hsj"), b"old").unwrap();
        enter(fs.as_ref(), "erp", &g, 0).unwrap();
        assert!(g.join("journal/1.hsj").exists(), "the same epoch keeps the journal");
        enter(fs.as_ref(), "erp", &g, 2).unwrap();
        assert!(!g.join("journal").exists() && g.join("journal.epoch-0/1.hsj").exists());
        assert_eq!(std::fs::read_to_string(g.join("epoch")).unwrap(), "2\n");
        let e = enter(fs.as_ref(), "erp", &g, 1).unwrap_err().to_string();
        assert!(e.contains("gives epoch 1") && e.contains("at epoch 2"), "{e}");
    }
}
