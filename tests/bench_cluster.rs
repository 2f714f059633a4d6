//! Benchmarks of engine clusters (`scripts/bench.sh cluster`; ignored in the test suite):
//! three engines, a three-member etcd and one sync group written by its agent. Each round
//! kills the group's owner (kill -9) and times one 4 KiB write issued at once: it waits for
//! the lease to expire, the claim, the target hello and the agent's reconnection (the
//! takeover as the guest sees it). The killed engine is started again; the group prefers it,
//! so it is handed back by a planned handover while a writer issues one 4 KiB write after
//! another: the longest of them is the pause. HS_BENCH_TAKEOVERS rounds (default 20),
//! HS_BENCH_LEASE_TTL (default "5s", the product's default).
//!
//! Then six cdp groups (one VM and one 256 MiB volume each) are written at once by fio (1 MiB
//! sequential writes, QD8 per volume, HS_BENCH_RUNTIME seconds, default 10) with one engine
//! owning all six, and again with three engines owning two each: the aggregate rate, and each
//! engine's CPU seconds per GB of guest writes. Each result line starts with BENCH.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{cpu_seconds, fio_json, preferred_engine, run_ok, Options, Site, Vol, ENGINES};

const SIZE: u64 = 64 << 20;

/// One 4 KiB write through the agent, timed (a qemu-io process: its start is in the figure).
fn one_write(site: &Site, n: u64) -> Duration {
    let off = (n * 4096) % SIZE;
    let t = Instant::now();
    run_ok(Command::new("qemu-io").args(["-f", "raw", &site.c.uri("db"), "-c", &format!("write -P {} {off} 4096", n % 250 + 1)]));
    t.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh cluster"]
fn takeover_and_handover_times() {
    let rounds: usize = std::env::var("HS_BENCH_TAKEOVERS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let ttl = std::env::var("HS_BENCH_LEASE_TTL").unwrap_or_else(|_| "5s".into());
    let vols = [Vol::in_group("erp", "vm1", "db", SIZE)];
    let options = Options { etcd_members: 3, engine_timeout: "60s".into(), lease_ttl: ttl.clone(), ..Options::default() };
    let mut site = Site::start_with(&vols, &ENGINES, &options);
    site.owner("erp", Duration::from_secs(30));
    site.c.start_agents();
    let mut n = 0;
    let mut base: Vec<Duration> = (0..20)
        .map(|_| {
            n += 1;
            one_write(&site, n)
        })
        .collect();
    let (mut takeovers, mut pauses) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (victim, _) = site.owner("erp", Duration::from_secs(60));
        drop(site.engines.remove(victim.as_str()));
        n += 1;
        let took = one_write(&site, n);
        let (owner, token) = site.owner("erp", Duration::from_secs(60));
        let name = ENGINES.iter().copied().find(|e| *e == victim).expect("one of the engines");
        site.start_engine(name);
        // Handed back to the engine the group prefers (if it is the one that came back),
        // while a writer goes on.
        let preferred = preferred_engine("erp");
        let start = Instant::now();
        let mut longest = Duration::ZERO;
        while start.elapsed() < Duration::from_secs(30) {
            n += 1;
            longest = longest.max(one_write(&site, n));
            if site.owner("erp", Duration::from_secs(60)).0 == preferred && start.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        eprintln!("round {round}: {victim} killed, {owner} took over (token {token}) in {took:.2?}; handed to {preferred}, longest write {longest:.2?}");
        takeovers.push(took);
        pauses.push(longest);
    }
    let worst_takeover = *takeovers.iter().max().unwrap();
    let worst_pause = *pauses.iter().max().unwrap();
    println!("BENCH cluster lease_ttl={ttl} rounds={rounds}");
    println!("BENCH cluster write_4k_median_ms={:.1}", median(&mut base).as_secs_f64() * 1e3);
    println!(
        "BENCH cluster takeover_median_s={:.2} takeover_worst_s={:.2}",
        median(&mut takeovers).as_secs_f64(),
        worst_takeover.as_secs_f64()
    );
    println!(
        "BENCH cluster handover_pause_median_ms={:.0} handover_pause_worst_ms={:.0}",
        median(&mut pauses).as_secs_f64() * 1e3,
        worst_pause.as_secs_f64() * 1e3
    );
}

#[test]
#[ignore = "a benchmark: scripts/bench.sh cluster"]
fn throughput_of_one_engine_against_three_sharing_six_groups() {
    let secs: u64 = std::env::var("HS_BENCH_RUNTIME").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    const VOLUME: u64 = 256 << 20;
    let names: Vec<(String, String, String)> = (0..6).map(|i| (format!("g{i}"), format!("vm{i}"), format!("v{i}"))).collect();
    let vols: Vec<Vol> = names.iter().map(|(g, vm, v)| Vol::in_group(g, vm, v, VOLUME)).collect();
    for running in [&ENGINES[..1], &ENGINES[..]] {
        let options = Options { engine_timeout: "60s".into(), lease_ttl: "5s".into(), mode: "cdp".into(), ..Options::default() };
        let mut site = Site::start_with(&vols, running, &options);
        for (g, _, _) in &names {
            let want = if running.len() == 1 { ENGINES[0] } else { preferred_engine(g) };
            let start = Instant::now();
            while site.owner(g, Duration::from_secs(60)).0 != want {
                assert!(start.elapsed() < Duration::from_secs(60), "group {g} never moved to {want}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        site.c.start_agents();
        let pids: Vec<(&str, u32)> = running.iter().map(|e| (*e, site.engines[e].0.id())).collect();
        let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
        let mut args = vec!["--ioengine=nbd".to_string(), "--rw=write".into(), "--bs=1m".into(), "--iodepth=8".into()];
        args.extend([format!("--runtime={secs}"), "--time_based".into(), "--group_reporting".into(), format!("--size={VOLUME}")]);
        for (_, _, v) in &names {
            args.push(format!("--name={v}"));
            args.push(format!("--uri={}", site.c.uri(v)));
        }
        let report = fio_json(&args);
        let bytes = report["jobs"][0]["write"]["io_bytes"].as_u64().expect("fio's bytes written");
        let gb = bytes as f64 / 1e9;
        let per_engine: Vec<String> =
            pids.iter().zip(&before).map(|((name, pid), b)| format!("{name}={:.2}", (cpu_seconds(*pid) - b) / gb)).collect();
        let owners: Vec<String> = names.iter().map(|(g, _, _)| format!("{g}:{}", site.owner(g, Duration::from_secs(10)).0)).collect();
        println!(
            "BENCH cluster engines={} groups=6 mb_per_s={:.0} cpu_s_per_gb {} owners {}",
            running.len(),
            bytes as f64 / 1e6 / secs as f64,
            per_engine.join(" "),
            owners.join(" ")
        );
    }
}
