//! What monitoring sees of the cluster: plain HTTP GETs of a metrics address, `promtool`, and a
//! real Prometheus server scraping the target and the engine, queried over its HTTP API and
//! killed by PID when dropped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::kill;
use super::*;

/// An HTTP answer: its status line, headers (as sent) and body.
pub struct HttpAnswer {
    pub status: String,
    pub head: String,
    pub body: String,
}

/// `GET path` on 127.0.0.1:port over HTTP/1.0 with these extra header lines; waits up to 20 s
/// for something to listen there (a daemon just started binds its metrics address once its
/// groups are loaded).
pub fn http_get(port: u16, path: &str, headers: &[&str]) -> HttpAnswer {
    let started = Instant::now();
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(20), "nothing serves HTTP on port {port}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{extra}\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    HttpAnswer { status: head.lines().next().unwrap_or("").to_owned(), head: head.to_owned(), body: body.to_owned() }
}

/// `promtool check metrics` on a scrape's text (written to `file` first, as promtool reads it
/// on its standard input); returns its exit code and what it printed.
pub fn promtool_check_metrics(text: &str, file: &Path) -> (Option<i32>, String) {
    std::fs::write(file, text).unwrap();
    let (code, out, err) =
        run_code(Command::new("sh").args(["-c", "exec promtool check metrics < \"$1\"", "sh"]).arg(file), Duration::from_secs(30));
    (code, format!("{out}{err}"))
}

/// One element of an instant vector: its labels and its value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus server on 127.0.0.1 scraping jobs of one target each every second, with its own
/// data directory; killed when dropped.
pub struct Prometheus {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` in `dir` (its config, data and log) scraping each `(job, port)` at
    /// 127.0.0.1 every second and evaluating `rule_files` every second; waits until it is ready.
    pub fn start(dir: &Path, jobs: &[(&str, u16)], rule_files: &[PathBuf]) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 800ms\n  evaluation_interval: 1s\n");
        config += "rule_files:\n";
        for f in rule_files {
            config += &format!("  - \"{}\"\n", f.display());
        }
        config += "scrape_configs:\n";
        for (job, port) in jobs {
            config += &format!("  - job_name: \"{job}\"\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n");
        }
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn prometheus: {e}"));
        let mut p = Prometheus { child: Some(child), port, dir: dir.to_owned() };
        let started = Instant::now();
        loop {
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("prometheus exited ({status}); its log:\n{}", p.log());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && http_get(port, "/-/ready", &[]).status.contains("200") {
                return p;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "prometheus not ready after 30 s; its log:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>`; returns the `data` of a successful answer.
    fn api(&self, path: &str) -> serde_json::Value {
        let a = http_get(self.port, &format!("/api/v1/{path}"), &[]);
        let v: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("/api/v1/{path}: {e}: {} {}", a.status, a.body));
        assert_eq!(v["status"], "success", "/api/v1/{path}: {}", a.body);
        v["data"].clone()
    }

    /// The instant vector of a PromQL expression, now.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let data = self.api(&format!("query?query={}", url_encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| Sample {
                labels: r["metric"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect(),
                value: r["value"][1].as_str().unwrap().parse().unwrap(),
            })
            .collect()
    }

    /// The value of an expression that gives one element, if it gives one.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let v = self.query(promql);
        assert!(v.len() <= 1, "{promql} gives {} elements: {v:?}", v.len());
        v.first().map(|s| s.value)
    }

    /// Waits up to `within` until `ok` holds of the expression's vector, and returns it; fails
    /// the test with `what` and the last vector otherwise.
    pub fn wait(&self, what: &str, promql: &str, within: Duration, ok: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let started = Instant::now();
        loop {
            let v = self.query(promql);
            if ok(&v) {
                return v;
            }
            assert!(started.elapsed() < within, "{what}: not within {within:?}; {promql} gives {v:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the expression gives one element, and returns its value.
    pub fn wait_value(&self, what: &str, promql: &str, within: Duration) -> f64 {
        self.wait(what, promql, within, |v| v.len() == 1)[0].value
    }

    /// The alerts pending or firing (`/api/v1/alerts`).
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        self.api("alerts")["alerts"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        kill(self.child.take());
    }
}

/// `s` percent-encoded for a URL's query (everything but the unreserved characters).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
