//! The values every section writes the same way: sizes (`"20GiB"`), durations (`"24h"`) and
//! addresses (`host:port`, `ip:port`).

use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

/// A value that is not what its key takes.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum ValueError {
    /// [`parse_size`]: no number.
    #[error("{text:?} is not a size; write e.g. \"100GiB\" or \"512MiB\"")]
    NotASize {
        /// The value.
        text: String,
    },
    /// [`parse_size`]: a unit it does not know.
    #[error("{text:?} has an unknown unit {unit:?}; use B, KiB, MiB, GiB or TiB")]
    UnknownUnit {
        /// The value.
        text: String,
        /// The unit in it.
        unit: String,
    },
    /// [`parse_size`]: more bytes than 64 bits count.
    #[error("{text:?} is too large")]
    TooLarge {
        /// The value.
        text: String,
    },
    /// [`parse_duration`]: not a duration.
    #[error("{text:?} is not a duration ({source}); write e.g. \"24h\" or \"30s\"")]
    NotADuration {
        /// The value.
        text: String,
        /// What humantime found wrong.
        #[source]
        source: humantime::DurationError,
    },
    /// An address that must be `host:port`.
    #[error("{key} = {text:?} is not an address; write host:port, e.g. \"127.0.0.1:7500\"")]
    NotHostPort {
        /// The key, with its context (`group "erp": target`).
        key: String,
        /// The value.
        text: String,
    },
    /// An address that must be `ip:port` (where a daemon listens).
    #[error("{key} = {text:?} is not an address; write ip:port, e.g. \"127.0.0.1:7400\"")]
    NotSocketAddr {
        /// The key.
        key: String,
        /// The value.
        text: String,
    },
}

/// Parses a size such as `1GiB`, `512MiB`, `20G`, `4096`. Binary units (KiB, MiB, GiB, TiB
/// and the short K, M, G, T) are powers of 1024; KB, MB, GB, TB are powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, ValueError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let n: u64 = num.parse().map_err(|_| ValueError::NotASize { text: s.to_owned() })?;
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
        _ => return Err(ValueError::UnknownUnit { text: s.to_owned(), unit: unit.to_owned() }),
    };
    n.checked_mul(mult).ok_or_else(|| ValueError::TooLarge { text: s.to_owned() })
}

/// Parses a duration such as `24h`, `30s`, `7d`, `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s.trim()).map_err(|source| ValueError::NotADuration { text: s.to_owned(), source })
}

pub(super) fn check_host_port(key: &str, s: &str) -> Result<(), ValueError> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(ValueError::NotHostPort { key: key.to_owned(), text: s.to_owned() }),
    }
}

pub(super) fn parse_socket_addr(key: &str, s: &str) -> Result<SocketAddr, ValueError> {
    s.parse().map_err(|_| ValueError::NotSocketAddr { key: key.to_owned(), text: s.to_owned() })
}

/// Notes the error of `result`, if any, among `mistakes`, and gives its value: validation
/// goes on after a mistake, so that one reading reports them all.
pub(super) fn note<T, E, M: From<E>>(mistakes: &mut Vec<M>, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            mistakes.push(M::from(e));
            None
        }
    }
}

/// The mistakes of one file as its error shows them, one a line (for tests that validate
/// a section without a file).
#[cfg(test)]
pub(super) fn lines<M: std::fmt::Display>(mistakes: &[M]) -> String {
    mistakes.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
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
