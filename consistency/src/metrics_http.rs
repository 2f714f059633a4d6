//! The HTTP side of the daemons' metrics address: `GET /metrics` answers with the text a daemon
//! renders at each scrape (OpenMetrics), `GET /api/dashboard` with its dashboard document, and
//! `/` with the dashboard page that draws it (docs/dashboard.md); anything else is 404, any
//! method but GET and HEAD 405. Read-only. A small synchronous server (tiny_http) on a thread
//! of its own, like the rest of the daemons; no async runtime.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;
use tiny_http::{Header, Method, Request, Response};

use crate::dashboard;

/// The label of every per-group series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabel {
    pub group: String,
}

/// The labels of every per-volume series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabel {
    pub group: String,
    pub vm: String,
    pub volume: String,
}

/// Registers a metric (or a family of them) under `name` and returns it for setting.
pub fn register<M>(r: &mut Registry, name: &str, help: &str) -> M
where
    M: TypedMetric + EncodeMetric + Clone + Default + Send + Sync + std::fmt::Debug + 'static,
{
    let m = M::default();
    r.register(name, help, m.clone());
    m
}

/// The OpenMetrics text of a registry.
pub fn encode(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).expect("writing to a String cannot fail");
    out
}

/// A count as a gauge's value (saturating).
pub fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a daemon answers with: its series and its dashboard document, made at each request.
pub trait Source: Send + Sync + 'static {
    /// The OpenMetrics text of one scrape.
    fn metrics(&self) -> String;
    /// The dashboard document; `None`: this daemon has no dashboard (the agent), and `/`
    /// answers 404.
    fn dashboard(&self) -> Option<dashboard::Document> {
        None
    }
    /// Called every [`dashboard::SAMPLE_EVERY`] from a thread of its own: records what the
    /// dashboard charts over time (the lag).
    fn sample(&self) {}
}

/// Serves the metrics address `addr` from a thread named `thread` (and, for a daemon with a
/// dashboard, samples `source` from `thread`-sample); returns the address bound (port 0 picks
/// one).
pub fn serve(addr: SocketAddr, thread: &str, source: Arc<impl Source>) -> io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e.to_string()))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let owner = thread.to_owned();
    if source.dashboard().is_some() {
        let sampled = Arc::clone(&source);
        std::thread::Builder::new().name(format!("{thread}-sample")).spawn(move || loop {
            sampled.sample();
            std::thread::sleep(dashboard::SAMPLE_EVERY);
        })?;
    }
    std::thread::Builder::new().name(thread.into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = answer(&request, &owner, source.as_ref());
            let _ = request.respond(response);
        }
    })?;
    Ok(bound)
}

fn answer(request: &Request, owner: &str, source: &impl Source) -> Response<io::Cursor<Vec<u8>>> {
    let with = |r: Response<io::Cursor<Vec<u8>>>, content_type: &str| {
        let header = Header::from_bytes("Content-Type", content_type).expect("a valid header");
        r.with_header(header).with_header(Header::from_bytes("Cache-Control", "no-store").expect("a valid header"))
    };
    if !matches!(request.method(), Method::Get | Method::Head) {
        return Response::from_string(format!("{owner}: read-only, GET only\n")).with_status_code(405);
    }
    let path = request.url().split('?').next().unwrap_or("");
    if path == "/metrics" {
        return with(Response::from_string(source.metrics()), CONTENT_TYPE);
    }
    let not_found = |what: &str| Response::from_string(format!("{owner}: {what}\n")).with_status_code(404);
    // The agent has metrics only (its document is `None`).
    let Some(doc) = source.dashboard() else { return not_found("no dashboard here; the metrics are at /metrics") };
    if path == "/api/dashboard" {
        return with(Response::from_string(dashboard::to_json(&doc)), "application/json");
    }
    match dashboard::asset(path) {
        Some((content_type, body)) => with(Response::from_string(body), content_type),
        None => not_found("the dashboard is at /, the metrics at /metrics"),
    }
}
