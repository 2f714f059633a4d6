//! Wall-clock time as the engine stamps it: nanoseconds since the Unix epoch, UTC.

use chrono::{DateTime, SecondsFormat, Utc};
use thiserror::Error;

/// Now, in ns since the Unix epoch.
pub fn now_ns() -> u64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Formats a time as RFC 3339 with nanoseconds, UTC (`2026-11-22T05:01:02.123456789Z`).
pub fn format_rfc3339(ns: u64) -> String {
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    let nanos = u32::try_from(ns % 1_000_000_000).expect("below 1e9");
    match DateTime::<Utc>::from_timestamp(secs, nanos) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Nanos, true),
        None => format!("{ns}ns"),
    }
}

/// Formats a time to the second, for people (`2026-12-02T20:22:27Z`).
pub fn format_rfc3339_seconds(ns: u64) -> String {
    let secs = i64::try_from(ns / 1_000_000_000).unwrap_or(i64::MAX);
    match DateTime::<Utc>::from_timestamp(secs, 0) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Secs, true),
        None => format!("{ns}ns"),
    }
}

/// Formats a duration for people, to the second (`1h 30m 5s`).
pub fn format_duration(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

/// Parses an RFC 3339 time with any offset (`2026-11-22T06:01:02+01:00`, fractions allowed).
pub fn parse_rfc3339(s: &str) -> Result<u64, TimeError> {
    let t = DateTime::parse_from_rfc3339(s.trim()).map_err(|source| TimeError::NotRfc3339 { text: s.to_owned(), source })?;
    let ns = t.timestamp_nanos_opt().ok_or_else(|| TimeError::OutOfRange { text: s.to_owned() })?;
    u64::try_from(ns).map_err(|_| TimeError::Before1970 { text: s.to_owned() })
}

/// Why [`parse_rfc3339`] refused a time.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TimeError {
    /// Not RFC 3339.
    #[error("{text:?} is not an RFC 3339 time ({source}); write e.g. 2026-11-22T05:01:02Z")]
    NotRfc3339 {
        /// The text given.
        text: String,
        /// What chrono found wrong.
        #[source]
        source: chrono::ParseError,
    },
    /// Beyond what nanoseconds in an i64 can hold.
    #[error("{text:?} is out of range")]
    OutOfRange {
        /// The text given.
        text: String,
    },
    /// Before the Unix epoch.
    #[error("{text:?} is before 1970")]
    Before1970 {
        /// The text given.
        text: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_nanos_and_offsets() {
        let ns = 1_795_000_000_123_456_789;
        assert_eq!(parse_rfc3339(&format_rfc3339(ns)).unwrap(), ns);
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00").unwrap(), 0);
        assert!(parse_rfc3339("yesterday").is_err());
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z").unwrap_err().to_string(), "\"1969-12-31T23:59:59Z\" is before 1970");
    }
}
