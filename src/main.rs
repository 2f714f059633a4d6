//! `hindsight`: runs the engine and the target daemons, and recovers volumes at any point in
//! time from a target's data.

mod certs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Parser, Subcommand};
use hindsight_consistency::config::{EngineConfig, TargetConfig};
use hindsight_consistency::time::{format_rfc3339, parse_rfc3339};
use hindsight_consistency::transport::identity::server_name_of;
use hindsight_consistency::transport::{Role, Security, TlsEndpoint, TlsFiles};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, BookmarkReply, BookmarkRequest, ErrorMessage, FrameType, PROTOCOL_VERSION,
};
use hindsight_target::{Point, RecoverRequest, RecoverSetRequest, Selection};

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
    #[command(group(ArgGroup::new("point").required(true).args(["seq", "time", "bookmark", "latest"])))]
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
        /// The point: after the write with this group sequence number
        #[arg(long)]
        seq: Option<u64>,
        /// The point: every write the engine received at or before this RFC 3339 time
        #[arg(long)]
        time: Option<String>,
        /// The point: the newest bookmark of this name (every write before it)
        #[arg(long)]
        bookmark: Option<String>,
        /// The point: the newest write the target holds
        #[arg(long)]
        latest: bool,
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
        /// engine.toml of the running engine (its listen address is asked)
        #[arg(long)]
        config: Option<PathBuf>,
        /// The engine's address, host:port (instead of --config; e.g. from inside a guest)
        #[arg(long)]
        engine: Option<String>,
        /// With --engine: the CA certificate (PEM) the engine's certificate must be issued by
        #[arg(long, requires_all = ["cert", "key"], conflicts_with = "config")]
        ca: Option<PathBuf>,
        /// With --engine: this client's certificate (an operator's, or an agent's for the
        /// groups of its VM)
        #[arg(long, requires_all = ["ca", "key"])]
        cert: Option<PathBuf>,
        /// With --engine: the private key of --cert
        #[arg(long, requires_all = ["ca", "cert"])]
        key: Option<PathBuf>,
        /// With --engine: the name the engine's certificate must be valid for (default: the
        /// host of --engine)
        #[arg(long, conflicts_with = "config")]
        server_name: Option<String>,
        /// With --engine on loopback: no TLS (the engine has tls.insecure_plaintext = true)
        #[arg(long, conflicts_with_all = ["ca", "cert", "key", "config"])]
        insecure_plaintext: bool,
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
    /// DIR/<role>-<name>.pem and DIR/<role>-<name>-key.pem.
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

