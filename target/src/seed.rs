//! A group created from volumes that already hold data: the original site's disks before a
//! failback (docs/failover.md, "Failback"). Its replicas are those volumes themselves (a
//! symbolic link to each, so that what the stream writes lands on them), its base images a
//! sparse copy of them (the image at seq 0), its journal empty; the engine that ships to it
//! must be at the group's epoch.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hindsight_consistency::config::{check_name, TargetConfig};
use hindsight_consistency::journal::{Journal, JournalOptions};
use hindsight_consistency::storage::{OpenMode, StdStorage, Storage};
use hindsight_consistency::time::now_ns;

use crate::error::{data_dir_err, TargetError};
use crate::layout::{groups_dir, image_name, GroupPaths, DAEMON_LOCK};
use crate::lock::{lock_file, LockKind};
use crate::meta::GroupMeta;
use crate::model::Volume;
use crate::state::{write_state, GroupState};

/// Bytes copied at a time into a base image; a chunk of zeroes is left a hole.
const CHUNK: usize = 1 << 20;
/// How often a long copy says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// How a seeded group holds its volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// The replica is a link to the volume, which stays where it is (the original site's disks).
    Link,
    /// The volume's file is moved into the group as its replica (a failed-over group's promoted
    /// images, on the same file system).
    Move,
}

/// One volume to seed a group with: its name and VM, and the file that holds it.
#[derive(Debug, Clone)]
pub struct SeedVolume {
    pub name: String,
    pub vm: String,
    pub path: PathBuf,
}

/// Creates group `group` of the target from existing volumes, at `epoch`. No target daemon
/// may run on the data directory meanwhile, and the group must not exist.
pub fn seed(config: &TargetConfig, group: &str, volumes: &[SeedVolume], epoch: u64, how: Adopt) -> Result<Vec<Volume>, TargetError> {
    let bad = |reason: String| TargetError::Seed { group: group.to_owned(), reason };
    check_name("group", group).map_err(|e| bad(e.to_string()))?;
    if volumes.is_empty() {
        return Err(bad("no volumes given".to_owned()));
    }
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let gdir = groups_dir(&config.data_dir);
    fs.create_dir_all(&gdir).map_err(data_dir_err(&gdir, "create directory"))?;
    let lock_path = config.data_dir.join(DAEMON_LOCK);
    let _daemon = lock_file(&lock_path, LockKind::Exclusive, false, true)
        .map_err(data_dir_err(&lock_path, "lock"))?
        .ok_or_else(|| bad(format!("a target daemon runs on {}: stop it first, then start it again", config.data_dir.display())))?;
    seed_locked(config, group, volumes, epoch, how)
}

