//! The values every section writes the same way: sizes (`"20GiB"`), durations (`"24h"`) and
//! addresses (`host:port`, `ip:port`).

use std::net::SocketAddr;
use std::time::Duration;

/// Parses a size such as `1GiB`, `512MiB`, `20G`, `4096`. Binary units (KiB, MiB, GiB, TiB
/// and the short K, M, G, T) are powers of 1024; KB, MB, GB, TB are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size; write e.g. \"100GiB\" or \"512MiB\""))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use B, KiB, MiB, GiB or TiB")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses a duration such as `24h`, `30s`, `7d`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. \"24h\" or \"30s\""))
}

pub(super) fn check_host_port(key: &str, s: &str) -> Result<(), String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(format!("{key} = {s:?} is not an address; write host:port, e.g. \"127.0.0.1:7500\"")),
    }
}

pub(super) fn parse_socket_addr(key: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{key} = {s:?} is not an address; write ip:port, e.g. \"127.0.0.1:7400\""))
}

/// The serde default of the keys that are on unless turned off (`direct_io`).
pub(super) fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1GB").unwrap(), 1_000_000_000);
        assert!(parse_size("1 XB").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("soon").is_err());
    }
}
