//! Talking to a running engine: bookmark, status and mode requests, one connection each, over
//! TLS with the engine's own certificate (from its engine.toml) or an operator's.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hindsight_consistency::config::EngineConfig;
use hindsight_consistency::transport::identity::server_name_of;
use hindsight_consistency::transport::{Role, Security, TlsEndpoint, TlsFiles};
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, ClusterStatus, ErrorMessage, FrameType, GroupStatus, ResyncStatus, StatusReply,
};
use serde::de::DeserializeOwned;

use crate::progress::human;
use serde::Serialize;

/// How long a request waits for the engine's answer (a quiesced bookmark may take a while).
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Where the running engine is and how to reach it: its engine.toml (address and, with TLS,
/// its own certificate), or an address with a client certificate.
#[derive(clap::Args, Debug)]
pub struct EngineAt {
    /// engine.toml of the running engine (its address, and its own certificate as the client's);
    /// for `status`, a target.toml gives the recovery site's view
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The engine's address, host:port (instead of --config; e.g. from inside a guest)
    #[arg(long)]
    pub engine: Option<String>,
    /// With --engine: the CA certificate (PEM) the engine's certificate must be issued by
    #[arg(long, requires_all = ["cert", "key"], conflicts_with = "config")]
    pub ca: Option<PathBuf>,
    /// With --engine: this client's certificate (an operator's, or an agent's for the
    /// bookmarks of its VM's groups)
    #[arg(long, requires_all = ["ca", "key"])]
    pub cert: Option<PathBuf>,
    /// With --engine: the private key of --cert
    #[arg(long, requires_all = ["ca", "cert"])]
    pub key: Option<PathBuf>,
    /// With --engine: the name the engine's certificate must be valid for (default: the host
    /// of --engine)
    #[arg(long, conflicts_with = "config")]
    pub server_name: Option<String>,
    /// With --engine on loopback: no TLS (the engine has tls.insecure_plaintext = true)
    #[arg(long, conflicts_with_all = ["ca", "cert", "key", "config"])]
    pub insecure_plaintext: bool,
}

/// Why the engine's address or the client's certificate could not be had from the options.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    #[error("{0}")]
    Config(#[from] hindsight_consistency::config::ConfigError),
    #[error("--engine {engine:?}: {source}; write host:port, e.g. 10.0.0.5:7400")]
    Resolve {
        engine: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--engine {0:?} resolves to no address")]
    NoAddress(String),
    #[error("--{key} {}: {problem}", path.display())]
    Certificate { key: &'static str, path: PathBuf, problem: String },
    #[error("--insecure-plaintext is only allowed for an engine on loopback, not {0}; give --ca, --cert and --key")]
    PlaintextNotLoopback(String),
    #[error(
        "--engine needs --ca, --cert and --key (an operator's certificate: `hindsight certs issue --role operator --name NAME`), \
         or --insecure-plaintext for an engine on loopback"
    )]
    NoCertificate,
    #[error("give --config engine.toml or --engine host:port")]
    NoEngine,
}

/// A resolved engine address with the security to reach it.
pub struct EngineAddress {
    addr: SocketAddr,
    security: Security,
    /// The name the engine's certificate must be valid for.
    server_name: String,
}

impl EngineAt {
    /// Resolves the address and loads the client's certificate.
    pub fn resolve(&self) -> Result<EngineAddress, AddressError> {
        match (&self.config, &self.engine) {
            (Some(config), _) => {
                let cfg = EngineConfig::load(config)?;
                // The engine's own certificate, checked against its own name.
                let own = cfg.security.tls().and_then(|t| t.own().identities().iter().find(|i| i.role == Role::Engine).cloned());
                let mut addr = cfg.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
                }
                let server_name = own.map_or_else(|| addr.ip().to_string(), |i| i.dns_name());
                Ok(EngineAddress { addr, security: cfg.security, server_name })
            }
            (None, Some(engine)) => {
                let addr = engine
                    .to_socket_addrs()
                    .map_err(|source| AddressError::Resolve { engine: engine.clone(), source })?
                    .next()
                    .ok_or_else(|| AddressError::NoAddress(engine.clone()))?;
                let security = match (&self.ca, &self.cert, &self.key) {
                    (Some(ca), Some(cert), Some(key)) => {
                        let files = TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
                        let endpoint = TlsEndpoint::load_client(&files).map_err(|e| AddressError::Certificate {
                            key: e.key,
                            path: e.path.clone(),
                            problem: e.problem.clone(),
                        })?;
                        Security::Tls(Arc::new(endpoint))
                    }
                    _ if self.insecure_plaintext && addr.ip().is_loopback() => Security::InsecurePlaintext,
                    _ if self.insecure_plaintext => return Err(AddressError::PlaintextNotLoopback(engine.clone())),
                    _ => return Err(AddressError::NoCertificate),
                };
                let server_name = self.server_name.clone().unwrap_or_else(|| server_name_of(engine));
                Ok(EngineAddress { addr, security, server_name })
            }
            (None, None) => Err(AddressError::NoEngine),
        }
    }
}

