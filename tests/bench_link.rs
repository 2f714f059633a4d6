//! Benchmarks of the replication link (docs/benchmarks.md, "Modes and the link"): run by
//! `scripts/bench.sh link`, never by the test command (every test here is `#[ignore]`d and
//! asserts nothing about speed). Each prints a result line starting with `BENCH`.
//!
//! - bytes on the wire per GiB written by an ext4 workload, per mode and compression;
//! - sync QD1 write latency against the link's delay (0, 1, 5 ms), with cdp beside it;
//! - cdp lag p50/p99 under a sustained load at 80 % of a capped link;
//! - engine and target CPU per GiB shipped: plaintext, TLS, TLS with lz4.

#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap, clippy::cast_precision_loss)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::wan::WanProxy;
use common::*;

fn cluster(size: u64, group_extra: &str) -> (Cluster, WanProxy) {
    cluster_with(size, group_extra, false)
}

/// A cluster of one volume shipping through a WAN proxy; `plaintext`: no TLS on any link.
fn cluster_with(size: u64, group_extra: &str, plaintext: bool) -> (Cluster, WanProxy) {
    cluster_via_wan(size, |c| {
        c.plaintext = plaintext;
        c.group_extra = group_extra.to_string();
    })
}

/// Mounts ext4 on the volume through nbdfuse and a loop device.
fn mount_ext4(c: &Cluster) -> Option<(Ext4Stack, std::path::PathBuf)> {
    let mut stack = start_nbdfuse(c.dir.path(), &c.uri("data"))?;
    let dev = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(stack.fuse_dir.join("disk"))).trim().to_owned();
    stack.loop_dev = Some(dev.clone());
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&dev));
    let mnt = c.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok(Command::new("mount").args(["-t", "ext4"]).arg(&dev).arg(&mnt));
    stack.mount_dir = Some(mnt.clone());
    Some((stack, mnt))
}

