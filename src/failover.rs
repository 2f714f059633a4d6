//! `hindsight failover`: makes the recovery site's copy of a group the production copy at one
//! consistent point (docs/failover.md), or, with `--test`, serves that point writable for a
//! test while the group goes on replicating, until `--end-test`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use hindsight_consistency::config::TargetConfig;
use hindsight_consistency::time::{format_rfc3339, now_ns};
use hindsight_consistency::wire::{BookmarkReply, BookmarkRequest, FrameType, PROTOCOL_VERSION};
use hindsight_target::failover::{self, FailoverReport};
use hindsight_target::Point;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::export::{self, ExportArgs};
use crate::failure::Failure;
use crate::point_args::PointArgs;
use crate::progress::human;

/// How long `--end-test` waits for the test's process to stop.
const END_WAIT: Duration = Duration::from_secs(30);

/// `hindsight failover` options.
#[derive(clap::Args, Debug)]
#[command(mut_group("point", |g| g.required(false)))]
pub struct FailoverArgs {
    /// target.toml of the recovery site's target
    #[arg(long)]
    pub config: PathBuf,
    /// Consistency group
    #[arg(long)]
    pub group: String,
    /// The point (none with --planned, which takes the bookmark it places, or --end-test)
    #[command(flatten)]
    pub point: Option<PointArgs>,
    /// A test failover: serve every volume of the group at the point, writable into scratch
    /// overlays, while the group goes on replicating; ends with --end-test (or Ctrl-C)
    #[arg(long, requires = "listen", conflicts_with = "end_test")]
    pub test: bool,
    /// With --test: where to serve (unix:/path/to.sock or tcp:127.0.0.1:10809)
    #[arg(long)]
    pub listen: Option<String>,
    /// End the test failover running for the group and print its report
    #[arg(long)]
    pub end_test: bool,
    /// A planned move (the source site is up): the engine at --engine quiesces the agents,
    /// bookmarks the group and acknowledges no more of its writes; once the target holds the
    /// bookmark, the group fails over to it. No acknowledged write is lost in any mode
    #[arg(long, requires = "engine", conflicts_with_all = ["test", "end_test", "point"])]
    pub planned: bool,
    /// With --planned: the source engine's address, host:port
    #[arg(long)]
    pub engine: Option<String>,
    /// With --planned: the CA certificate (PEM) the engine's certificate must be issued by
    #[arg(long, requires_all = ["engine_cert", "engine_key"])]
    pub engine_ca: Option<PathBuf>,
    /// With --planned: an operator's certificate
    #[arg(long, requires_all = ["engine_ca", "engine_key"])]
    pub engine_cert: Option<PathBuf>,
    /// With --planned: the private key of --engine-cert
    #[arg(long, requires_all = ["engine_ca", "engine_cert"])]
    pub engine_key: Option<PathBuf>,
    /// With --planned: the name the engine's certificate must be valid for (default: the host
    /// of --engine)
    #[arg(long)]
    pub engine_server_name: Option<String>,
    /// With --planned and an engine on loopback: no TLS (the engine has tls.insecure_plaintext)
    #[arg(long, conflicts_with_all = ["engine_ca", "engine_cert", "engine_key"])]
    pub insecure_plaintext: bool,
    /// With --planned: do not quiesce the agents' file systems around the bookmark (the point
    /// is then crash-consistent)
    #[arg(long)]
    pub no_quiesce: bool,
    /// How long to wait for the target daemon to release the group
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

impl FailoverArgs {
    fn point(&self) -> Result<&PointArgs, Failure> {
        self.point.as_ref().ok_or_else(|| Failure::Config("give the point: --latest, --seq N, --time T or --bookmark NAME".into()))
    }
}

/// `failover-test.toml`: the test failover running now.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TestRecord {
    pid: u32,
    started_ns: u64,
    listen: String,
    seq: u64,
    time_ns: u64,
    consistency: String,
    volumes: Vec<String>,
    /// From the command to the volumes served.
    ready_ms: u64,
}

/// A finished test failover, kept in `failover-tests/<started_ns>.toml`.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct TestReport {
    group: String,
    started: String,
    ended: String,
    seq: u64,
    time: String,
    consistency: String,
    volumes: Vec<String>,
    listen: String,
    ready_ms: u64,
    took_s: u64,
}

pub fn run(args: &FailoverArgs) -> Result<(), Failure> {
    let cfg = TargetConfig::load(&args.config).map_err(|e| Failure::Config(e.to_string()))?;
    if args.end_test {
        return end_test(&cfg, &args.group, args.json);
    }
    if args.planned {
        return run_planned(args, &cfg);
    }
    let point = args.point()?;
    if args.test {
        return run_test(args, &cfg, point);
    }
    let at = point.resolve(&cfg, &args.group)?;
    crate::init_logging();
    let r = failover::failover(&cfg, &args.group, &at, args.wait)?;
    print_report(&r, args.json, None);
    Ok(())
}

