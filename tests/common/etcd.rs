//! A real etcd (the distribution's `etcd-server`) for the engine-cluster tests: one member, or
//! three on loopback ports, each with its own data directory, killed by PID when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{free_port, run_timeout};

/// One etcd member.
struct Member {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
}

/// A running etcd cluster.
pub struct Etcd {
    members: Vec<Member>,
    dir: PathBuf,
}

impl Etcd {
    /// Starts `n` members (1 or 3) under `dir` and waits until they answer.
    pub fn start(dir: &Path, n: usize) -> Etcd {
        let members = (0..n).map(|_| Member { child: None, client_port: free_port(), peer_port: free_port() }).collect();
        let mut etcd = Etcd { members, dir: dir.to_owned() };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_healthy();
        etcd
    }

    /// Starts member `i` (again: on its data directory, with its ports).
    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().enumerate().map(|(j, m)| format!("m{j}=http://127.0.0.1:{}", m.peer_port)).collect();
        let (client, peer) = (self.members[i].client_port, self.members[i].peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("etcd-{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(self.dir.join(format!("etcd-{i}")))
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
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&self) {
        let start = Instant::now();
        while !self.healthy() {
            assert!(start.elapsed() < Duration::from_secs(30), "etcd did not come up; logs in {}", self.dir.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kill -9 every member: etcd is down.
    pub fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// kill -9 member `i` only.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts every stopped member again on its data and waits until etcd answers.
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy();
    }

    /// The client URLs of the members, for `[cluster] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    fn etcdctl(&self, args: &[&str]) -> (bool, String, String) {
        let endpoints: Vec<String> =
            self.members.iter().filter(|m| m.child.is_some()).map(|m| format!("127.0.0.1:{}", m.client_port)).collect();
        run_timeout(
            Command::new("etcdctl").env("ETCDCTL_API", "3").arg(format!("--endpoints={}", endpoints.join(","))).args(args),
            Duration::from_secs(10),
        )
    }

    /// Whether a quorum answers (a write goes through).
    fn healthy(&self) -> bool {
        self.etcdctl(&["put", "/health-check", "ok"]).0
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
        self.kill_all();
    }
}