fn init_logging() {
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

enum Failure {
    Config(String),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Runtime(e.into())
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Engine { config } => {
            let cfg = EngineConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            init_logging();
            hindsight_engine::run(cfg)?;
        }
        Command::Target { config } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            init_logging();
            hindsight_target::run(cfg)?;
        }
        Command::Recover { config, group, volume, vm, all, seq, time, bookmark, latest, out, out_dir, json } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            let point = match (seq, time, bookmark, latest) {
                (Some(n), ..) => Point::Seq(n),
                (_, Some(t), ..) => Point::Time(parse_rfc3339(&t).map_err(|e| Failure::Config(format!("--time: {e}")))?),
                (_, _, Some(name), _) => {
                    let h = hindsight_target::history(&cfg, &group)?;
                    match h.bookmarks.iter().rev().find(|b| b.name == name) {
                        Some(b) => Point::Seq(b.seq),
                        None => {
                            let known: Vec<&str> = h.bookmarks.iter().map(|b| b.name.as_str()).collect();
                            return Err(Failure::Runtime(anyhow::anyhow!(
                                "group {group:?} has no bookmark {name:?} in its recoverable window; its bookmarks are: {}",
                                if known.is_empty() { "(none)".to_owned() } else { known.join(", ") }
                            )));
                        }
                    }
                }
                _ => Point::Latest,
            };
            match (volume, out, out_dir) {
                (Some(volume), Some(out), _) => {
                    let report =
                        hindsight_target::recover(&cfg, &RecoverRequest { group: group.clone(), volume, point, out: out.clone() })?;
                    let consistency = &report.consistency;
                    if json {
                        let v = serde_json::json!({
                            "group": report.group, "volume": report.volume, "seq": report.seq,
                            "time": format_rfc3339(report.time_ns), "time_ns": report.time_ns, "consistency": consistency,
                            "records_applied": report.records_applied, "bytes": report.bytes, "out": out,
                        });
                        println!("{v}");
                    } else {
                        println!(
                            "recovered volume {} of group {} at seq {} ({}, {consistency}): {} ({} bytes, {} journal records applied)",
                            report.volume,
                            report.group,
                            report.seq,
                            format_rfc3339(report.time_ns),
                            out.display(),
                            report.bytes,
                            report.records_applied
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
        Command::Certs { action } => match action {
            CertsAction::Init { dir, days } => print!("{}", certs::init(&dir, days)?),
            CertsAction::Issue { dir, role, name, hosts, days, not_after, out_dir, force } => {
                let req = certs::IssueRequest { dir, out_dir, role, name, hosts, days, not_after, force };
                print!("{}", certs::issue(&req)?);
            }
        },
        Command::Bookmark {
            config,
            engine,
            ca,
            cert,
            key,
            server_name,
            insecure_plaintext,
            group,
            groups,
            all_groups,
            note,
            quiesce,
            quiesce_timeout,
            json,
            name,
        } => {
            let to = match (config, engine) {
                (Some(config), _) => {
                    let cfg = EngineConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
                    // The engine's own certificate, checked against its own name.
                    let own = cfg.security.tls().and_then(|t| t.own().identities().iter().find(|i| i.role == Role::Engine).cloned());
                    let mut addr = cfg.listen;
                    if addr.ip().is_unspecified() {
                        addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
                    }
                    let server_name = own.map_or_else(|| addr.ip().to_string(), |i| i.dns_name());
                    EngineAddress { addr, security: cfg.security, server_name }
                }
                (None, Some(engine)) => {
                    let addr = resolve_engine(&engine).map_err(Failure::Config)?;
                    let security = match (ca, cert, key) {
                        (Some(ca), Some(cert), Some(key)) => {
                            let files = TlsFiles { ca, cert, key };
                            let endpoint = TlsEndpoint::load_client(&files)
                                .map_err(|e| Failure::Config(format!("--{} {}: {}", e.key, e.path.display(), e.problem)))?;
                            Security::Tls(Arc::new(endpoint))
                        }
                        _ if insecure_plaintext && addr.ip().is_loopback() => Security::InsecurePlaintext,
                        _ if insecure_plaintext => {
                            return Err(Failure::Config(format!(
                                "--insecure-plaintext is only allowed for an engine on loopback, not {engine}; give --ca, --cert and --key"
                            )))
                        }
                        _ => {
                            return Err(Failure::Config(
                                "--engine needs --ca, --cert and --key (an operator's certificate: `hindsight certs issue --role \
                                 operator --name NAME`), or --insecure-plaintext for an engine on loopback"
                                    .into(),
                            ))
                        }
                    };
                    EngineAddress { addr, security, server_name: server_name.unwrap_or_else(|| server_name_of(&engine)) }
                }
                (None, None) => unreachable!("clap requires --config or --engine"),
            };
            let groups = match (group, all_groups) {
                (Some(g), _) => vec![g],
                (None, true) => Vec::new(),
                (None, false) => groups,
            };
            let quiesce_timeout_ms = u64::try_from(quiesce_timeout.as_millis()).unwrap_or(u64::MAX);
            let req = BookmarkRequest { protocol: PROTOCOL_VERSION, name: name.clone(), groups, note, quiesce, quiesce_timeout_ms };
            let reply = request_bookmark(&to, req)?;
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
        Command::History { config, group, json } => {
            let cfg = TargetConfig::load(&config).map_err(|e| Failure::Config(e.to_string()))?;
            let names = match group {
                Some(g) => vec![g],
                None => hindsight_target::groups(&cfg)?,
            };
            let mut all = Vec::new();
            for g in &names {
                all.push(hindsight_target::history(&cfg, g)?);
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
                    values.push(v);
                }
                let v = if values.len() == 1 { values.remove(0) } else { serde_json::Value::Array(values) };
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for h in &all {
                    print!("{}", format_history(h));
                }
                if all.is_empty() {
                    println!("no groups have been replicated to {} yet", cfg.data_dir.display());
                }
            }
        }
    }
    Ok(())
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    hindsight_consistency::config::parse_duration(s)
}

/// Asks the engine at `addr` to place a bookmark.
/// `host:port` of an engine, resolved to one address.
fn resolve_engine(engine: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    engine
        .to_socket_addrs()
        .map_err(|e| format!("--engine {engine:?}: {e}; write host:port, e.g. 10.0.0.5:7400"))?
        .next()
        .ok_or_else(|| format!("--engine {engine:?} resolves to no address"))
}

/// Where `hindsight bookmark` connects, and how.
struct EngineAddress {
    addr: std::net::SocketAddr,
    security: Security,
    /// The name the engine's certificate must be valid for.
    server_name: String,
}

fn request_bookmark(to: &EngineAddress, req: BookmarkRequest) -> anyhow::Result<BookmarkReply> {
    use anyhow::Context;
    let addr = to.addr;
    let tcp = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("cannot reach the engine at {addr}; is it running?"))?;
    let mut s = to.security.connect(tcp, &to.server_name, Role::Engine).with_context(|| format!("the engine at {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
    write_frame(&mut s, FrameType::BookmarkRequest, &encode_message(&req), &mut Vec::new())?;
    let mut payload = Vec::new();
    match read_frame(&mut s, &mut payload).context("the engine did not answer")? {
        FrameType::BookmarkReply => Ok(decode_message("BookmarkReply", &payload)?),
        FrameType::Error => anyhow::bail!("the engine refused: {}", decode_message::<ErrorMessage>("Error", &payload)?.message),
        other => anyhow::bail!("the engine answered with an unexpected {other:?} frame"),
    }
}

/// The human form of `hindsight history`.
fn format_history(h: &hindsight_target::History) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "group {} (shipped by {})", h.group, h.engine);
    let _ = writeln!(
        s,
        "  recoverable: seq {} ({}) .. seq {} ({})",
        h.first_seq,
        format_rfc3339(h.first_time_ns),
        h.last_seq,
        format_rfc3339(h.last_time_ns)
    );
    let mut limits = Vec::new();
    if let Some(r) = h.retention_ns {
        limits.push(format!("retention {}", humanize_duration(r)));
    }
    if let Some(j) = h.journal_size {
        limits.push(format!("journal_size {j} bytes"));
    }
    let _ = writeln!(s, "  journal: {} segments, {} bytes; {}", h.segments, h.journal_bytes, limits.join(", "));
    let _ = writeln!(s, "  replicas applied up to seq {}", h.applied_seq);
    for b in &h.bookmarks {
        let note = if b.note.is_empty() { String::new() } else { format!(" ({})", b.note) };
        let _ = writeln!(s, "  bookmark {:<20} seq {:<10} {}  {}{note}", b.name, b.seq, format_rfc3339(b.time_ns), b.consistency);
    }
    for v in &h.volumes {
        let _ = writeln!(s, "  volume {:<24} vm {:<16} {} bytes", v.name, v.vm, v.size);
    }
    s
}

fn humanize_duration(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    match secs {
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", ns / 1_000_000),
    }
}