/// Sends one request frame and reads the one answer.
pub fn request<Q: Serialize, R: DeserializeOwned>(to: &EngineAddress, ask: FrameType, answer: FrameType, req: &Q) -> anyhow::Result<R> {
    let addr = to.addr;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the engine at {addr}; is it running?"))?;
    let mut s = to.security.connect(tcp, &to.server_name, Role::Engine).with_context(|| format!("the engine at {addr}"))?;
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    write_frame(&mut s, ask, &encode_message(req), &mut Vec::new())?;
    let mut payload = Vec::new();
    match read_frame(&mut s, &mut payload).context("the engine did not answer")? {
        t if t == answer => Ok(decode_message::<R>("reply", &payload)?),
        FrameType::Error => anyhow::bail!("the engine refused: {}", decode_message::<ErrorMessage>("Error", &payload)?.message),
        other => anyhow::bail!("the engine answered with an unexpected {other:?} frame"),
    }
}

/// The human form of `hindsight status`.
pub fn format_status(reply: &StatusReply) -> String {
    let mut out = format!("engine {}\n", reply.engine);
    if let Some(c) = &reply.cluster {
        out.push_str(&format_cluster(c));
    }
    for g in &reply.groups {
        out.push_str(&format_group(g));
    }
    out
}

/// A compare sweep (initial sync): how far, what differed, the rate and what is left.
fn format_sweep(r: &ResyncStatus) -> String {
    let sent = if r.done >= r.differ { "differ and were sent".to_string() } else { format!("differ, {} sent so far", r.done) };
    format!(
        "  initial sync of {}: compared {}/{} regions ({:.0}%), {} {sent}, {:.0} MB/s, about {}s left",
        r.volume,
        r.compared,
        r.compare_total,
        r.compared as f64 * 100.0 / r.compare_total.max(1) as f64,
        r.differ,
        r.bytes_per_s as f64 / 1e6,
        r.eta_s
    )
}

/// The cluster: this engine and its lease, the live engines, each group's owner and its latest
/// change.
fn format_cluster(c: &ClusterStatus) -> String {
    let lease = if c.lease_valid { "lease valid" } else { "LEASE NOT VALID: acknowledges no write" };
    let mut lines = vec![format!("cluster {}: this engine is {}, {lease}", c.site, c.name)];
    if !c.etcd_error.is_empty() {
        lines.push(format!("  etcd: {}", c.etcd_error));
    }
    let engines: Vec<String> = c.engines.iter().map(|(n, a)| format!("{n} ({a})")).collect();
    lines.push(format!("  engines alive: {}", if engines.is_empty() { "(none seen)".to_string() } else { engines.join(", ") }));
    if !c.disagree.is_empty() {
        lines.push(format!(
            "  OTHER GROUP DEFINITIONS at engine(s) {}: give every engine of the site the same [[group]] tables",
            c.disagree.join(", ")
        ));
    }
    for o in &c.owners {
        let owner = if o.engine.is_empty() { "no owner".to_string() } else { format!("owned by {} (token {})", o.engine, o.token) };
        let change = match (o.why.is_empty(), o.changed_from.is_empty()) {
            (true, _) => String::new(),
            (false, true) => format!("; since {}: {}", o.time, o.why),
            (false, false) => format!("; since {}, from {}: {}", o.time, o.changed_from, o.why),
        };
        lines.push(format!("  group {}: {owner}{change}", o.group));
    }
    lines.join("\n") + "\n"
}