/// What a planned move adds to the report.
struct Planned {
    bookmark: String,
    /// From the command to the target holding the bookmark.
    drained: Duration,
    consistency: String,
}

/// A planned move: the engine hands the group over after a bookmark; the target drains to it
/// and fails over there.
fn run_planned(args: &FailoverArgs, cfg: &TargetConfig) -> Result<(), Failure> {
    let at = crate::admin::EngineAt {
        config: None,
        engine: args.engine.clone(),
        ca: args.engine_ca.clone(),
        cert: args.engine_cert.clone(),
        key: args.engine_key.clone(),
        server_name: args.engine_server_name.clone(),
        insecure_plaintext: args.insecure_plaintext,
    };
    let to = at.resolve().map_err(|e| Failure::Config(e.to_string()))?;
    // The group must be here before the engine is asked to hand it over.
    hindsight_target::history(cfg, &args.group)?;
    crate::init_logging();
    let started = Instant::now();
    let bookmark = format!("planned-failover-{}", now_ns() / 1_000_000_000);
    let req = BookmarkRequest {
        protocol: PROTOCOL_VERSION,
        name: bookmark.clone(),
        groups: vec![args.group.clone()],
        note: "planned failover: the engine acknowledges nothing after this point".into(),
        quiesce: !args.no_quiesce,
        quiesce_timeout_ms: 10_000,
        hold: true,
    };
    let reply: BookmarkReply = crate::admin::request(&to, FrameType::BookmarkRequest, FrameType::BookmarkReply, &req)
        .context("ask the engine to hand the group over")?;
    let point = reply.points.iter().find(|p| p.group == args.group).ok_or_else(|| anyhow::anyhow!("the engine placed no bookmark"))?;
    log::info!(
        "planned failover of group {}: bookmark {bookmark} at seq {} ({}); waiting for the target to hold it",
        args.group,
        point.seq,
        point.consistency
    );
    let deadline = Instant::now() + args.wait;
    loop {
        let h = hindsight_target::history(cfg, &args.group)?;
        if h.last_seq >= point.seq {
            break;
        }
        if Instant::now() >= deadline {
            return Err(anyhow::anyhow!(
                "group {}: the target holds seq {} but the handed-over bookmark is seq {}: the engine did not ship it within {:?}; \
                 the engine holds the group's writes until it is restarted; run this again, or fail over without --planned",
                args.group,
                h.last_seq,
                point.seq,
                args.wait
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained = started.elapsed();
    let r = failover::failover(cfg, &args.group, &Point::Seq(point.seq), args.wait)?;
    if r.last_seq != point.seq {
        log::warn!("group {}: the target held records after the bookmark (to seq {}); they were undone", args.group, r.last_seq);
    }
    let planned = Planned { bookmark, drained, consistency: point.consistency.clone() };
    print_report(&FailoverReport { took: started.elapsed(), ..r }, args.json, Some(&planned));
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn print_report(r: &FailoverReport, json: bool, planned: Option<&Planned>) {
    if json {
        let volumes: Vec<_> =
            r.volumes.iter().map(|(v, p)| serde_json::json!({"name": v.name, "vm": v.vm, "size": v.size, "path": p})).collect();
        let doc = serde_json::json!({
            "group": r.group, "epoch": r.epoch, "seq": r.seq, "time": format_rfc3339(r.time_ns), "consistency": r.consistency,
            "last_seq": r.last_seq, "undone_bytes": r.undone_bytes, "release_ms": millis(r.release_took),
            "took_ms": millis(r.took), "volumes": volumes,
        });
        let mut doc = doc;
        if let Some(p) = planned {
            doc["planned"] = serde_json::json!({"bookmark": p.bookmark, "drained_ms": millis(p.drained), "consistency": p.consistency});
        }
        println!("{doc}");
        return;
    }
    if let Some(p) = planned {
        println!(
            "planned failover: bookmark {} ({}); the target held it {:.2} s after the command: every write the engine acknowledged is in it",
            p.bookmark,
            p.consistency,
            p.drained.as_secs_f64()
        );
    }
    println!(
        "group {} failed over to seq {} ({}, {}) in {:.2} s (released in {:.2} s); epoch {}: the target takes nothing more of it \
         from the old engine",
        r.group,
        r.seq,
        format_rfc3339(r.time_ns),
        r.consistency,
        r.took.as_secs_f64(),
        r.release_took.as_secs_f64(),
        r.epoch
    );
    if r.seq < r.last_seq {
        println!("  the records after it (seq {} to {}) were undone: {} written back", r.seq + 1, r.last_seq, human(r.undone_bytes));
    }
    println!("production volumes (attach them to the VMs, or serve them with hindsight-agent: docs/operations.md#failover):");
    for (v, p) in &r.volumes {
        println!("  {}  volume {} (vm {}, {})", p.display(), v.name, v.vm, human(v.size));
    }
}

/// Whether process `pid` runs (a zombie, ended but not yet reaped, does not).
fn alive(pid: u32) -> bool {
    let exists = i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok());
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state == 'Z');
    exists && !zombie
}

fn read_record(path: &Path) -> Result<Option<TestRecord>, Failure> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(toml::from_str(&text).map_err(|e| Failure::Config(format!("{}: {e}", path.display())))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("read {}: {e}", path.display()).into()),
    }
}

fn run_test(args: &FailoverArgs, cfg: &TargetConfig, point: &PointArgs) -> Result<(), Failure> {
    let record = failover::test_record(cfg, &args.group);
    if let Some(r) = read_record(&record)? {
        if alive(r.pid) {
            return Err(Failure::Config(format!(
                "a test failover of group {:?} runs already (pid {}, since {}, on {}); end it with hindsight failover --end-test",
                args.group,
                r.pid,
                format_rfc3339(r.started_ns),
                r.listen
            )));
        }
        let _ = std::fs::remove_file(&record);
    }
    let started = Instant::now();
    let started_ns = now_ns();
    let export_args = ExportArgs {
        config: args.config.clone(),
        group: args.group.clone(),
        volume: None,
        vm: None,
        all: true,
        point: point.clone(),
        listen: args.listen.clone().expect("clap requires --listen with --test"),
        writable: true,
        overlay: None,
    };
    let mut running: Option<TestRecord> = None;
    export::run_with(&export_args, |view, listen| {
        let r = TestRecord {
            pid: std::process::id(),
            started_ns,
            listen: listen.to_owned(),
            seq: view.seq(),
            time_ns: view.time_ns(),
            consistency: view.consistency().to_owned(),
            volumes: view.volumes().map(|v| v.name.clone()).collect(),
            ready_ms: millis(started.elapsed()),
        };
        let text = toml::to_string(&r).expect("a test record serializes");
        std::fs::write(&record, text).with_context(|| format!("write {}", record.display()))?;
        log::info!(
            "test failover of group {} at seq {}: ready in {} ms; end it with hindsight failover --end-test",
            args.group,
            r.seq,
            r.ready_ms
        );
        running = Some(r);
        Ok(())
    })?;
    let Some(r) = running else { return Ok(()) };
    let report = TestReport {
        group: args.group.clone(),
        started: format_rfc3339(started_ns),
        ended: format_rfc3339(now_ns()),
        seq: r.seq,
        time: format_rfc3339(r.time_ns),
        consistency: r.consistency,
        volumes: r.volumes,
        listen: r.listen,
        ready_ms: r.ready_ms,
        took_s: started.elapsed().as_secs(),
    };
    let dir = failover::test_reports(cfg, &args.group);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("{started_ns}.toml"));
    std::fs::write(&path, toml::to_string(&report).expect("a report serializes")).with_context(|| format!("write {}", path.display()))?;
    std::fs::remove_file(&record).with_context(|| format!("remove {}", record.display()))?;
    log::info!("test failover of group {} ended; report in {}", args.group, path.display());
    Ok(())
}

