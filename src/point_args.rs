//! The point a command is about (`--seq`, `--time`, `--bookmark`, `--latest`), shared by
//! `recover` and `export`.

use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::time::parse_rfc3339;
use hindsight_target::Point;

use crate::failure::Failure;

/// Exactly one of the four is given (clap checks it).
#[derive(clap::Args, Debug, Clone)]
#[group(id = "point", required = true, multiple = false)]
pub struct PointArgs {
    /// The point: after the write with this group sequence number
    #[arg(long)]
    pub seq: Option<u64>,
    /// The point: every write the engine received at or before this RFC 3339 time
    #[arg(long)]
    pub time: Option<String>,
    /// The point: the newest bookmark of this name (every write before it)
    #[arg(long)]
    pub bookmark: Option<String>,
    /// The point: the newest write the target holds
    #[arg(long)]
    pub latest: bool,
}

impl PointArgs {
    /// The point in the target's terms; a bookmark is looked up in the group's history.
    pub fn resolve(&self, cfg: &TargetConfig, group: &str) -> Result<Point, Failure> {
        Ok(match (self.seq, &self.time, &self.bookmark) {
            (Some(n), ..) => Point::Seq(n),
            (_, Some(t), _) => Point::Time(parse_rfc3339(t).map_err(|e| Failure::Config(format!("--time: {e}")))?),
            (_, _, Some(name)) => {
                let h = hindsight_target::history(cfg, group)?;
                match h.bookmarks.iter().rev().find(|b| &b.name == name) {
                    Some(b) => Point::Seq(b.seq),
                    None => {
                        let known: Vec<&str> = h.bookmarks.iter().map(|b| b.name.as_str()).collect();
                        return Err(Failure::Runtime(anyhow::anyhow!(
                            "group {group:?} has no bookmark {name:?} in its recoverable window; its bookmarks are: {}",
                            if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                        )));
                    }
                }
            }
            _ => Point::Latest,
        })
    }
}
