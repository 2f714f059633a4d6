//! The HTTP side of the daemons' metrics address: `GET /metrics` answers with the text a daemon
//! renders at each scrape, `GET /api/dashboard` with its dashboard document, and `/` with the
//! dashboard page that draws it (docs/dashboard.md); anything else is 404, any method but GET
//! and HEAD 405. Read-only. A small synchronous server (tiny_http) on a thread of its own, like
//! the rest of the daemons; no async runtime.
//!
//! `/metrics` speaks both exposition formats, chosen by the request's `Accept` header as the
//! Prometheus client libraries do: OpenMetrics to a client that asks for it (the Prometheus
//! server does), the classic text format 0.0.4 to any other (`curl`, `promtool check metrics`,
//! a browser), which cannot read OpenMetrics' counter families.

use std::collections::HashSet;
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
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the classic Prometheus text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition format a scrape is answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text, what the daemons render.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 ([`classic_text`]).
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality above 0 and at least that of any range the
    /// classic format answers (`text/plain`, `text/*`, `*/*`); the classic format otherwise, and
    /// without the header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }
}

/// The OpenMetrics text of a scrape (as prometheus-client writes it: a HELP and a TYPE line
/// before each family's samples, help unescaped, `# EOF` last) in the classic text format.
/// For the counters and gauges the daemons serve, the two differ only in a counter's HELP and
/// TYPE lines, which name the family with its `_total` suffix in the classic format (as its
/// samples are named in both), in `unknown` being called `untyped` there, and in the `# UNIT`
/// and `# EOF` lines, which it has not.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?.split_once(' ')?)));
        match descriptor {
            Some((p, (name, rest))) if counters.contains(name) => out += &format!("{p}{name}_total {rest}"),
            Some(("# TYPE ", (name, "unknown"))) => out += &format!("# TYPE {name} untyped"),
            _ => out += line,
        }
        out.push('\n');
    }
    out
}

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
        let accept = request.headers().iter().find(|h| h.field.equiv("Accept")).map(|h| h.value.as_str());
        let response = match Format::negotiate(accept) {
            Format::OpenMetrics => with(Response::from_string(source.metrics()), OPENMETRICS_CONTENT_TYPE),
            Format::Text => with(Response::from_string(classic_text(&source.metrics())), TEXT_CONTENT_TYPE),
        };
        return response.with_header(Header::from_bytes("Vary", "Accept").expect("a valid header"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_goes_to_clients_that_ask_for_it_and_text_to_the_others() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("application/openmetrics-text")), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        assert_eq!(Format::negotiate(Some("application/openmetrics-text;q=0.3, text/plain")), Format::Text);
        assert_eq!(Format::negotiate(Some("application/openmetrics-text; Q=0")), Format::Text);
    }

    #[test]
    fn classic_text_names_counter_families_with_their_total_suffix() {
        let openmetrics = "# HELP app_lag_seconds Age of the oldest record.\n\
                           # TYPE app_lag_seconds gauge\n\
                           app_lag_seconds{group=\"erp\"} 2.5\n\
                           # HELP app_wire_bytes Bytes on the wire.\n\
                           # TYPE app_wire_bytes counter\n\
                           # UNIT app_wire_bytes bytes\n\
                           app_wire_bytes_total{group=\"erp\"} 400\n\
                           # HELP app_other Something.\n\
                           # TYPE app_other unknown\n\
                           app_other 1\n\
                           # EOF\n";
        let text = "# HELP app_lag_seconds Age of the oldest record.\n\
                    # TYPE app_lag_seconds gauge\n\
                    app_lag_seconds{group=\"erp\"} 2.5\n\
                    # HELP app_wire_bytes_total Bytes on the wire.\n\
                    # TYPE app_wire_bytes_total counter\n\
                    app_wire_bytes_total{group=\"erp\"} 400\n\
                    # HELP app_other Something.\n\
                    # TYPE app_other untyped\n\
                    app_other 1\n";
        assert_eq!(classic_text(openmetrics), text);
    }
}
