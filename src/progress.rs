//! Progress of long work (`recover`): on a terminal a bar with the rate and the time left
//! (indicatif); otherwise a plain line every few seconds, so logs and CI output stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often the plain form prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Progress of one piece of work measured in bytes.
pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress of `what` (e.g. `recover db`), shown on standard error.
    pub fn new(what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left")
                .expect("a valid template")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_owned());
            bar
        });
        let now = Instant::now();
        Progress { what: what.to_owned(), bar, started: now, last_line: now }
    }

    /// `done` of `total` bytes are done.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        if self.last_line.elapsed() >= PLAIN_EVERY && done < total {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let left = if rate > 0.0 { (total - done) as f64 / rate } else { 0.0 };
            eprintln!(
                "{}: {} of {} ({:.0}%), {}/s, about {left:.0}s left",
                self.what,
                human(done),
                human(total),
                done as f64 * 100.0 / total.max(1) as f64,
                human_f64(rate)
            );
        }
    }

    /// Ends the bar; returns how long the work took.
    pub fn finish(self) -> Duration {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
        self.started.elapsed()
    }
}

/// A size for people: `1.4 GiB`, `512 KiB`, `17 B`.
pub fn human(bytes: u64) -> String {
    human_f64(bytes as f64)
}

/// A rate or a size given as a float (bytes), in the same form as [`human`].
pub fn human_f64(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(17), "17 B");
        assert_eq!(human(512 << 10), "512.0 KiB");
        assert_eq!(human(1_503_238_554), "1.4 GiB");
    }
}
