//! The dashboard page (docs/dashboard.md) as a browser draws it: headless Chromium loads `/`
//! from the target and from the engine of a group that replicates real writes, and the DOM it
//! leaves says what `/api/dashboard` and `hindsight history` say: the group's card and state,
//! the window bar with its ends and the bookmarks, a lag chart with samples. With the target
//! killed the engine's page says disconnected; a page whose daemon stops answering keeps its
//! last picture under the error banner. Screenshots go to build/test-output/system_dashboard/.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, have_tools, hindsight_bin, qemu_io, run_ok, run_output, Cluster, Vol};

const BOOKMARK: &str = "before-upgrade";
const LATER_BOOKMARK: &str = "after-upgrade";

/// `GET path` on 127.0.0.1:port (waiting for a daemon just started); the status line and the
/// body.
fn get(port: u16, path: &str) -> (String, String) {
    let answer = common::http_get(port, path, &[]);
    (answer.status, answer.body)
}

/// The group "erp" of the dashboard document on `port`.
fn dashboard_group(port: u16) -> serde_json::Value {
    let (status, body) = get(port, "/api/dashboard");
    assert!(status.contains("200"), "{status}\n{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("/api/dashboard is not JSON ({e}): {body}"));
    doc["groups"].as_array().and_then(|g| g.iter().find(|g| g["name"] == "erp")).cloned().unwrap_or_else(|| panic!("no group erp: {body}"))
}

/// Waits until the document on `port` satisfies `cond` for group erp; returns the group.
fn wait_dashboard(port: u16, what: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let g = dashboard_group(port);
        if cond(&g) {
            return g;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the dashboard on port {port} never showed {what}: {g:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Where the screenshots go (build/ is git-ignored).
fn output_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("build").join("test-output").join("system_dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Headless Chromium on `url` with a profile of its own and `what` (`--dump-dom`,
/// `--screenshot=...`), after 5 s of the page's (virtual) time, for at most a minute; returns
/// what it prints.
fn chromium(url: &str, what: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", "chromium"])
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,800",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(what)
        .arg(url);
    let out = run_output(&mut cmd, Duration::from_secs(90));
    assert!(out.status.success(), "chromium {what} {url}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of `url` at `shot`.
fn screenshot(url: &str, shot: &Path) {
    let _ = std::fs::remove_file(shot);
    chromium(url, &format!("--screenshot={}", shot.display()));
    assert!(shot.exists(), "chromium wrote no screenshot at {}", shot.display());
    println!("screenshot of {url}: {}", shot.display());
}

/// The DOM of `url` as the page leaves it, and a screenshot of it at `shot`.
fn browse(url: &str, shot: &Path) -> String {
    let dom = chromium(url, "--dump-dom");
    screenshot(url, shot);
    dom
}

/// The opening tag of the first element in `dom` whose tag holds `needle`.
fn tag<'a>(dom: &'a str, needle: &str) -> Option<&'a str> {
    let at = dom.find(needle)?;
    let start = dom[..at].rfind('<')?;
    let end = at + dom[at..].find('>')?;
    Some(&dom[start..=end])
}

/// The value of attribute `name` in an opening tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let from = tag.find(&key)? + key.len();
    let len = tag[from..].find('"')?;
    Some(tag[from..from + len].replace("&amp;", "&").replace("&quot;", "\""))
}

fn number(tag: &str, name: &str) -> f64 {
    attr(tag, name).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {name} in {tag}"))
}

/// What the card of group erp in a DOM must show whatever the daemon: the card, its state
/// word, a lag chart with at least two samples, and no error banner.
fn check_card(dom: &str, state: &str) {
    let card = tag(dom, "data-group=\"erp\"").unwrap_or_else(|| panic!("no card of group erp:\n{dom}"));
    assert_eq!(attr(card, "data-state").as_deref(), Some(state), "{card}");
    let badge = tag(dom, "class=\"badge").unwrap_or_else(|| panic!("no state badge:\n{dom}"));
    assert_eq!(attr(badge, "data-state").as_deref(), Some(state), "{badge}");
    assert!(dom.contains(&format!("data-state=\"{state}\">{state}</span>")), "the badge does not say {state}:\n{dom}");
    let line = tag(dom, "class=\"lag-line\"").unwrap_or_else(|| panic!("no lag drawn:\n{dom}"));
    assert!(number(line, "data-points") >= 2.0, "fewer than 2 samples charted: {line}");
    assert!(!dom.contains("id=\"error-banner\""), "an error banner on a daemon that answers:\n{dom}");
}

/// The DOM says what the target's document and `hindsight history` say of the window.
fn check_target_page(c: &Cluster, dom: &str, group: &serde_json::Value) {
    check_card(dom, "protected");
    let bar = tag(dom, "class=\"window-bar\"").unwrap_or_else(|| panic!("no window bar:\n{dom}"));
    let (oldest, newest) = (number(bar, "data-oldest"), number(bar, "data-newest"));
    let window = &group["window"];
    assert!((oldest - window["oldest"].as_f64().unwrap()).abs() < 1.0, "{bar} against {window}");
    assert!((newest - window["newest"].as_f64().unwrap()).abs() < 1.0, "{bar} against {window}");
    let h = c.history();
    let seconds = |key: &str| h[key].as_f64().unwrap_or_else(|| panic!("history has no {key}: {h}")) / 1e9;
    assert!((oldest - seconds("first_time_ns")).abs() < 1.0 && (newest - seconds("last_time_ns")).abs() < 1.0, "{bar} against {h}");
    assert!(oldest > 1.7e9 && newest >= oldest, "{bar}");
    for name in [BOOKMARK, LATER_BOOKMARK] {
        let mark = tag(dom, &format!("data-name=\"{name}\"")).unwrap_or_else(|| panic!("no marker of bookmark {name}:\n{dom}"));
        assert!(mark.contains("bookmark-marker"), "{mark}");
        let time = number(mark, "data-time");
        assert!(time >= oldest && time <= newest, "bookmark {name} at {time} is outside the window {oldest}..{newest}");
    }
}

/// A stand-in for a daemon that stops answering: it serves the page, answers the first
/// `/api/dashboard` with `doc`, the second with something that is not JSON, and closes every
/// later connection unanswered.
struct StandIn {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl StandIn {
    fn start(doc: String) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let asked = AtomicUsize::new(0);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                if let Ok(conn) = conn {
                    Self::answer(conn, &doc, &asked);
                }
            }
        });
        StandIn { port, stop }
    }

    fn answer(mut conn: TcpStream, doc: &str, asked: &AtomicUsize) {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request);
        let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (content_type, body) = match path.as_str() {
            "/api/dashboard" => match asked.fetch_add(1, Ordering::Relaxed) {
                0 => ("application/json", doc.to_owned()),
                1 => ("application/json", "{\"version\": 1, \"groups\": [".to_owned()),
                _ => return,
            },
            p => match hindsight_consistency::dashboard::asset(p) {
                Some((content_type, body)) => (content_type, body.to_owned()),
                None => ("text/plain", String::new()),
            },
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[test]
fn the_dashboard_draws_the_window_bookmarks_lag_and_state_in_a_browser() {
    if !have_tools(&["qemu-io", "chromium", "timeout"]) {
        return;
    }
    let out = output_dir();
    let (port, eport) = (free_port(), free_port());
    let mut c = Cluster::prepare(&[Vol::new("vm1", "db", 4 << 20)], &format!("metrics_listen = \"127.0.0.1:{port}\"\n"), "");
    c.engine_extra = format!("metrics_listen = \"127.0.0.1:{eport}\"");
    c.group_extra = "rpo = \"2s\"".into();
    c.launch();
    c.start_agents();
    let uri = c.uri("db");
    let bookmark =
        |name: &str| run_ok(Command::new(hindsight_bin()).args(["bookmark", name, "--group", "erp", "--config"]).arg(c.engine_toml()));
    qemu_io(&uri, &["write -P 7 0 1M".into(), "write -P 8 2M 512k".into()]);
    bookmark(BOOKMARK);
    qemu_io(&uri, &["write -P 9 3M 64k".into()]);
    c.settle();
    // Samples are taken every 5 s: a second bookmark after the first sample, so that the two
    // stand apart on the bar, then two samples at each daemon.
    let samples = |g: &serde_json::Value| g["lag_history"].as_array().map_or(0, Vec::len);
    wait_dashboard(port, "a lag sample", |g| samples(g) >= 1);
    qemu_io(&uri, &["write -P 10 1M 256k".into()]);
    bookmark(LATER_BOOKMARK);
    qemu_io(&uri, &["write -P 11 3M 128k".into()]);
    c.settle();
    let group = wait_dashboard(port, "two lag samples and the bookmarks", |g| {
        samples(g) >= 2 && g["bookmarks"].as_array().is_some_and(|b| b.iter().any(|b| b["name"] == LATER_BOOKMARK))
    });
    wait_dashboard(eport, "two lag samples, protected", |g| samples(g) >= 2 && g["state"] == "protected");

    let dom = browse(&format!("http://127.0.0.1:{port}/"), &out.join("target.png"));
    check_target_page(&c, &dom, &group);

    let dom = browse(&format!("http://127.0.0.1:{eport}/"), &out.join("engine.png"));
    check_card(&dom, "protected");
    assert!(!dom.contains("class=\"window-bar\""), "the engine's page draws a window it does not know:\n{dom}");
    assert!(dom.contains("kept at the recovery site"), "the engine's page does not say where the window is:\n{dom}");
    let chart = tag(&dom, "class=\"lag-chart\"").unwrap_or_else(|| panic!("no lag chart:\n{dom}"));
    assert_eq!(attr(chart, "data-rpo").as_deref(), Some("2"), "the engine's chart does not know the RPO: {chart}");
    assert!(tag(&dom, "class=\"rpo-line\"").is_some(), "no RPO line on the engine's chart:\n{dom}");

    // The target goes away and a write waits at the engine: its page says disconnected.
    c.kill_target();
    qemu_io(&uri, &["write -P 12 0 64k".into()]);
    wait_dashboard(eport, "disconnected", |g| g["state"] == "disconnected");
    let dom = browse(&format!("http://127.0.0.1:{eport}/"), &out.join("engine-disconnected.png"));
    check_card(&dom, "disconnected");

    // A daemon that answers once and then no more: the picture stays, under the banner.
    let (_, doc) = get(eport, "/api/dashboard");
    let stand_in = StandIn::start(doc.clone());
    let dom = chromium(&format!("http://127.0.0.1:{}/", stand_in.port), "--dump-dom");
    let banner = dom.find("id=\"error-banner\"").map(|at| &dom[at..at + dom[at..].find("</div>").unwrap_or(0)]);
    let banner = banner.unwrap_or_else(|| panic!("no error banner with the daemon silent:\n{dom}"));
    assert!(banner.contains("no answer from the engine"), "{banner}");
    assert!(tag(&dom, "data-group=\"erp\"").is_some(), "the last picture is gone:\n{dom}");
    let stand_in = StandIn::start(doc);
    screenshot(&format!("http://127.0.0.1:{}/", stand_in.port), &out.join("no-answer.png"));
}
