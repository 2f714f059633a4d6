//! Talking to a running engine: bookmark, status and mode requests, one connection each.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use hindsight_consistency::config::EngineConfig;
use hindsight_consistency::wire::{
    decode_message, encode_message, read_frame, write_frame, ErrorMessage, FrameType, GroupStatus, StatusReply,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long a request waits for the engine's answer (a quiesced bookmark may take a while).
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// The engine's address: from its engine.toml, or given as `host:port`.
pub fn engine_addr(config: Option<&PathBuf>, engine: Option<&str>) -> Result<SocketAddr, String> {
    match (config, engine) {
        (Some(config), _) => EngineConfig::load(config).map(|c| c.listen).map_err(|e| e.to_string()),
        (None, Some(engine)) => engine
            .to_socket_addrs()
            .map_err(|e| format!("--engine {engine:?}: {e}; write host:port, e.g. 10.0.0.5:7400"))?
            .next()
            .ok_or_else(|| format!("--engine {engine:?} resolves to no address")),
        (None, None) => Err("give --config engine.toml or --engine host:port".into()),
    }
}

/// Sends one request frame and reads the one answer.
pub fn request<Q: Serialize, R: DeserializeOwned>(addr: SocketAddr, ask: FrameType, answer: FrameType, req: &Q) -> anyhow::Result<R> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the engine at {addr}; is it running?"))?;
    s.set_read_timeout(Some(ANSWER_WAIT))?;
    write_frame(&mut s, ask, &encode_message(req), &mut Vec::new())?;
    let mut payload = Vec::new();
    match read_frame(&mut s, &mut payload).context("the engine did not answer")? {
        t if t == answer => {
            let reply: R = postcard_decode(&payload)?;
            Ok(reply)
        }
        FrameType::Error => anyhow::bail!("the engine refused: {}", decode_message::<ErrorMessage>("Error", &payload)?.message),
        other => anyhow::bail!("the engine answered with an unexpected {other:?} frame"),
    }
}

fn postcard_decode<R: DeserializeOwned>(payload: &[u8]) -> anyhow::Result<R> {
    Ok(decode_message::<R>("reply", payload)?)
}

/// The human form of `hindsight status`.
pub fn format_status(reply: &StatusReply) -> String {
    let mut out = format!("engine {}\n", reply.engine);
    for g in &reply.groups {
        out.push_str(&format_group(g));
    }
    out
}

fn format_group(g: &GroupStatus) -> String {
    let mode = if g.mode == g.effective_mode { g.mode.clone() } else { format!("{} (configured {})", g.effective_mode, g.mode) };
    let mut lines = vec![format!("group {}: mode {mode}", g.name)];
    if !g.reason.is_empty() {
        lines.push(format!("  {}", g.reason));
    }
    if g.mode == "sync" {
        lines.push(format!("  on_sync_loss: {}", g.on_sync_loss));
    }
    let link = if g.target_connected { "connected" } else { "NOT connected" };
    lines.push(format!("  target {} ({link})", g.target));
    lines.push(format!(
        "  lag: {:.1}s, {} records, {} bytes (engine durable seq {}, target seq {})",
        Duration::from_millis(g.lag_ms).as_secs_f64(),
        g.lag_writes,
        g.lag_bytes,
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
            "  link ({compression}): {} record bytes shipped as {} on the wire, ratio {ratio:.2}, {} bytes saved",
            g.shipped_bytes,
            g.wire_bytes,
            g.shipped_bytes.saturating_sub(g.wire_bytes)
        ));
    }
    if g.poisoned {
        lines.push("  STOPPED: the journal failed; fix the cause and restart the engine".into());
    }
    let attached = if g.attached.is_empty() { "(none)".to_string() } else { g.attached.join(", ") };
    lines.push(format!("  volumes with a connected agent: {attached}"));
    lines.join("\n") + "\n"
}
