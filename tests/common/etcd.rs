//! A real etcd (the distribution's `etcd-server`) for the engine-cluster tests: one member, or
//! three on loopback ports, each with its own data directory, killed by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{free_port, run_timeout};

/// One etcd member.
struct Member {
    child: Child,
    client_port: u16,
}

/// A running etcd cluster.
pub struct Etcd {
    members: Vec<Option<Member>>,
    dir: PathBuf,
}

impl Etcd {
    /// Starts `n` members (1 or 3) under `dir` and waits until they answer.
    pub fn start(dir: &Path, n: usize) -> Etcd {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.join(format!("etcd-{i}"));
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log"))).unwrap();
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(initial.join(","))
                .arg("--initial-cluster-state")
                .arg("new")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("etcd runs");
            members.push(Some(Member { child, client_port: *client }));
        }
        let etcd = Etcd { members, dir: dir.to_owned() };
        let start = Instant::now();
        while !etcd.healthy() {
            assert!(start.elapsed() < Duration::from_secs(30), "etcd did not come up; logs in {}", dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    /// The client URLs of the members, for `[cluster] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().flatten().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    fn etcdctl(&self, args: &[&str]) -> (bool, String, String) {
        let endpoints: Vec<String> = self.members.iter().flatten().map(|m| format!("127.0.0.1:{}", m.client_port)).collect();
        run_timeout(
            Command::new("etcdctl").env("ETCDCTL_API", "3").arg(format!("--endpoints={}", endpoints.join(","))).args(args),
            Duration::from_secs(10),
        )
    }

    fn healthy(&self) -> bool {
        self.etcdctl(&["endpoint", "health"]).0
    }

    /// The value of `key` as JSON, if it exists.
    pub fn get_json(&self, key: &str) -> Option<serde_json::Value> {
        let (ok, out, err) = self.etcdctl(&["get", key, "--print-value-only"]);
        assert!(ok, "etcdctl get {key}: {err}");
        let out = out.trim();
        (!out.is_empty()).then(|| serde_json::from_str(out).unwrap_or_else(|e| panic!("{key} holds {out:?}: {e}")))
    }

    /// The create revision of `key` (the ownership token of an `owners/` key), if it exists.
    pub fn create_revision(&self, key: &str) -> Option<u64> {
        let (ok, out, err) = self.etcdctl(&["get", key, "-w", "json"]);
        assert!(ok, "etcdctl get {key}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["kvs"][0]["create_revision"].as_u64()
    }

    /// Where the logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for mut m in self.members.drain(..).flatten() {
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}
