//! Benchmarks of failover and failback (`scripts/bench.sh failover`; ignored in the test
//! suite). For each volume size (HS_BENCH_FAILOVER_SIZES, default "1G 16G"), on this machine:
//! a group of one volume is written through its agent (64 KiB random writes, 256 MiB in all),
//! then
//! - failover to the latest point after the source is killed: from the command to the first
//!   4 KiB read of the promoted volume, beside `recover --latest` of the same volume (the
//!   only way to a volume before failover existed);
//! - failover to a point 64 MiB of writes back: the time, and the bytes written back;
//! - a planned move while a writer runs at 4 KiB QD1: the time, and the drain;
//! - failback after the recovery site wrote 32 MiB: the bytes shipped against the bytes that
//!   differ (in pieces of 64 KiB), and the time of the reverse protection's compare sweep.
//!
//! Each result line starts with BENCH.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{differing_pieces, hindsight_bin, resync_bytes, run_ok, Cluster, Vol};
use rand::SeedableRng;

fn sizes() -> Vec<u64> {
    let text = std::env::var("HS_BENCH_FAILOVER_SIZES").unwrap_or_else(|_| "1G 16G".into());
    text.split_whitespace()
        .map(|s| {
            let (n, unit) = s.split_at(s.len() - 1);
            n.parse::<u64>().unwrap()
                << match unit {
                    "G" => 30,
                    "M" => 20,
                    _ => panic!("{s}: give sizes as 1G, 512M"),
                }
        })
        .collect()
}

fn human(size: u64) -> String {
    if size >= 1 << 30 {
        format!("{}GiB", size >> 30)
    } else {
        format!("{}MiB", size >> 20)
    }
}

/// A cluster of one volume of `size`, with `mb` MiB of 64 KiB random writes through its agent.
fn filled(size: u64, mb: u64) -> Cluster {
    let c = Cluster::start_with(&[Vol::new("vm1", "db", size)], "segment_size = \"64MiB\"\n");
    write_blocks(&c.uri("db"), size, mb, 1);
    c.settle();
    c
}

/// `mb` MiB of 64 KiB writes at random places of a volume of `size` on `uri`.
fn write_blocks(uri: &str, size: u64, mb: u64, seed: u64) {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let writes = mb * 16;
    for chunk in 0..writes.div_ceil(500) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", uri]);
        for _ in 0..500.min(writes - chunk * 500) {
            let off = rng.gen_range(0..size / 65536) * 65536;
            cmd.arg("-c").arg(format!("write -P {} {off} 65536", rng.gen_range(1..=255u8)));
        }
        run_ok(&mut cmd);
    }
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh failover"]
fn failover_and_failback() {
    for size in sizes() {
        let v = human(size);
        // Failover to the latest point, the source lost; recover --latest beside it.
        let mut c = filled(size, 256);
        c.kill_agent("vm1");
        c.kill_engine();
        let out = c.path("recovered.img");
        let t = Instant::now();
        run_ok(
            Command::new(hindsight_bin())
                .args(["recover", "--group", "erp", "--volume", "db", "--latest", "--config"])
                .arg(c.target_toml())
                .arg("--out")
                .arg(&out),
        );
        let recover_s = t.elapsed().as_secs_f64();
        std::fs::remove_file(&out).unwrap();
        let t = Instant::now();
        let r = c.failover_json(&["--latest"]);
        run_ok(Command::new("qemu-io").args(["-f", "raw", "-r"]).arg(c.promoted("db")).args(["-c", "read 0 4096"]));
        let first_read_s = t.elapsed().as_secs_f64();
        println!(
            "BENCH failover-latest volume={v} command_to_first_read_s={first_read_s:.3} failover_took_ms={} recover_latest_s={recover_s:.2} ratio={:.0}",
            r["took_ms"],
            recover_s / first_read_s
        );
        drop(c);

        // Failover to a point 64 MiB of writes back.
        let mut c = filled(size, 256);
        let point = c.settle();
        write_blocks(&c.uri("db"), size, 64, 2);
        c.settle();
        c.kill_agent("vm1");
        c.kill_engine();
        let t = Instant::now();
        let r = c.failover_json(&["--seq", &point.to_string()]);
        println!(
            "BENCH failover-earlier volume={v} took_s={:.3} undone_bytes={} records_after_point={}",
            t.elapsed().as_secs_f64(),
            r["undone_bytes"],
            r["last_seq"].as_u64().unwrap() - point
        );
        // Failback: the recovery site writes 32 MiB, then the original disk is brought equal.
        let mut site = c.serve_promoted();
        write_blocks(&site.uri(&c, "db"), size, 32, 3);
        let differ = differing_pieces(&c.disk("db"), &c.promoted("db"), 64 << 10);
        let t = Instant::now();
        site.fail_back(&c, 1);
        site.wait_disks_equal(&c, Duration::from_secs(1800));
        let sync_s = t.elapsed().as_secs_f64();
        let shipped = resync_bytes(&site.origin.as_ref().unwrap().dir, "erp");
        println!(
            "BENCH failback volume={v} pieces_differ={differ} bytes_differ={} bytes_shipped={shipped} ratio={:.3} reverse_sync_s={sync_s:.1}",
            differ << 16,
            shipped as f64 / (differ << 16) as f64
        );
        drop(site);
        drop(c);

        // A planned move while a writer runs at 4 KiB QD1.
        let c = filled(size, 64);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (stop, uri) = (stop.clone(), c.uri("db"));
            std::thread::spawn(move || {
                let mut child = Command::new("fio")
                    .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k", "--iodepth=1"])
                    .args([&format!("--size={}", 1u64 << 30), "--time_based", "--runtime=600", "--output=/dev/null"])
                    .spawn()
                    .unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            })
        };
        std::thread::sleep(Duration::from_secs(3));
        let args = c.planned_args(c.eport);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = Instant::now();
        let r = c.failover_json(&args);
        let planned_s = t.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        println!(
            "BENCH planned-move volume={v} took_s={planned_s:.3} drained_ms={} failover_ms={}",
            r["planned"]["drained_ms"], r["took_ms"]
        );
    }
}
