//! The metrics endpoints of the target and the engine under a real Prometheus server, and the
//! example alert rules (docs/alerts/hindsight-rules.yml): Prometheus scrapes both while a guest
//! writes a little all the time; its series say what the cluster does (the lag, the window,
//! the journals, each volume's writes), `promtool check metrics` passes on each endpoint, and
//! with the target frozen (SIGSTOP, as a hung host looks) the lag grows, the target's scrape
//! goes down and the rules' alerts go pending, until it goes on and the lag returns to 0.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{free_port, have_tools, http_get, promtool_check_metrics, qemu_io, run_code, Cluster, Prometheus, Vol};

/// How long any one condition may take to show in Prometheus (it scrapes every second).
const SHOWS: Duration = Duration::from_secs(20);

/// The example rule file.
fn rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/alerts/hindsight-rules.yml")
}

/// Now, in seconds since the epoch.
fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A guest that writes 4 KiB every 100 ms or so, one qemu-io call a write, on a thread of its
/// own until stopped (or dropped); counts the writes acknowledged.
struct Trickle {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Trickle {
    fn start(uri: String, size: u64) -> Trickle {
        let (stop, written) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, w) = (Arc::clone(&stop), Arc::clone(&written));
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let off = (n * 4096) % size;
                qemu_io(&uri, &[format!("write -P {} {off} 4k", n % 251)]);
                n += 1;
                w.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Trickle { stop, written, thread: Some(thread) }
    }