/// [`seed`] with the data directory's lock held.
fn seed_locked(config: &TargetConfig, group: &str, volumes: &[SeedVolume], epoch: u64, how: Adopt) -> Result<Vec<Volume>, TargetError> {
    let bad = |reason: String| TargetError::Seed { group: group.to_owned(), reason };
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let gdir = groups_dir(&config.data_dir);
    let paths = GroupPaths::new(&config.data_dir, group);
    if fs.exists(&paths.meta()) {
        return Err(bad(format!(
            "the group exists already in {}; a group is seeded once, before any engine ships it",
            paths.dir.display()
        )));
    }
    if fs.exists(&paths.dir) {
        // An interrupted seed (no group.toml): it holds nothing acknowledged. Its replicas are
        // links, or volumes moved in: those go back where they came from first, so that
        // removing the rest leaves every volume as it was.
        log::warn!("{}: an earlier seed did not finish; starting it again", paths.dir.display());
        for v in volumes {
            let replica = paths.replica_dir().join(image_name(&v.name));
            let moved_in = std::fs::symlink_metadata(&replica).is_ok_and(|m| m.is_file());
            if moved_in && !fs.exists(&v.path) {
                fs.rename(&replica, &v.path).map_err(data_dir_err(&replica, "move the volume back"))?;
            }
        }
        std::fs::remove_dir_all(&paths.dir).map_err(data_dir_err(&paths.dir, "remove the unfinished seed"))?;
    }
    let mut listed = Vec::new();
    for v in volumes {
        check_name("volume", &v.name).map_err(|e| bad(e.to_string()))?;
        if listed.iter().any(|l: &Volume| l.name == v.name) {
            return Err(bad(format!("volume {:?} is given twice", v.name)));
        }
        let meta = std::fs::metadata(&v.path).map_err(|e| bad(format!("volume {:?}: {}: {e}", v.name, v.path.display())))?;
        if !meta.is_file() {
            return Err(bad(format!("volume {:?}: {} is not a regular file (block devices are not seeded yet)", v.name, v.path.display())));
        }
        if meta.len() == 0 {
            return Err(bad(format!("volume {:?}: {} is empty", v.name, v.path.display())));
        }
        listed.push(Volume { name: v.name.clone(), vm: v.vm.clone(), size: meta.len() });
    }
    for dir in [paths.dir.clone(), paths.replica_dir(), paths.base_dir()] {
        fs.create_dir_all(&dir).map_err(data_dir_err(&dir, "create directory"))?;
    }
    fs.open(&paths.lock(), OpenMode::Create).map_err(data_dir_err(&paths.lock(), "create lock file"))?;
    Journal::open(Arc::clone(&fs), &paths.journal(), JournalOptions { segment_size: config.segment_size, direct: config.direct_io })
        .map_err(|source| TargetError::Journal { group: group.to_owned(), step: "create", source })?;
    for (v, vol) in volumes.iter().zip(&listed) {
        let original = std::fs::canonicalize(&v.path).map_err(data_dir_err(&v.path, "resolve the volume's path"))?;
        let base = paths.base_dir().join(image_name(&v.name));
        copy_sparse(&original, &base, vol.size, &v.name)?;
        let replica = paths.replica_dir().join(image_name(&v.name));
        match how {
            Adopt::Link => {
                std::os::unix::fs::symlink(&original, &replica).map_err(data_dir_err(&replica, "link the replica to the volume"))?
            }
            Adopt::Move => fs.rename(&original, &replica).map_err(data_dir_err(&original, "move the volume in as the replica"))?,
        }
    }
    for dir in [paths.replica_dir(), paths.base_dir(), paths.dir.clone(), gdir] {
        fs.sync_dir(&dir).map_err(data_dir_err(&dir, "sync directory"))?;
    }
    let state = GroupState { applied_seq: 0, base_seq: 0, base_time_ns: now_ns() };
    write_state(fs.as_ref(), &paths.state(), &state).map_err(data_dir_err(&paths.state(), "write state"))?;
    let mut meta = GroupMeta::new(String::new(), listed.clone());
    meta.epoch = epoch;
    meta.store(fs.as_ref(), &paths.meta())?;
    log::info!(
        "group {group:?}: seeded at epoch {epoch} from {}",
        volumes.iter().map(|v| v.path.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    Ok(listed)
}

/// Resumes protection at the recovery site after a failback (docs/failover.md, "Failback"):
/// the failed-over group `group` is kept, read-only, as `<group>.epoch-<E>` (its history), and
/// `group` is seeded again at `epoch` from its promoted volumes, which hold what production at
/// the original site starts from.
pub fn reseed_after_failback(config: &TargetConfig, group: &str, epoch: u64) -> Result<(String, Vec<Volume>), TargetError> {
    let bad = |reason: String| TargetError::Seed { group: group.to_owned(), reason };
    let fs: Arc<dyn Storage> = StdStorage::shared();
    let lock_path = config.data_dir.join(DAEMON_LOCK);
    let _daemon = lock_file(&lock_path, LockKind::Exclusive, false, true)
        .map_err(data_dir_err(&lock_path, "lock"))?
        .ok_or_else(|| bad(format!("a target daemon runs on {}: stop it first, then start it again", config.data_dir.display())))?;
    let paths = GroupPaths::new(&config.data_dir, group);
    let gdir = groups_dir(&config.data_dir);
    let (archived, archive) = if fs.exists(&paths.meta()) {
        let state = match crate::failover::load(fs.as_ref(), group, &paths)? {
            Some(s) if s.state == crate::failover::Stage::FailedOver => s,
            _ => {
                return Err(bad("it is not failed over here: only a failed-over group resumes its protection after a failback".to_owned()))
            }
        };
        if epoch <= state.epoch {
            return Err(bad(format!(
                "--epoch {epoch}: the failback's planned failover raised the epoch past {} (it printed the new one)",
                state.epoch
            )));
        }
        let archived = format!("{group}.epoch-{}", state.epoch);
        check_name("group", &archived).map_err(|e| bad(e.to_string()))?;
        let archive = GroupPaths::new(&config.data_dir, &archived);
        if fs.exists(&archive.dir) {
            return Err(bad(format!("{} exists already", archive.dir.display())));
        }
        fs.rename(&paths.dir, &archive.dir).map_err(data_dir_err(&paths.dir, "keep the group's history aside"))?;
        fs.sync_dir(&gdir).map_err(data_dir_err(&gdir, "sync directory"))?;
        log::info!("group {group:?}: its history up to the failover is kept as group {archived:?}");
        (archived, archive)
    } else {
        // Interrupted after the history was set aside: the newest archive below the new epoch.
        let prefix = format!("{group}.epoch-");
        let found = fs
            .list(&gdir)
            .map_err(data_dir_err(&gdir, "list groups"))?
            .into_iter()
            .filter_map(|name| name.strip_prefix(&prefix).and_then(|e| e.parse::<u64>().ok()).map(|e| (e, name.clone())))
            .filter(|(e, name)| *e < epoch && fs.exists(&GroupPaths::new(&config.data_dir, name).meta()))
            .max()
            .map(|(_, name)| name);
        let Some(archived) = found else {
            return Err(bad("it is not failed over here: only a failed-over group resumes its protection after a failback".to_owned()));
        };
        log::warn!("group {group:?}: resuming an interrupted resume from the history kept as {archived:?}");
        let archive = GroupPaths::new(&config.data_dir, &archived);
        (archived, archive)
    };
    let meta = GroupMeta::load(fs.as_ref(), &archived, &archive.meta())?;
    let volumes: Vec<SeedVolume> = meta
        .volumes
        .iter()
        .map(|v| SeedVolume { name: v.name.clone(), vm: v.vm.clone(), path: archive.promoted_dir().join(image_name(&v.name)) })
        .collect();
    let seeded = seed_locked(config, group, &volumes, epoch, Adopt::Move)?;
    Ok((archived, seeded))
}

/// Copies `from` (`size` bytes) to a new file `to`, leaving every chunk of zeroes a hole, and
/// syncs it.
fn copy_sparse(from: &Path, to: &Path, size: u64, volume: &str) -> Result<(), TargetError> {
    let mut src = std::fs::File::open(from).map_err(data_dir_err(from, "open the volume"))?;
    let dst = std::fs::File::create(to).map_err(data_dir_err(to, "create base image"))?;
    dst.set_len(size).map_err(data_dir_err(to, "size base image"))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut at, mut last_line) = (0u64, Instant::now());
    while at < size {
        let n = usize::try_from((size - at).min(CHUNK as u64)).expect("at most CHUNK");
        src.read_exact(&mut buf[..n]).map_err(data_dir_err(from, "read the volume"))?;
        if buf[..n].iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&dst, &buf[..n], at).map_err(data_dir_err(to, "write base image"))?;
        }
        at += n as u64;
        if last_line.elapsed() >= PROGRESS_EVERY {
            last_line = Instant::now();
            log::info!("seed: volume {volume}: base image {} of {size} bytes", at);
        }
    }
    dst.sync_all().map_err(data_dir_err(to, "sync base image"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> TargetConfig {
        let path = dir.join("target.toml");
        let text = format!(
            "[target]\nlisten = \"127.0.0.1:7500\"\ndata_dir = \"{}\"\n[tls]\ninsecure_plaintext = true\n",
            dir.join("data").display()
        );
        std::fs::write(&path, text).unwrap();
        TargetConfig::load(&path).unwrap()
    }

    fn volume(dir: &Path, name: &str, byte: u8) -> SeedVolume {
        let path = dir.join(format!("{name}.disk"));
        let mut bytes = vec![0u8; 3 << 20];
        bytes[(1 << 20)..(1 << 20) + 4096].fill(byte);
        std::fs::write(&path, &bytes).unwrap();
        SeedVolume { name: name.into(), vm: "vm1".into(), path }
    }

    #[test]
    fn a_seeded_group_links_its_volumes_and_copies_them_as_base() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let v = volume(dir.path(), "db", 7);
        let seeded = seed(&cfg, "erp", std::slice::from_ref(&v), 3, Adopt::Link).unwrap();
        assert_eq!(seeded[0].size, 3 << 20);
        let paths = GroupPaths::new(&cfg.data_dir, "erp");
        let replica = paths.replica_dir().join("db.img");
        assert!(std::fs::symlink_metadata(&replica).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&replica).unwrap(), std::fs::read(&v.path).unwrap());
        assert_eq!(std::fs::read(paths.base_dir().join("db.img")).unwrap(), std::fs::read(&v.path).unwrap());
        let meta = GroupMeta::load(StdStorage::shared().as_ref(), "erp", &paths.meta()).unwrap();
        assert_eq!(meta.epoch, 3);
        let e = seed(&cfg, "erp", &[v], 3, Adopt::Link).unwrap_err().to_string();
        assert!(e.contains("exists already"), "{e}");
    }

    #[test]
    fn an_interrupted_move_puts_the_volumes_back_before_it_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let (a, b) = (volume(dir.path(), "a", 1), volume(dir.path(), "b", 2));
        let (want_a, want_b) = (std::fs::read(&a.path).unwrap(), std::fs::read(&b.path).unwrap());
        // A seed that had moved volume a in when it stopped: no group.toml.
        let paths = GroupPaths::new(&cfg.data_dir, "erp");
        std::fs::create_dir_all(paths.replica_dir()).unwrap();
        std::fs::rename(&a.path, paths.replica_dir().join("a.img")).unwrap();
        seed(&cfg, "erp", &[a.clone(), b.clone()], 2, Adopt::Move).unwrap();
        assert_eq!(std::fs::read(paths.replica_dir().join("a.img")).unwrap(), want_a);
        assert_eq!(std::fs::read(paths.replica_dir().join("b.img")).unwrap(), want_b);
        assert_eq!(std::fs::read(paths.base_dir().join("a.img")).unwrap(), want_a);
        assert!(!a.path.exists() && !b.path.exists(), "moved, not copied");
    }
}