/// 1 GiB of 16 KiB random overwrites (half-compressible data, as files are) into a 256 MiB
/// file on ext4, then fsync.
fn ext4_workload(mnt: &Path) {
    fio_json(&[
        "--name=ext4".into(),
        format!("--filename={}", mnt.join("data.bin").display()),
        "--rw=randwrite".into(),
        "--bs=16k".into(),
        "--size=256m".into(),
        "--io_size=1g".into(),
        "--ioengine=psync".into(),
        "--buffer_compress_percentage=50".into(),
        "--refill_buffers".into(),
        "--end_fsync=1".into(),
    ]);
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_bytes_on_the_wire_per_gib_by_mode() {
    if !have_tools(&["fio", "nbdfuse", "mkfs.ext4", "losetup"]) {
        return;
    }
    for (mode, compression) in [("cdp", "off"), ("sync", "off"), ("async", "off"), ("cdp", "lz4"), ("async", "lz4")] {
        let (c, proxy) = cluster(512 << 20, &format!("mode = \"{mode}\"\ninterval = \"5s\"\ncompression = \"{compression}\""));
        let Some((mut stack, mnt)) = mount_ext4(&c) else { return };
        let before = proxy.bytes_up();
        let started = Instant::now();
        ext4_workload(&mnt);
        stack.unmount();
        stack.detach_loop();
        stack.stop_nbdfuse();
        if mode == "async" {
            // The last interval is shipped at its point.
            std::thread::sleep(Duration::from_secs(6));
        }
        c.wait_shipped();
        let wire = proxy.bytes_up() - before;
        let s = c.status();
        let written = s["shipped_bytes"].as_u64().unwrap();
        // fio writes 1 GiB through the file system; the wire carries the data, ext4's metadata
        // and journal, and the frames.
        println!(
            "BENCH bytes-per-gib mode={mode} compression={compression} wire_mib_per_gib_written={:.0} record_mib={:.0} seconds={:.1}",
            wire as f64 / f64::from(1u32 << 20),
            written as f64 / f64::from(1u32 << 20),
            started.elapsed().as_secs_f64()
        );
    }
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_sync_qd1_latency_against_link_delay() {
    if !have_tools(&["fio"]) {
        return;
    }
    for (mode, delay_ms) in [("cdp", 0), ("sync", 0), ("sync", 1), ("sync", 5)] {
        let (c, proxy) = cluster(256 << 20, &format!("mode = \"{mode}\"\ncompression = \"off\""));
        proxy.set_delay(Duration::from_millis(delay_ms));
        let v = fio_json(&[
            "--name=qd1".into(),
            "--ioengine=nbd".into(),
            format!("--uri={}", c.uri("data")),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=1".into(),
            "--size=256m".into(),
            "--time_based".into(),
            format!("--runtime={}", std::env::var("HS_BENCH_RUNTIME").unwrap_or_else(|_| "10".into())),
        ]);
        let w = &v["jobs"][0]["write"];
        let pct = &w["clat_ns"]["percentile"];
        println!(
            "BENCH sync-qd1 mode={mode} delay_ms={delay_ms} iops={:.0} p50_us={:.0} p99_us={:.0}",
            w["iops"].as_f64().unwrap(),
            pct["50.000000"].as_f64().unwrap() / 1000.0,
            pct["99.000000"].as_f64().unwrap() / 1000.0
        );
        assert_eq!(c.status()["effective_mode"], mode);
    }
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_cdp_lag_at_80_percent_of_the_link() {
    if !have_tools(&["fio"]) {
        return;
    }
    const LINK: u64 = 20 << 20;
    let (c, proxy) = cluster(1 << 30, "mode = \"cdp\"\ncompression = \"off\"");
    proxy.set_rate(LINK);
    proxy.set_delay(Duration::from_millis(5));
    let runtime: u64 = std::env::var("HS_BENCH_RUNTIME").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let uri = c.uri("data");
    let fio = std::thread::spawn(move || {
        fio_json(&[
            "--name=sustained".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=64k".into(),
            "--iodepth=4".into(),
            format!("--rate={}", LINK * 8 / 10),
            "--size=1g".into(),
            "--time_based".into(),
            format!("--runtime={runtime}"),
        ])
    });
    let mut lags = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(runtime) {
        // Skip the first seconds (the link's queues filling).
        let s = c.status();
        if start.elapsed() > Duration::from_secs(2) {
            lags.push(s["lag_ms"].as_u64().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = fio.join().unwrap();
    lags.sort_unstable();
    let p = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
    println!(
        "BENCH cdp-lag link_bytes_per_s={LINK} load_bytes_per_s={:.0} samples={} lag_p50_ms={} lag_p99_ms={} lag_max_ms={}",
        v["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap(),
        lags.len(),
        p(0.5),
        p(0.99),
        lags[lags.len() - 1]
    );
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_cpu_per_gib_of_tls_and_compression() {
    if !have_tools(&["fio"]) {
        return;
    }
    for (link, compression) in [("plaintext", "off"), ("tls", "off"), ("tls", "lz4")] {
        let (c, _proxy) = cluster_with(1 << 30, &format!("mode = \"cdp\"\ncompression = \"{compression}\""), link == "plaintext");
        let (engine, target) = (c.pid("engine").unwrap(), c.pid("target").unwrap());
        let (e0, t0) = (cpu_seconds(engine), cpu_seconds(target));
        fio_json(&[
            "--name=seq".into(),
            "--ioengine=nbd".into(),
            format!("--uri={}", c.uri("data")),
            "--rw=write".into(),
            "--bs=1m".into(),
            "--iodepth=8".into(),
            "--size=1g".into(),
            "--buffer_compress_percentage=50".into(),
            "--refill_buffers".into(),
        ]);
        c.wait_shipped();
        let (e1, t1) = (cpu_seconds(engine), cpu_seconds(target));
        let s = c.status();
        println!(
            "BENCH cpu-per-gib link={link} compression={compression} engine_cpu_s={:.2} target_cpu_s={:.2} ratio={:.2}",
            e1 - e0,
            t1 - t0,
            s["shipped_bytes"].as_f64().unwrap() / s["wire_bytes"].as_f64().unwrap()
        );
    }
}

/// A cluster without the WAN proxy, with extra lines for the agent and its disks.
fn plain_cluster(size: u64, agent_extra: &str, disk_extra: &str) -> Cluster {
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", size)], "", "");
    c.agent_extra = agent_extra.to_string();
    c.disk_extra = disk_extra.to_string();
    c.launch();
    c.start_agents();
    c
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_dirty_tracking_cost() {
    if !have_tools(&["fio"]) {
        return;
    }
    let runtime = std::env::var("HS_BENCH_RUNTIME").unwrap_or_else(|_| "10".into());
    let shm = format!("dirty_map = \"/dev/shm/hindsight-bench-{}.hsmap\"", std::process::id());
    for (map, extra) in [("on", ""), ("on-tmpfs", shm.as_str()), ("off", "dirty_map = \"none\"")] {
        let c = plain_cluster(1 << 30, "", extra);
        for (job, qd) in [("4k-randwrite-qd32", 32), ("4k-randwrite-qd1", 1)] {
            let v = fio_json(&[
                format!("--name={job}"),
                "--ioengine=nbd".into(),
                format!("--uri={}", c.uri("data")),
                "--rw=randwrite".into(),
                "--bs=4k".into(),
                format!("--iodepth={qd}"),
                "--size=1g".into(),
                "--time_based".into(),
                format!("--runtime={runtime}"),
            ]);
            let w = &v["jobs"][0]["write"];
            println!(
                "BENCH dirty-map map={map} job={job} iops={:.0} p50_us={:.0}",
                w["iops"].as_f64().unwrap(),
                w["clat_ns"]["percentile"]["50.000000"].as_f64().unwrap() / 1000.0
            );
        }
    }
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_resync_rate() {
    if !have_tools(&["fio"]) {
        return;
    }
    let mut c = plain_cluster(1 << 30, "engine_timeout = \"1s\"", "");
    c.kill_engine();
    // 512 MiB written while the engine is away: tracked, acknowledged from the local disk.
    fio_json(&[
        "--name=outage".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", c.uri("data")),
        "--rw=write".into(),
        "--bs=1m".into(),
        "--iodepth=8".into(),
        "--size=512m".into(),
    ]);
    let started = Instant::now();
    c.start_engine();
    while !c.log("agent-vm1").contains("resync sent") {
        assert!(started.elapsed() < Duration::from_secs(600), "the resync never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    c.wait_shipped();
    let line = c.log("agent-vm1").lines().find(|l| l.contains("resync of")).unwrap_or_default().to_owned();
    println!(
        "BENCH resync bytes=536870912 seconds={:.2} mb_per_s={:.0} ({line})",
        took.as_secs_f64(),
        536_870_912.0 / took.as_secs_f64() / 1e6
    );
}

#[test]
#[ignore = "benchmark: scripts/bench.sh link"]
fn bench_initial_sync_compare_rate() {
    // A 1 GiB disk of random data, replicated once (its initial sync sends every region);
    // then its map is deleted and the agent restarted: the second initial sync compares 1024
    // regions that are all equal and sends nothing. The rate is the compared bytes per second.
    const SIZE: u64 = 1 << 30;
    let mut c = Cluster::prepare(&[Vol::new("vm1", "data", SIZE)], "", "");
    {
        use std::io::Write;
        let mut rng = seeded_rng();
        let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().write(true).open(c.disk("data")).unwrap());
        for _ in 0..SIZE >> 20 {
            f.write_all(&random_bytes(&mut rng, 1 << 20)).unwrap();
        }
        f.flush().unwrap();
    }
    c.launch();
    c.start_agents();
    let done = "initial sync compared 1024 region(s)";
    let started = Instant::now();
    while !c.log("agent-vm1").contains(done) {
        assert!(started.elapsed() < Duration::from_secs(900), "the first initial sync never completed");
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_shipped();
    c.kill_agent("vm1");
    let mut map = c.disk("data").into_os_string();
    map.push(".hsmap");
    std::fs::remove_file(map).unwrap();
    // Neither the source's nor the replica's pages cached: both sides read from the disk.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let started = Instant::now();
    c.start_agent("vm1");
    while c.log("agent-vm1").matches(done).count() < 2 {
        assert!(started.elapsed() < Duration::from_secs(900), "the second initial sync never completed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = started.elapsed();
    let line = c.log("agent-vm1").lines().filter(|l| l.contains(done)).nth(1).unwrap_or_default().to_owned();
    assert!(line.contains("1024 equal, 0 differ"), "{line}");
    println!(
        "BENCH initial_sync_compare bytes={SIZE} seconds={:.2} mb_per_s={:.0} (from agent start; the agent's own: {line})",
        took.as_secs_f64(),
        SIZE as f64 / took.as_secs_f64() / 1e6
    );
}