    /// The writes acknowledged so far.
    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Stops writing; returns how many writes were acknowledged, and fails the test if one
    /// failed.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let done = self.thread.take().unwrap().join();
        assert!(done.is_ok(), "a write of the trickle failed (its panic is above)");
        self.written()
    }
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether an alert named `name` whose labels include `labels` is pending or firing.
fn alert_active(alerts: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> bool {
    alerts.iter().any(|a| {
        a["labels"]["alertname"] == name
            && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            && matches!(a["state"].as_str(), Some("pending" | "firing"))
    })
}

#[test]
fn prometheus_scrapes_both_daemons_and_alerts_while_the_target_is_frozen() {
    if !have_tools(&["qemu-io", "prometheus", "promtool"]) {
        return;
    }
    let (tmetrics, emetrics, ametrics) = (free_port(), free_port(), free_port());
    let size = 4 << 20;
    let mut c = Cluster::prepare(&[Vol::new("vm1", "db", size)], &format!("metrics_listen = \"127.0.0.1:{tmetrics}\"\n"), "");
    c.engine_extra = format!("metrics_listen = \"127.0.0.1:{emetrics}\"");
    c.agent_extra = format!("metrics_listen = \"127.0.0.1:{ametrics}\"");
    // cdp: the engine acknowledges once its own journal holds a write, so the guest goes on
    // writing while the target is frozen (sync would hold the writes).
    c.group_extra = "mode = \"cdp\"".into();
    c.launch();
    c.start_agents();
    let started = now_s();
    let trickle = Trickle::start(c.uri("db"), size);
    let prom = Prometheus::start(
        &c.path("prometheus"),
        &[("hindsight-target", tmetrics), ("hindsight-engine", emetrics), ("hindsight-agent", ametrics)],
        &[rules()],
    );

    for job in ["hindsight-target", "hindsight-engine", "hindsight-agent"] {
        prom.wait(&format!("{job} scraped"), &format!("up{{job=\"{job}\"}} == 1"), SHOWS, |v| v.len() == 1);
    }

    // promtool lints each endpoint as curl or promtool fetch it; Prometheus itself, which asks
    // for OpenMetrics, is answered in OpenMetrics (up == 1 says it parsed it).
    for (name, port) in [("target", tmetrics), ("engine", emetrics), ("agent", ametrics)] {
        let text = http_get(port, "/metrics", &[]);
        assert!(text.status.contains("200") && text.head.contains("text/plain; version=0.0.4"), "{}\n{}", text.head, text.body);
        let (code, out) = promtool_check_metrics(&text.body, &c.path(&format!("{name}.metrics")));
        println!("promtool check metrics, the {name}'s /metrics ({} lines): exit {code:?}\n{out}", text.body.lines().count());
        assert_eq!(code, Some(0), "promtool check metrics on the {name}'s /metrics:\n{out}\n{}", text.body);
        let om = http_get(port, "/metrics", &["Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"]);
        assert!(om.head.contains("application/openmetrics-text") && om.body.ends_with("# EOF\n"), "{}\n{}", om.head, om.body);
    }

    // The lag: 0 at some scrape while connected (the trickle leaves moments with nothing in
    // flight), in records and in seconds.
    prom.wait(
        "the engine's lag at 0",
        "hindsight_engine_lag_records{group=\"erp\"} == 0 and hindsight_engine_lag_seconds{group=\"erp\"} == 0",
        SHOWS,
        |v| v.len() == 1,
    );
    // The window: between the first write and now, and growing with the writes.
    let oldest = prom.wait_value("oldest point", "hindsight_target_oldest_point_timestamp_seconds{group=\"erp\"}", SHOWS);
    let newest = prom.wait_value("newest point", "hindsight_target_newest_point_timestamp_seconds{group=\"erp\"}", SHOWS);
    let window = prom.wait_value("window", "hindsight_target_window_seconds{group=\"erp\"}", SHOWS);
    let now = now_s();
    assert!(started - 5.0 <= oldest && oldest <= newest && newest <= now + 1.0, "oldest {oldest}, newest {newest}, now {now}");
    assert!(window >= 0.0, "window {window}");
    prom.wait(
        "the window grows as the guest writes",
        &format!("hindsight_target_window_seconds{{group=\"erp\"}} > {window}"),
        SHOWS,
        |v| v.len() == 1,
    );
    // The journals hold the writes.
    for series in ["hindsight_target_journal_bytes", "hindsight_engine_journal_bytes"] {
        prom.wait(&format!("{series} > 0"), &format!("{series}{{group=\"erp\"}} > 0"), SHOWS, |v| v.len() == 1);
    }
    // Each volume's writes, with its labels, rise with the guest's writes.
    for series in ["hindsight_engine_volume_writes_total", "hindsight_target_volume_writes_total", "hindsight_agent_guest_writes_total"] {
        let v = prom.wait(series, &format!("{series}{{group=\"erp\"}} > 0"), SHOWS, |v| v.len() == 1);
        let labels = &v[0].labels;
        assert_eq!((labels["vm"].as_str(), labels["volume"].as_str()), ("vm1", "db"), "{v:?}");
        let before = v[0].value;
        prom.wait(&format!("{series} rises"), &format!("{series}{{group=\"erp\",vm=\"vm1\",volume=\"db\"}} > {before}"), SHOWS, |v| {
            v.len() == 1
        });
    }

    // The target freezes: the guest goes on writing (cdp), the engine's lag grows, the
    // target's scrape fails, and the alerts of the rule file go pending.
    let paused = c.pause("target");
    let written = trickle.written();
    prom.wait("the target's scrape down", "up{job=\"hindsight-target\"} == 0", SHOWS, |v| v.len() == 1);
    let lag = prom.wait_value(
        "a lag in records",
        "hindsight_engine_lag_seconds{group=\"erp\"} and hindsight_engine_lag_records{group=\"erp\"} > 0",
        SHOWS,
    );
    prom.wait("the lag grows", &format!("hindsight_engine_lag_seconds{{group=\"erp\"}} >= {}", lag + 2.0), SHOWS, |v| v.len() == 1);
    assert!(trickle.written() > written, "no write was acknowledged with the target frozen ({written} before)");
    // The lag rule's deriv over 5 minutes passes 0.5 once the lag has grown about as long as
    // the series was flat before (since Prometheus started: seconds here).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let alerts = loop {
        let alerts = prom.alerts();
        if alert_active(&alerts, "HindsightScrapeDown", &[("job", "hindsight-target")])
            && alert_active(&alerts, "HindsightLagGrowing", &[("group", "erp"), ("job", "hindsight-engine")])
        {
            break alerts;
        }
        assert!(std::time::Instant::now() < deadline, "the alerts did not go pending with the target frozen: {alerts:#?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("alerts with the target frozen: {}", serde_json::to_string_pretty(&alerts).unwrap());
    let connected = prom.value("hindsight_engine_target_connected{group=\"erp\"}");
    println!("hindsight_engine_target_connected with the target frozen: {connected:?}");

    // It goes on: its scrape is back and the lag returns to 0.
    paused.resume();
    prom.wait("the target's scrape back", "up{job=\"hindsight-target\"} == 1", SHOWS, |v| v.len() == 1);
    prom.wait("the lag back at 0", "hindsight_engine_lag_records{group=\"erp\"} == 0", Duration::from_secs(30), |v| v.len() == 1);
    let writes = trickle.stop();
    println!("{writes} writes of 4 KiB in {:.1} s", now_s() - started);
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !have_tools(&["promtool"]) {
        return;
    }
    let rules = rules();
    let tests = rules.with_file_name("hindsight-rules.test.yml");
    for args in [["check", "rules"], ["test", "rules"]] {
        let file = if args[0] == "check" { &rules } else { &tests };
        let (code, out, err) = run_code(Command::new("promtool").args(args).arg(file), Duration::from_secs(60));
        println!("promtool {} {}: exit {code:?}\n{out}{err}", args.join(" "), file.display());
        assert_eq!(code, Some(0), "promtool {} {}:\n{out}{err}", args.join(" "), file.display());
    }
}
