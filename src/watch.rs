//! `hindsight status --watch` on a terminal: one progress bar per resync or initial sync under
//! way, with its rate and time left, kept below the status text that each round prints
//! (indicatif). Off a terminal, `status` prints the same progress as plain lines instead (see
//! `admin::format_status`), so logs stay readable.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::Duration;

use hindsight_consistency::wire::{ResyncStatus, StatusReply};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::human_f64;

/// The bars of the resyncs a watch has seen, by group and volume.
pub struct ResyncBars {
    multi: MultiProgress,
    bars: BTreeMap<(String, String), ProgressBar>,
}

impl ResyncBars {
    /// Bars on standard output, if it is a terminal.
    pub fn on_terminal() -> Option<ResyncBars> {
        std::io::stdout().is_terminal().then(|| ResyncBars::drawn_to(ProgressDrawTarget::stdout()))
    }

    fn drawn_to(target: ProgressDrawTarget) -> ResyncBars {
        ResyncBars { multi: MultiProgress::with_draw_target(target), bars: BTreeMap::new() }
    }

    /// Prints a round's text above the bars.
    pub fn print(&self, text: &str) {
        // Only fails when the terminal went away; the next round tries again.
        let _ = self.multi.println(text.trim_end());
    }

    /// Brings the bars up to a round's status: a bar for each resync under way, moved to where
    /// it is; a resync that is no longer reported is finished and its bar ends.
    pub fn update(&mut self, reply: &StatusReply) {
        let mut seen = Vec::new();
        for g in &reply.groups {
            for r in &g.resyncing {
                let key = (g.name.clone(), r.volume.clone());
                let bar = self.bars.entry(key.clone()).or_insert_with(|| {
                    let bar = self.multi.add(ProgressBar::new(0));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} regions ({percent}%) {msg}")
                            .expect("a valid template")
                            .progress_chars("=> "),
                    );
                    bar.enable_steady_tick(Duration::from_secs(1));
                    bar
                });
                show(bar, &g.name, r);
                seen.push(key);
            }
        }
        let gone: Vec<_> = self.bars.keys().filter(|k| !seen.contains(k)).cloned().collect();
        for key in gone {
            if let Some(bar) = self.bars.remove(&key) {
                bar.finish_with_message("done: the engine holds every region");
            }
        }
    }

    /// The resyncs that have a bar now, as `(group, volume, position, length)`.
    #[cfg(test)]
    fn shown(&self) -> Vec<(String, String, u64, u64)> {
        self.bars.iter().map(|((g, v), b)| (g.clone(), v.clone(), b.position(), b.length().unwrap_or(0))).collect()
    }
}

/// Moves `bar` to where resync `r` of group `group` stands: the compare sweep of an initial
/// sync first (regions compared), then the regions re-sent.
fn show(bar: &ProgressBar, group: &str, r: &ResyncStatus) {
    let sweeping = r.compare_total > 0 && r.compared < r.compare_total;
    let (what, pos, len) = if sweeping { ("initial sync, comparing", r.compared, r.compare_total) } else { ("resync", r.done, r.total) };
    bar.set_prefix(format!("{what} {group}/{}", r.volume));
    bar.set_length(len);
    bar.set_position(pos);
    let rate = if r.bytes_per_s > 0 { format!("{}/s", human_f64(r.bytes_per_s as f64)) } else { "measuring".to_owned() };
    let left =
        if r.eta_s > 0 { format!(", about {} left", humantime::format_duration(Duration::from_secs(r.eta_s))) } else { String::new() };
    let differ = if r.compare_total > 0 { format!(", {} differ", r.differ) } else { String::new() };
    bar.set_message(format!("{rate}{left}{differ}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use hindsight_consistency::wire::GroupStatus;

    fn reply(resyncing: Vec<ResyncStatus>) -> StatusReply {
        StatusReply {
            engine: "e".into(),
            groups: vec![GroupStatus { name: "erp".into(), resyncing, ..GroupStatus::default() }],
            cluster: None,
        }
    }

    #[test]
    fn a_bar_follows_each_resync_and_ends_with_it() {
        let mut bars = ResyncBars::drawn_to(ProgressDrawTarget::hidden());
        let db = |done| ResyncStatus { volume: "db".into(), done, total: 100, bytes_per_s: 1 << 20, eta_s: 9, ..ResyncStatus::default() };
        let sweep = ResyncStatus { volume: "log".into(), compare_total: 50, compared: 20, ..ResyncStatus::default() };
        bars.update(&reply(vec![db(10), sweep]));
        assert_eq!(bars.shown(), vec![("erp".into(), "db".into(), 10, 100), ("erp".into(), "log".into(), 20, 50)]);
        bars.update(&reply(vec![db(60)]));
        assert_eq!(bars.shown(), vec![("erp".into(), "db".into(), 60, 100)], "the sweep that ended has no bar");
        bars.update(&reply(Vec::new()));
        assert!(bars.shown().is_empty());
    }
}
