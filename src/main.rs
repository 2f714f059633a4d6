//! `hindsight`: runs the engine and the target daemons, and recovers volumes at any point in
//! time from a target's data.

mod admin;
mod certs;
mod export;
mod failback;
mod failover;
mod failure;
mod history;
mod overlay;
mod point_args;
mod progress;
mod signals;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use hindsight_consistency::config::{EngineConfig, TargetConfig};
use hindsight_consistency::time::format_rfc3339;
use hindsight_consistency::transport::Role;
use hindsight_consistency::wire::{
    BookmarkReply, BookmarkRequest, FrameType, SetModeReply, SetModeRequest, StatusReply, StatusRequest, PROTOCOL_VERSION,
};
use hindsight_target::failover::Stage;
use hindsight_target::{RecoverRequest, RecoverSetRequest, Selection};

use failure::Failure;

#[derive(Parser)]
#[command(name = "hindsight", version, about = "Block-level replication and continuous data protection")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the replication engine (agents connect to it; it ships to the targets).
    Engine {
        /// engine.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the target writer at the recovery site.
    Target {
        /// target.toml
        #[arg(long)]
        config: PathBuf,
    },
    /// Write raw images of a volume, of every volume of a VM, or of the whole group, as they
    /// were at one point in time.
    #[command(group(ArgGroup::new("what").required(true).args(["volume", "vm", "all"])))]
    Recover {
        /// target.toml of the target holding the data
        #[arg(long)]
        config: PathBuf,
        /// Consistency group
        #[arg(long)]
        group: String,
        /// One volume (written to --out)
        #[arg(long, requires = "out")]
        volume: Option<String>,
        /// Every volume of this VM (written to --out-dir with a manifest)
        #[arg(long, requires = "out_dir")]
        vm: Option<String>,
        /// Every volume of the group (written to --out-dir with a manifest)
        #[arg(long, requires = "out_dir")]
        all: bool,
        #[command(flatten)]
        point: point_args::PointArgs,
        /// The raw image to write (with --volume)
        #[arg(long, conflicts_with = "out_dir")]
        out: Option<PathBuf>,
        /// A new or empty directory for the images and manifest.json (with --vm or --all)
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Place a named bookmark in one or more groups at the same instant (asks the running
    /// engine).
    #[command(group(ArgGroup::new("which").required(true).args(["group", "groups", "all_groups"])))]
    #[command(group(ArgGroup::new("where").required(true).args(["config", "engine"])))]
    Bookmark {
        #[command(flatten)]
        at: admin::EngineAt,
        /// One group
        #[arg(long)]
        group: Option<String>,
        /// Several groups, comma separated: one bookmark in each, at the same instant
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Every group of the engine
        #[arg(long)]
        all_groups: bool,
        /// A note kept with the bookmark
        #[arg(long, default_value = "")]
        note: String,
        /// Quiesce every agent of the groups first (fsfreeze or the agents' pre_quiesce
        /// scripts) for an application-consistent point; thawed right after
        #[arg(long)]
        quiesce: bool,
        /// How long agents may take to quiesce; past it everything is thawed and the
        /// bookmark is recorded as crash-consistent, with the reason
        #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
        quiesce_timeout: std::time::Duration,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// The bookmark's name (letters, digits, '.', '_', '-')
        name: String,
    },
    /// Show each group's replication state on the running engine: the mode (and the mode in
    /// force while a sync group is degraded), the target's lag and the RPO. With a target.toml
    /// as --config, the recovery site's view instead: each group's window, replicas, journal
    /// and running exports (as `history`).
    #[command(group(ArgGroup::new("where").required(true).args(["config", "engine"])))]
    Status {
        #[command(flatten)]
        at: admin::EngineAt,
        /// One group (default: all)
        #[arg(long)]
        group: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Print it again every SECS seconds (follow a resync or an initial sync) until
        /// interrupted, or `--count` times
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
        /// With --watch: stop after this many reports
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
    /// Change a group on the running engine.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Serve volumes of a group as they were at one point over NBD, at once (nothing is
    /// copied first), while the group goes on replicating; stop with Ctrl-C or SIGTERM.
    Export(export::ExportArgs),
    /// Make the recovery site's copy of a group the production copy at one consistent point
    /// (docs/failover.md); with --test, serve that point writable while replication goes on.
    Failover(failover::FailoverArgs),
    /// After a failover: bring production back to the original site, shipping only what
    /// differs (docs/operations.md, "Failback").
    Failback {
        #[command(subcommand)]
        command: failback::FailbackCommand,
    },
    /// Make a CA and the certificates of agents, engines, targets and operators
    /// (docs/security.md).
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// Show the recoverable window of a group (or of every group).
    History {
        /// target.toml
        #[arg(long)]
        config: PathBuf,
        /// Consistency group (default: all)
        #[arg(long)]
        group: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
        /// Also estimate, from the rates measured now, how much of its span each retention
        /// tier covers within journal_size
        #[arg(long)]
        estimate: bool,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Set a group's replication mode (sync, cdp or async) without stopping it; no write is
    /// lost or reordered. Lasts until the engine restarts.
    #[command(group(ArgGroup::new("where").required(true).args(["config", "engine"])))]
    SetMode {
        #[command(flatten)]
        at: admin::EngineAt,
        /// The group
        #[arg(long)]
        group: String,
        /// sync, cdp or async
        mode: String,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Create a CA in DIR: ca.pem (every daemon's tls.ca) and ca-key.pem (signs certificates).
    Init {
        /// Where the CA goes (created if missing; an existing CA is never replaced)
        #[arg(long)]
        dir: PathBuf,
        /// Days the CA is valid
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a key and a certificate signed by the CA in DIR, written as
    /// `DIR/<role>-<name>.pem` and `DIR/<role>-<name>-key.pem`.
    Issue {
        /// The CA's directory (from `certs init`)
        #[arg(long)]
        dir: PathBuf,
        /// agent, engine, target or operator
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// The name: for an agent its VM (agent.vm); for an engine or a target the name peers
        /// know it by (tls.engines of a target lists engine names)
        #[arg(long)]
        name: String,
        /// A DNS name or IP address clients reach this server by (repeat, or separate with
        /// commas); clients check it by default
        #[arg(long = "host", value_delimiter = ',')]
        hosts: Vec<String>,
        /// Days the certificate is valid
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// The end of validity (RFC 3339) instead of --days; a time in the past gives a
        /// certificate that has already expired (to test that peers refuse it)
        #[arg(long)]
        not_after: Option<String>,
        /// Write the files there instead of DIR
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Replace existing files of the same identity (rotation)
        #[arg(long)]
        force: bool,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role; use agent, engine, target or operator"))
}

pub(crate) fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp_millis().init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Engine { config } => {
            let cfg = EngineConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            init_logging();
            hindsight_consistency::open_files::raise_limit();
            signals::stop_on_signals("engine")?;
            hindsight_engine::run(cfg)?;
        }
        Command::Target { config } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            init_logging();
            hindsight_consistency::open_files::raise_limit();
            signals::stop_on_signals("target")?;
            hindsight_target::run(cfg)?;
        }
        Command::Recover { config, group, volume, vm, all, point, out, out_dir, json } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            let point = point.resolve(&cfg, &group)?;
            match (volume, out, out_dir) {
                (Some(volume), Some(out), _) => {
                    let mut progress = progress::Progress::new(&format!("recover {volume}"));
                    let req = RecoverRequest { group: group.clone(), volume, point, out: out.clone() };
                    let report = hindsight_target::recover_with(&cfg, &req, &mut |done, total| progress.update(done, total))?;
                    let took = progress.finish();
                    let consistency = &report.consistency;
                    if json {
                        let v = serde_json::json!({
                            "group": report.group, "volume": report.volume, "seq": report.seq,
                            "time": format_rfc3339(report.time_ns), "time_ns": report.time_ns, "consistency": consistency,
                            "records_applied": report.records_applied, "bytes": report.bytes, "out": out,
                        });
                        println!("{v}");
                    } else {
                        let rate = report.bytes as f64 / took.as_secs_f64().max(1e-3);
                        println!(
                            "recovered volume {} of group {} at seq {} ({}, {consistency}): {} ({} bytes, {} journal records of \
                             the volume; {:.1}s, {}/s)",
                            report.volume,
                            report.group,
                            report.seq,
                            format_rfc3339(report.time_ns),
                            out.display(),
                            report.bytes,
                            report.records_applied,
                            took.as_secs_f64(),
                            progress::human_f64(rate)
                        );
                    }
                }
                (None, _, Some(out_dir)) => {
                    let selection = match vm {
                        Some(vm) => Selection::Vm(vm),
                        None if all => Selection::All,
                        None => return Err(Failure::Config("give --volume, --vm or --all".into())),
                    };
                    let m = hindsight_target::recover_set(&cfg, &RecoverSetRequest { group, selection, point, out_dir: out_dir.clone() })?;
                    if json {
                        println!("{}", serde_json::to_string(&m)?);
                    } else {
                        let what = m.vm.as_ref().map_or_else(|| format!("group {}", m.group), |vm| format!("vm {vm} of group {}", m.group));
                        println!("recovered {what} at seq {} ({}), {}, into {}:", m.seq, m.time, m.consistency, out_dir.display());
                        for v in &m.volumes {
                            println!("  {}  volume {} (vm {}, {} bytes)", v.file, v.name, v.vm, v.size);
                        }
                    }
                }
                _ => return Err(Failure::Config("--volume needs --out FILE; --vm and --all need --out-dir DIR".into())),
            }
        }
        Command::Export(args) => export::run(&args)?,
        Command::Failover(args) => failover::run(&args)?,
        Command::Failback { command } => failback::run(&command)?,
        Command::Certs { action } => match action {
            CertsAction::Init { dir, days } => print!("{}", certs::init(&dir, days)?),
            CertsAction::Issue { dir, role, name, hosts, days, not_after, out_dir, force } => {
                let req = certs::IssueRequest { dir, out_dir, role, name, hosts, days, not_after, force };
                print!("{}", certs::issue(&req)?);
            }
        },
        Command::Bookmark { at, group, groups, all_groups, note, quiesce, quiesce_timeout, json, name } => {
            let to = at.resolve().map_err(|e| Failure::Config(e.to_string()))?;
            let groups = match (group, all_groups) {
                (Some(g), _) => vec![g],
                (None, true) => Vec::new(),
                (None, false) => groups,
            };
            let quiesce_timeout_ms = u64::try_from(quiesce_timeout.as_millis()).unwrap_or(u64::MAX);
            let req =
                BookmarkRequest { protocol: PROTOCOL_VERSION, name: name.clone(), groups, note, quiesce, quiesce_timeout_ms, hold: false };
            let reply: BookmarkReply = admin::request(&to, FrameType::BookmarkRequest, FrameType::BookmarkReply, &req)?;
            if json {
                let v: Vec<_> = reply
                    .points
                    .iter()
                    .map(|p| {
                        serde_json::json!({"group": p.group, "bookmark": name, "seq": p.seq, "time": format_rfc3339(p.time_ns),
                            "time_ns": p.time_ns, "consistency": p.consistency, "reason": p.reason})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for p in &reply.points {
                    let why = if p.reason.is_empty() { String::new() } else { format!(" ({})", p.reason) };
                    println!(
                        "bookmark {name:?} placed in group {} at seq {} ({}), {}{why}",
                        p.group,
                        p.seq,
                        format_rfc3339(p.time_ns),
                        p.consistency
                    );
                }
            }
        }
        Command::Status { at, group, json, watch, count } => {
            // At the recovery site, with its target.toml: each group's window, replicas,
            // journal and running exports, as `history` gives them.
            let target = at.config.as_deref().filter(|p| is_target_config(p)).map(TargetConfig::load).transpose();
            let target = target.map_err(|e| Failure::Config(e.to_string()))?;
            let to = match &target {
                Some(_) => None,
                None => Some(at.resolve().map_err(|e| Failure::Config(e.to_string()))?),
            };
            let req = StatusRequest { protocol: PROTOCOL_VERSION, groups: group.clone().into_iter().collect() };
            let mut reports = 0u64;
            // Watching an engine on a terminal: resyncs as progress bars below the text.
            let mut bars = (watch.is_some() && !json && to.is_some()).then(watch::ResyncBars::on_terminal).flatten();
            loop {
                if watch.is_some() && !json {
                    let line = format!("-- {}", format_rfc3339(hindsight_consistency::time::now_ns()));
                    match &bars {
                        Some(b) => b.print(&line),
                        None => println!("{line}"),
                    }
                }
                match (&target, &to) {
                    (Some(cfg), _) => print_history(cfg, group.clone(), json, false)?,
                    (None, Some(to)) => {
                        let reply: StatusReply = admin::request(to, FrameType::StatusRequest, FrameType::StatusReply, &req)?;
                        match (&mut bars, json) {
                            (_, true) => println!("{}", serde_json::to_string_pretty(&reply)?),
                            (Some(b), false) => {
                                b.print(&admin::format_status(&reply));
                                b.update(&reply);
                            }
                            (None, false) => print!("{}", admin::format_status(&reply)),
                        }
                    }
                    (None, None) => unreachable!("an engine address is resolved when no target config is given"),
                }
                reports += 1;
                match watch {
                    Some(secs) if count.is_none_or(|c| reports < c) => {
                        std::io::Write::flush(&mut std::io::stdout())?;
                        std::thread::sleep(std::time::Duration::from_secs(secs.max(1)));
                    }
                    _ => break,
                }
            }
        }
        Command::Group { command: GroupCommand::SetMode { at, group, mode } } => {
            let to = at.resolve().map_err(|e| Failure::Config(e.to_string()))?;
            let req = SetModeRequest { protocol: PROTOCOL_VERSION, group, mode };
            let reply: SetModeReply = admin::request(&to, FrameType::SetModeRequest, FrameType::SetModeReply, &req)?;
            println!(
                "group {}: mode {} (was {}); lasts until the engine restarts: set mode in engine.toml to keep it",
                reply.group, reply.mode, reply.previous
            );
        }
        Command::History { config, group, json, estimate } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            print_history(&cfg, group, json, estimate)?;
        }
    }
    Ok(())
}

/// Prints the history of one group, or of every group, of a target (`history`, and `status`
/// at the recovery site).
fn print_history(cfg: &TargetConfig, group: Option<String>, json: bool, estimate: bool) -> Result<(), Failure> {
    let names = match group {
        Some(g) => vec![g],
        None => hindsight_target::groups(cfg)?,
    };
    let mut all = Vec::new();
    for g in &names {
        all.push(hindsight_target::history(cfg, g)?);
    }
    if json {
        let mut values = Vec::new();
        for h in &all {
            let mut v = serde_json::to_value(h)?;
            v["first_time"] = format_rfc3339(h.first_time_ns).into();
            v["last_time"] = format_rfc3339(h.last_time_ns).into();
            for (i, b) in h.bookmarks.iter().enumerate() {
                v["bookmarks"][i]["time"] = format_rfc3339(b.time_ns).into();
            }
            let state = hindsight_target::failover::state_of(cfg, &h.group)?;
            v["production"] =
                if state.as_ref().is_some_and(|s| s.state == Stage::FailedOver) { "recovery site" } else { "source site" }.into();
            v["failover"] = serde_json::to_value(&state)?;
            if estimate {
                v["estimate"] = serde_json::to_value(history::estimate(h))?;
            }
            values.push(v);
        }
        let v = if values.len() == 1 { values.remove(0) } else { serde_json::Value::Array(values) };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for h in &all {
            print!("{}", history::format_history(h));
            if estimate && !h.tiers.is_empty() {
                print!("{}", history::format_estimate(h, &history::estimate(h)));
            }
            print!("{}", history::format_role(cfg, &h.group, hindsight_target::failover::state_of(cfg, &h.group)?.as_ref()));
        }
        if all.is_empty() {
            println!("no groups have been replicated to {} yet", cfg.data_dir.display());
        }
    }
    Ok(())
}

/// True if `path` is a target's configuration (it has a `[target]` section).
fn is_target_config(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml::Table>().ok()).is_some_and(|t| t.contains_key("target"))
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    hindsight_consistency::config::parse_duration(s).map_err(|e| e.to_string())
}
