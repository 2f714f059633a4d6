//! What the cluster says: status, history, logs and journals, waiting until they show
//! something, and recovering images.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

impl Cluster {
    /// The log of a process so far: "target", "engine" or "agent-<vm>" (every run of it,
    /// appended).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{name}.log"))).unwrap_or_default()
    }

    /// `hindsight status --json` of the (first) group.
    pub fn status(&self) -> serde_json::Value {
        let out = run_ok(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(self.engine_toml()));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
        v["groups"][0].clone()
    }

    /// Waits until the group's status satisfies `cond`; returns it.
    pub fn wait_status(&self, what: &str, timeout: Duration, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let g = self.status();
            if cond(&g) {
                return g;
            }
            assert!(start.elapsed() < timeout, "status never showed {what} within {timeout:?}: {g:#}\nengine log:\n{}", self.log("engine"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits up to `timeout` until a process's log holds `needle`.
    pub fn wait_log_within(&self, name: &str, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log(name).contains(needle) {
            assert!(start.elapsed() < timeout, "{name}.log never said {needle:?}:\n{}", self.log(name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a process's log holds `needle` at least `count` times.
    pub fn wait_log(&self, name: &str, needle: &str, count: usize) {
        let start = Instant::now();
        loop {
            let n = self.log(name).matches(needle).count();
            if n >= count {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name}.log holds {needle:?} {n} times, waited for {count}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The records of the target's journal of the group, oldest retained first:
    /// (seq, kind, length).
    pub fn target_records(&self) -> Vec<(u64, hindsight_consistency::WriteKind, u32)> {
        let dir = self.path("target").join("groups").join(&self.group).join("journal");
        let fs = hindsight_consistency::storage::StdStorage::shared();
        let first = hindsight_consistency::journal::list_segments(fs.as_ref(), &dir).unwrap().first().map_or(1, |s| s.0);
        let mut reader = hindsight_consistency::journal::JournalReader::open(fs, &dir, first).unwrap();
        let mut out = Vec::new();
        while let Some(rec) = reader.next().unwrap() {
            out.push((rec.header.seq, rec.header.kind, rec.header.length));
        }
        out
    }

    /// Every record in the engine's journal of the group (0 when it has none).
    pub fn engine_records(&self) -> usize {
        let dir = self.path("engine").join("groups").join(&self.group).join("journal");
        let Ok(mut r) = hindsight_consistency::journal::JournalReader::open(hindsight_consistency::storage::StdStorage::shared(), &dir, 1)
        else {
            return 0;
        };
        let mut n = 0;
        while r.next().unwrap().is_some() {
            n += 1;
        }
        n
    }

    /// Waits until the agent's dirty map of `volume` is clean on disk (every region written
    /// is confirmed and idle, so a kill now leaves nothing to resync): bytes 16.. of the map,
    /// up to its checksum, all zero.
    pub fn wait_map_clean(&self, volume: &str) {
        let mut path = self.disk(volume).into_os_string();
        path.push(".hsmap");
        let start = Instant::now();
        loop {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.len() > 20 && bytes[16..bytes.len() - 4].iter().all(|&b| b == 0) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "the dirty map of {volume} never became clean");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `hindsight history --json` of the group.
    pub fn history(&self) -> serde_json::Value {
        let out =
            run_ok(Command::new(hindsight_bin()).args(["history", "--json", "--group", &self.group, "--config"]).arg(self.target_toml()));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("history output is not JSON ({e}): {out}"))
    }

    /// `hindsight history --json` of the group, or `None` while the target does not know the
    /// group yet (its directory may exist before the creation is finished: `group.toml` is
    /// written last).
    pub fn history_if_known(&self) -> Option<serde_json::Value> {
        let mut cmd = Command::new(hindsight_bin());
        cmd.args(["history", "--json", "--group", &self.group, "--config"]).arg(self.target_toml());
        let desc = format!("{cmd:?}");
        let (ok, out, err) = run_timeout(&mut cmd, Duration::from_secs(300));
        if !ok && err.contains("is not known to this target") {
            return None;
        }
        assert!(ok, "{desc} failed:\nstdout: {out}\nstderr: {err}");
        Some(serde_json::from_str(&out).unwrap_or_else(|e| panic!("history output is not JSON ({e}): {out}")))
    }

    /// Last sequence number the target holds (0 if the group is not there yet).
    pub fn target_last_seq(&self) -> u64 {
        if !self.path("target").join("groups").join(&self.group).exists() {
            return 0;
        }
        self.history_if_known().map_or(0, |h| h["last_seq"].as_u64().expect("last_seq"))
    }

    /// Waits until the target holds at least `seq`.
    pub fn wait_target_seq(&self, seq: u64) {
        let start = Instant::now();
        loop {
            let last = self.target_last_seq();
            if last >= seq {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "target stuck at seq {last}, waiting for {seq}; logs in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the target holds at least `seq`, then until it stops moving; returns the
    /// last sequence number (use it when a restart may delay shipping beyond `settle`'s
    /// patience).
    pub fn wait_target_seq_settled(&self, seq: u64) -> u64 {
        self.wait_target_seq(seq);
        self.settle()
    }

    /// Waits until the engine says the target has confirmed everything it holds (status
    /// `lag_writes` 0 twice in a row, with at least one write shipped). Returns the sequence
    /// number.
    pub fn wait_shipped(&self) -> u64 {
        let start = Instant::now();
        let mut zero = 0;
        loop {
            let out = run_ok(Command::new(hindsight_bin()).args(["status", "--json", "--config"]).arg(self.engine_toml()));
            let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"));
            let g = &v["groups"][0];
            if g["lag_writes"] == 0 && g["durable_seq"].as_u64().unwrap_or(0) > 0 {
                zero += 1;
                if zero >= 2 {
                    return g["confirmed_seq"].as_u64().unwrap();
                }
            } else {
                zero = 0;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "the target never caught up: {g}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the target's last sequence number has not moved for a while (every write
    /// the agents acknowledged is at the engine; this lets the shipper catch up). Returns it.
    pub fn settle(&self) -> u64 {
        let start = Instant::now();
        let mut last = u64::MAX;
        let mut same = 0;
        loop {
            let cur = self.target_last_seq();
            if cur == last {
                same += 1;
                if same >= 4 {
                    return cur;
                }
            } else {
                same = 0;
                last = cur;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "target never settled");
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Recovers a volume at a point (`["--seq", "5"]`, `["--latest"]`, ...) and returns the
    /// image bytes.
    pub fn recover(&self, volume: &str, point: &[&str]) -> Vec<u8> {
        let out = self.path(&format!("recovered-{volume}.img"));
        let _ = std::fs::remove_file(&out);
        run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--group", &self.group, "--volume", volume, "--config"])
                .arg(self.target_toml())
                .args(point)
                .arg("--out")
                .arg(&out),
        );
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    /// Recovers every volume of the group at one point with `recover --all` (`["--seq", "5"]`,
    /// `["--time", T]`, ...); returns the manifest and each volume's image by volume name.
    pub fn recover_all(&self, point: &[&str]) -> (serde_json::Value, BTreeMap<String, Vec<u8>>) {
        let dir = self.path("recovered-all");
        let _ = std::fs::remove_dir_all(&dir);
        let out = run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--all", "--json", "--group", &self.group, "--config"])
                .arg(self.target_toml())
                .args(point)
                .arg("--out-dir")
                .arg(&dir),
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("recover --all --json output is not JSON ({e}): {out}"));
        let mut images = BTreeMap::new();
        for v in manifest["volumes"].as_array().unwrap_or_else(|| panic!("no volumes in the manifest: {manifest}")) {
            let (name, file) = (v["name"].as_str().expect("volume name"), v["file"].as_str().expect("image file"));
            images.insert(name.to_owned(), std::fs::read(dir.join(file)).unwrap());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        (manifest, images)
    }
}
