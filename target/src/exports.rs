//! The exports of a group that are running: each `hindsight export` registers itself in the
//! group's `exports/` directory as `<pid>.json` (its point, address, volumes, clients and
//! overlay size, rewritten as they change) and removes the file when it stops. `history` lists
//! them, and retention says which export holds it back. A file whose process is gone (an
//! export killed with SIGKILL) is ignored and removed by the next reader, with the scratch
//! overlays that export left in `exports/<pid>/`.

use std::io;
use std::path::{Path, PathBuf};

use hindsight_consistency::storage::{write_file_atomic, Storage};
use hindsight_consistency::Seq;
use serde::{Deserialize, Serialize};

/// One running export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveExport {
    /// The exporting process.
    pub pid: u32,
    /// The point: after this record.
    pub seq: Seq,
    pub time_ns: u64,
    /// Where it serves (`unix:...` or `tcp:...`).
    pub listen: String,
    pub volumes: Vec<String>,
    pub writable: bool,
    /// Clients connected now.
    pub clients: usize,
    /// Bytes written into its overlay.
    pub overlay_bytes: u64,
    /// When it started (ns since the Unix epoch).
    pub started_ns: u64,
}

/// A registration: rewritten by [`Registration::update`], removed when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    current: ActiveExport,
}

fn file_name(pid: u32) -> String {
    format!("{pid}.json")
}

impl Registration {
    /// Registers `export` in `dir` (the group's `exports/`).
    pub(crate) fn create(fs: &dyn Storage, dir: &Path, export: ActiveExport) -> io::Result<Registration> {
        fs.create_dir_all(dir)?;
        let path = dir.join(file_name(export.pid));
        write(fs, &path, &export)?;
        Ok(Registration { path, current: export })
    }

    /// Records the clients and the overlay size, if they changed.
    pub fn update(&mut self, clients: usize, overlay_bytes: u64) -> io::Result<()> {
        if (self.current.clients, self.current.overlay_bytes) == (clients, overlay_bytes) {
            return Ok(());
        }
        (self.current.clients, self.current.overlay_bytes) = (clients, overlay_bytes);
        write(&hindsight_consistency::storage::StdStorage, &self.path, &self.current)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn write(fs: &dyn Storage, path: &Path, export: &ActiveExport) -> io::Result<()> {
    let text = serde_json::to_string_pretty(export).map_err(io::Error::other)?;
    write_file_atomic(fs, path, text.as_bytes())
}

/// True if process `pid` is alive.
fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The exports registered in `dir` whose process runs, oldest first; files of exports that
/// are gone are removed.
pub(crate) fn active(fs: &dyn Storage, dir: &Path) -> Vec<ActiveExport> {
    let Ok(names) = fs.list(dir) else { return Vec::new() };
    let mut out = Vec::new();
    for name in names {
        // The scratch overlays of a writable export killed before it could delete them.
        if let Ok(pid) = name.parse::<u32>() {
            if !alive(pid) {
                let _ = std::fs::remove_dir_all(dir.join(&name));
            }
            continue;
        }
        let Some(pid) = name.strip_suffix(".json").and_then(|p| p.parse::<u32>().ok()) else { continue };
        let path = dir.join(&name);
        if !alive(pid) {
            let _ = fs.remove_file(&path);
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        if let Ok(e) = serde_json::from_str::<ActiveExport>(&text) {
            out.push(e);
        }
    }
    out.sort_by_key(|e| (e.started_ns, e.pid));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::storage::StdStorage;

    fn export(pid: u32) -> ActiveExport {
        ActiveExport {
            pid,
            seq: 42,
            time_ns: 1,
            listen: "unix:/run/x.sock".into(),
            volumes: vec!["db".into()],
            writable: false,
            clients: 0,
            overlay_bytes: 0,
            started_ns: 5,
        }
    }

    #[test]
    fn a_registration_is_listed_while_it_lives_and_a_dead_process_is_not() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("exports");
        let mut r = Registration::create(&StdStorage, &dir, export(std::process::id())).unwrap();
        r.update(2, 8192).unwrap();
        let listed = active(&StdStorage, &dir);
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].clients, listed[0].overlay_bytes), (2, 8192));
        // A pid that cannot be running (above the kernel's pid_max).
        let stale = Registration::create(&StdStorage, &dir, export(u32::MAX - 1)).unwrap();
        std::mem::forget(stale);
        std::fs::create_dir_all(dir.join((u32::MAX - 1).to_string())).unwrap();
        std::fs::write(dir.join((u32::MAX - 1).to_string()).join("db.overlay"), b"left").unwrap();
        assert_eq!(active(&StdStorage, &dir).len(), 1);
        assert!(!dir.join(file_name(u32::MAX - 1)).exists(), "the stale file is removed");
        assert!(!dir.join((u32::MAX - 1).to_string()).exists(), "so are its scratch overlays");
        drop(r);
        assert!(active(&StdStorage, &dir).is_empty());
    }
}
