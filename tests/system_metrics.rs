//! The Prometheus endpoints of the target (`target.metrics_listen`), the engine
//! (`engine.metrics_listen`) and the agent (`agent.metrics_listen`): scraped over HTTP while a
//! group replicates, their series say what history and status say (the newest seq, the window,
//! the journal, the lag, each volume's writes), and they change when the peer goes away.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, have_tools, qemu_io, Cluster, Vol};

/// `GET path` on 127.0.0.1:port (waiting for a daemon just started); the status line and the
/// body.
fn get(port: u16, path: &str) -> (String, String) {
    let answer = common::http_get(port, path, &[]);
    (answer.status, answer.body)
}

/// The value of `name{group="erp"}` in a scrape.
fn value(body: &str, name: &str) -> Option<f64> {
    labelled(body, name, "group=\"erp\"")
}

/// The value of `name{labels}` in a scrape.
fn labelled(body: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok())
}

const DB: &str = "group=\"erp\",vm=\"vm1\",volume=\"db\"";

#[test]
fn target_metrics_follow_the_group_and_its_engine() {
    if !have_tools(&["qemu-io"]) {
        return;
    }
    let (port, eport, aport) = (free_port(), free_port(), free_port());
    let mut c = Cluster::prepare(&[Vol::new("vm1", "db", 4 << 20)], &format!("metrics_listen = \"127.0.0.1:{port}\"\n"), "");
    c.engine_extra = format!("metrics_listen = \"127.0.0.1:{eport}\"");
    c.agent_extra = format!("metrics_listen = \"127.0.0.1:{aport}\"\nengine_timeout = \"1s\"");
    c.launch();
    c.start_agents();
    let uri = c.uri("db");
    qemu_io(&uri, &["write -P 7 0 1M".into(), "write -P 8 2M 512k".into()]);
    let seq = c.settle();
    let h = c.history();

    let (status, body) = get(port, "/metrics");
    assert!(status.contains("200"), "{status}\n{body}");
    assert_eq!(value(&body, "hindsight_target_last_seq"), Some(seq as f64), "{body}");
    assert_eq!(value(&body, "hindsight_target_journal_bytes"), h["journal_bytes"].as_f64(), "{body}");
    let (oldest, newest) = (
        value(&body, "hindsight_target_oldest_point_timestamp_seconds").unwrap(),
        value(&body, "hindsight_target_newest_point_timestamp_seconds").unwrap(),
    );
    let window = value(&body, "hindsight_target_window_seconds").unwrap();
    assert!(oldest > 1.7e9 && newest >= oldest && (window - (newest - oldest)).abs() < 1e-3, "{body}");
    assert_eq!(value(&body, "hindsight_target_engine_connected"), Some(1.0), "{body}");
    assert_eq!(value(&body, "hindsight_target_group_stopped"), Some(0.0), "{body}");
    assert!(body.contains("# TYPE hindsight_target_last_seq gauge"), "{body}");
    // Each volume's writes, as the target took them.
    assert_eq!(labelled(&body, "hindsight_target_volume_written_bytes_total", DB), Some(1.5 * 1048576.0), "{body}");
    assert!(labelled(&body, "hindsight_target_volume_writes_total", DB) >= Some(2.0), "{body}");
    assert!(value(&body, "hindsight_target_lag_seconds").is_some_and(|l| (0.0..10.0).contains(&l)), "{body}");

    // The engine's: what status says.
    let started = Instant::now();
    let body = loop {
        let (_, body) = get(eport, "/metrics");
        if value(&body, "hindsight_engine_lag_records") == Some(0.0) {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the engine's lag never reached 0:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(value(&body, "hindsight_engine_durable_seq"), Some(seq as f64), "{body}");
    assert_eq!(value(&body, "hindsight_engine_confirmed_seq"), Some(seq as f64), "{body}");
    assert_eq!(value(&body, "hindsight_engine_target_connected"), Some(1.0), "{body}");
    assert_eq!(value(&body, "hindsight_engine_paused"), Some(0.0), "{body}");
    assert!(value(&body, "hindsight_engine_shipped_record_bytes_total").unwrap() >= (1.5 * 1048576.0), "{body}");
    // A client that asks for no format (no `Accept`) is answered in the classic text format,
    // whose counter families are named with their `_total` suffix.
    assert!(body.contains("# TYPE hindsight_engine_wire_bytes_total counter"), "{body}");
    assert_eq!(labelled(&body, "hindsight_engine_volume_written_bytes_total", DB), Some(1.5 * 1048576.0), "{body}");
    assert_eq!(labelled(&body, "hindsight_engine_volume_attached", DB), Some(1.0), "{body}");
    let confirmed_at = value(&body, "hindsight_engine_last_confirmed_write_timestamp_seconds").unwrap();
    assert!((confirmed_at - newest).abs() < 1e-3, "the last confirmed write is the target's newest point: {body}");

    // The agent's: the guest's writes, the link.
    let (status, body) = get(aport, "/metrics");
    assert!(status.contains("200"), "{status}\n{body}");
    assert_eq!(labelled(&body, "hindsight_agent_guest_written_bytes_total", DB), Some(1.5 * 1048576.0), "{body}");
    assert_eq!(labelled(&body, "hindsight_agent_engine_connected", "vm=\"vm1\""), Some(1.0), "{body}");
    assert_eq!(labelled(&body, "hindsight_agent_dirty_regions", DB), Some(0.0), "{body}");
    assert!(get(aport, "/").0.contains("404"), "the agent serves no dashboard");
    // The target goes away: the engine says so, and the lag grows with the next write.
    c.kill_target();
    qemu_io(&uri, &["write -P 9 3M 64k".into()]);
    let started = Instant::now();
    loop {
        let (_, body) = get(eport, "/metrics");
        if value(&body, "hindsight_engine_target_connected") == Some(0.0) && value(&body, "hindsight_engine_lag_records") >= Some(1.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no lag or still connected with the target killed:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.start_target();

    // The engine goes away: the target's and the agent's series say so, and a write the
    // engine cannot take is left in the agent's dirty map.
    c.kill_engine();
    let started = Instant::now();
    while value(&get(port, "/metrics").1, "hindsight_target_engine_connected") != Some(0.0) {
        assert!(started.elapsed() < Duration::from_secs(30), "engine_connected stayed 1 with the engine killed");
        std::thread::sleep(Duration::from_millis(100));
    }
    qemu_io(&uri, &["write -P 10 3M 64k".into()]);
    let body = get(aport, "/metrics").1;
    assert_eq!(labelled(&body, "hindsight_agent_engine_connected", "vm=\"vm1\""), Some(0.0), "{body}");
    assert!(labelled(&body, "hindsight_agent_dirty_regions", DB) >= Some(1.0), "{body}");
    assert_eq!(labelled(&body, "hindsight_agent_resyncing", DB), Some(1.0), "{body}");
    let (status, body) = get(port, "/api/dashboard");
    assert!(status.contains("200") && body.contains("\"daemon\":\"target\""), "{status}\n{body}");
    let (status, _) = get(port, "/nothing-here");
    assert!(status.contains("404"), "{status}");
}