fn end_test(cfg: &TargetConfig, group: &str, json: bool) -> Result<(), Failure> {
    let record = failover::test_record(cfg, group);
    let Some(r) = read_record(&record)? else {
        return Err(Failure::Config(format!("no test failover of group {group:?} is running (no {})", record.display())));
    };
    if alive(r.pid) {
        kill(Pid::from_raw(i32::try_from(r.pid).unwrap_or(i32::MAX)), Signal::SIGTERM).context("signal the test failover")?;
        let since = Instant::now();
        // It removes its record when it has written its report.
        while record.exists() && alive(r.pid) {
            if since.elapsed() > END_WAIT {
                return Err(anyhow::anyhow!("the test failover (pid {}) has not ended within {END_WAIT:?}", r.pid).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let report = failover::test_reports(cfg, group).join(format!("{}.toml", r.started_ns));
    let text = match std::fs::read_to_string(&report) {
        Ok(t) => t,
        Err(_) => {
            let _ = std::fs::remove_file(&record);
            return Err(anyhow::anyhow!(
                "the test failover of group {group:?} (pid {}) ended without its report: it was killed; its scratch overlays are gone with it",
                r.pid
            )
            .into());
        }
    };
    let rep: TestReport = toml::from_str(&text).map_err(|e| Failure::Config(format!("{}: {e}", report.display())))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({
                "group": rep.group, "started": rep.started, "ended": rep.ended, "seq": rep.seq, "time": rep.time,
                "consistency": rep.consistency, "volumes": rep.volumes, "listen": rep.listen, "ready_ms": rep.ready_ms, "took_s": rep.took_s,
            }))?
        );
    } else {
        println!(
            "test failover of group {} ended: seq {} ({}, {}) served on {} from {} to {} ({} s; ready {} ms after the command); \
             volumes {}; nothing of it remains in the history (report: {})",
            rep.group,
            rep.seq,
            rep.time,
            rep.consistency,
            rep.listen,
            rep.started,
            rep.ended,
            rep.took_s,
            rep.ready_ms,
            rep.volumes.join(", "),
            report.display()
        );
    }
    Ok(())
}
