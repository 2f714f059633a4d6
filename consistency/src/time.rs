//! Wall-clock time as the engine stamps it: nanoseconds since the Unix epoch, UTC.

use chrono::{DateTime, SecondsFormat, Utc};

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

/// Formats a duration for people, to the second (`1h 30m 5s`).
pub fn format_duration(d: std::time::Duration) -> String {
    humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
}

/// Parses an RFC 3339 time with any offset (`2026-11-22T06:01:02+01:00`, fractions allowed).
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let t = DateTime::parse_from_rfc3339(s.trim())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e}); write e.g. 2026-11-22T05:01:02Z"))?;
    let ns = t.timestamp_nanos_opt().ok_or_else(|| format!("{s:?} is out of range"))?;
    u64::try_from(ns).map_err(|_| format!("{s:?} is before 1970"))
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
    }
}
