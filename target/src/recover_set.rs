//! Recovering several volumes of a group at one point: every volume of one VM, or the whole
//! group, into a directory, with a manifest.
//!
//! The point is resolved once: the first volume is recovered at the requested point (a time or
//! "latest"), which reports the group sequence number that point stands for; every other
//! volume is then recovered at exactly that sequence number. All images therefore come from
//! one prefix of the group's sequence, which is what makes them crash-consistent together
//! (docs/consistency.md).

use std::path::{Path, PathBuf};

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::Seq;
use serde::{Deserialize, Serialize};

use crate::error::TargetError;
use crate::group_view::group_volumes;
use crate::model::{Point, RecoverRequest};
use crate::recover::recover;

/// Name of the manifest written beside the images.
pub const MANIFEST_NAME: &str = "manifest.json";

/// Which volumes of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every volume of this VM.
    Vm(String),
    /// Every volume of the group.
    All,
}

/// What to recover, and where to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverSetRequest {
    /// The consistency group.
    pub group: String,
    /// Which of its volumes.
    pub selection: Selection,
    /// The point in time.
    pub point: Point,
    /// A new or empty directory; each volume becomes `<volume>.img` in it, plus the manifest.
    pub out_dir: PathBuf,
}

/// What was recovered: written as `manifest.json` in the output directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The group.
    pub group: String,
    /// The VM recovered, or `None` for the whole group.
    pub vm: Option<String>,
    /// The point as it was asked for (`seq 42`, `time ...`, `latest`).
    pub requested: String,
    /// The group sequence number every image was recovered at.
    pub seq: Seq,
    /// Engine time of that point (RFC 3339).
    pub time: String,
    /// The same, in ns since the Unix epoch.
    pub time_ns: u64,
    /// `crash-consistent` (every image holds exactly the group's writes up to `seq`), or
    /// `app-consistent` when `seq` is an application-consistent bookmark.
    pub consistency: String,
    /// The images.
    pub volumes: Vec<ManifestVolume>,
}

/// One recovered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestVolume {
    /// Volume name.
    pub name: String,
    /// Its VM.
    pub vm: String,
    /// Size in bytes.
    pub size: u64,
    /// The image file, relative to the manifest.
    pub file: String,
}

/// Recovers every selected volume at one point into `out_dir` and writes the manifest.
pub fn recover_set(config: &TargetConfig, req: &RecoverSetRequest) -> Result<Manifest, TargetError> {
    let all = group_volumes(config, &req.group)?;
    let volumes: Vec<_> = match &req.selection {
        Selection::All => all.clone(),
        Selection::Vm(vm) => all.iter().filter(|v| &v.vm == vm).cloned().collect(),
    };
    if volumes.is_empty() {
        let mut known: Vec<String> = all.iter().map(|v| v.vm.clone()).collect();
        known.sort();
        known.dedup();
        let vm = match &req.selection {
            Selection::Vm(vm) => vm.clone(),
            Selection::All => String::new(),
        };
        return Err(TargetError::UnknownVm { group: req.group.clone(), vm, known });
    }
    prepare_dir(&req.out_dir)?;
    let mut point = req.point;
    let mut resolved = None;
    let mut out = Vec::new();
    for v in &volumes {
        let file = format!("{}.img", v.name);
        let report =
            recover(config, &RecoverRequest { group: req.group.clone(), volume: v.name.clone(), point, out: req.out_dir.join(&file) })?;
        // The first volume fixes the point for all the others.
        if resolved.is_none() {
            resolved = Some((report.seq, report.time_ns, report.consistency));
            point = Point::Seq(report.seq);
        }
        out.push(ManifestVolume { name: v.name.clone(), vm: v.vm.clone(), size: v.size, file });
    }
    let (seq, time_ns, consistency) = resolved.expect("at least one volume");
    let manifest = Manifest {
        group: req.group.clone(),
        vm: match &req.selection {
            Selection::Vm(vm) => Some(vm.clone()),
            Selection::All => None,
        },
        requested: req.point.to_string(),
        seq,
        time: format_rfc3339(time_ns),
        time_ns,
        consistency,
        volumes: out,
    };
    let path = req.out_dir.join(MANIFEST_NAME);
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest always serialises");
    std::fs::write(&path, text + "\n").map_err(|source| TargetError::Output { path: path.clone(), step: "write the manifest", source })?;
    Ok(manifest)
}

/// Creates the output directory, or accepts an existing empty one.
fn prepare_dir(dir: &Path) -> Result<(), TargetError> {
    let refuse = |reason: String| TargetError::OutputRefused { path: dir.to_owned(), reason };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refuse("is not empty; give a new or empty directory".into()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir).map_err(|source| TargetError::Output {
            path: dir.to_owned(),
            step: "create the directory",
            source,
        }),
        Err(e) => Err(refuse(format!("cannot be used ({e})"))),
    }
}
