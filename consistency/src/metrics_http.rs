//! The HTTP side of the daemons' Prometheus endpoints: `GET /metrics` answers with the text a
//! daemon renders at each scrape (OpenMetrics), anything else with 404. A small synchronous
//! server (tiny_http) on a thread of its own, like the rest of the daemons; no async runtime.

use std::io;
use std::net::SocketAddr;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` on `addr` from a thread named `thread`, with `render`'s text at each
/// scrape; returns the address bound (port 0 picks one).
pub fn serve(addr: SocketAddr, thread: &str, render: impl Fn() -> String + Send + 'static) -> io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| io::Error::new(io::ErrorKind::AddrInUse, e.to_string()))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let owner = thread.to_owned();
    std::thread::Builder::new().name(thread.into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = if request.url() == "/metrics" {
                let header = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE).expect("a valid header");
                tiny_http::Response::from_string(render()).with_header(header)
            } else {
                tiny_http::Response::from_string(format!("{owner}: metrics are at /metrics\n")).with_status_code(404)
            };
            let _ = request.respond(response);
        }
    })?;
    Ok(bound)
}