fn format_group(g: &GroupStatus) -> String {
    let mode = if g.mode == g.effective_mode { g.mode.clone() } else { format!("{} (configured {})", g.effective_mode, g.mode) };
    let here = match g.ownership.as_str() {
        "" | "owner" => String::new(),
        other => format!(" ({other} by this engine)"),
    };
    if g.ownership == "elsewhere" {
        // Its mode, lag and link are the owner's to tell.
        return format!("group {}: owned by another engine (the cluster above says which)\n", g.name);
    }
    let mut lines = vec![format!("group {}: mode {mode}{here}", g.name)];
    if !g.reason.is_empty() {
        lines.push(format!("  {}", g.reason));
    }
    if g.mode == "sync" {
        lines.push(format!("  on_sync_loss: {}", g.on_sync_loss));
    }
    let link = if g.target_connected { "connected" } else { "NOT connected" };
    lines.push(format!("  target {} ({link})", g.target));
    lines.push(format!(
        "  lag: {:.1}s, {} records, {} (engine durable seq {}, target seq {})",
        Duration::from_millis(g.lag_ms).as_secs_f64(),
        g.lag_writes,
        human(g.lag_bytes),
        g.durable_seq,
        g.confirmed_seq
    ));
    if g.rpo_ms > 0 {
        let state = if g.rpo_ok { "holds" } else { "EXCEEDED (alert)" };
        let regulating = if g.regulating { ", slowing acknowledgements" } else { "" };
        lines.push(format!("  rpo {:.1}s: {state}{regulating}", Duration::from_millis(g.rpo_ms).as_secs_f64()));
    }
    if g.shipped_bytes > 0 {
        let compression = if g.compression.is_empty() { "uncompressed".to_string() } else { g.compression.clone() };
        let ratio = g.shipped_bytes as f64 / g.wire_bytes.max(1) as f64;
        lines.push(format!(
            "  link ({compression}): {} of records shipped as {} on the wire, ratio {ratio:.2}, {} saved",
            human(g.shipped_bytes),
            human(g.wire_bytes),
            human(g.shipped_bytes.saturating_sub(g.wire_bytes))
        ));
    }
    for r in &g.resyncing {
        if r.compare_total > 0 {
            lines.push(format_sweep(r));
            continue;
        }
        lines.push(format!(
            "  resync of {}: {:.0}% ({}/{} regions, {:.1} MB/s, about {}s left)",
            r.volume,
            r.done as f64 * 100.0 / r.total.max(1) as f64,
            r.done,
            r.total,
            r.bytes_per_s as f64 / 1e6,
            r.eta_s
        ));
    }
    if g.poisoned {
        lines.push("  STOPPED: the journal failed; fix the cause and restart the engine".into());
    }
    let size = if g.journal_size == 0 { "no journal_size".to_string() } else { format!("of {}", human(g.journal_size)) };
    lines.push(format!("  journal: {} {size}, on_journal_full = {}", human(g.journal_bytes), g.on_journal_full));
    if g.paused {
        lines.push("  PAUSED: writes are tracked by the agents, not journaled".into());
    }
    if !g.journal_state.is_empty() {
        lines.push(format!("  {}", g.journal_state));
    }
    if g.handed_over {
        lines.push("  HANDED OVER for a planned failover: no more writes are acknowledged (restart the engine to take them again)".into());
    }
    if !g.target_refused.is_empty() {
        lines.push(format!("  the target refuses the group: {}", g.target_refused));
    }
    let attached = if g.attached.is_empty() { "(none)".to_string() } else { g.attached.join(", ") };
    lines.push(format!("  volumes with a connected agent: {attached}"));
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resync(compare_total: u64, compared: u64, differ: u64, done: u64) -> ResyncStatus {
        ResyncStatus { volume: "db".into(), done, total: differ, bytes_per_s: 300_000_000, eta_s: 2, compare_total, compared, differ }
    }

    #[test]
    fn an_initial_sync_shows_what_was_compared_and_sent() {
        assert_eq!(
            format_sweep(&resync(1024, 512, 12, 12)),
            "  initial sync of db: compared 512/1024 regions (50%), 12 differ and were sent, 300 MB/s, about 2s left"
        );
        assert_eq!(
            format_sweep(&resync(1024, 512, 12, 10)),
            "  initial sync of db: compared 512/1024 regions (50%), 12 differ, 10 sent so far, 300 MB/s, about 2s left"
        );
    }
}
