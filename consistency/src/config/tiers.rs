//! Retention tiers (`[[target.tier]]`, docs/retention-tiers.md): every write for a while,
//! then one consistent point per interval, coarser and longer tier by tier.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::parse::{parse_duration, ValueError};
use crate::time::format_duration;

/// One `[[target.tier]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSection {
    every: String,
    #[serde(rename = "for")]
    keep_for: String,
}

/// How densely a tier keeps points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    /// Every acknowledged write is a point.
    Write,
    /// The last consistent point of each interval of this length (aligned to the Unix epoch).
    Interval(Duration),
}

/// A validated tier: its points are those younger than `until` and at least as old as the
/// tier before's `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub every: Every,
    /// The age at which a point leaves the tier (`for`).
    pub until: Duration,
}

/// The tiers of every group of a target: `[[target.tier]]`, and a group's own
/// `[[target.group]]` list where it has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierPlan {
    /// For every group without its own list (empty: one flat `retention` window).
    pub default: Vec<Tier>,
    /// Groups with their own list, by name.
    pub groups: Vec<(String, Vec<Tier>)>,
}

impl TierPlan {
    /// No tiers for any group.
    pub const NONE: TierPlan = TierPlan { default: Vec::new(), groups: Vec::new() };

    /// The tiers of group `name` (empty: no tiers).
    pub fn of(&self, name: &str) -> &[Tier] {
        self.groups.iter().find(|(g, _)| g == name).map_or(&self.default, |(_, t)| t)
    }

    /// True if no group has tiers.
    pub fn is_empty(&self) -> bool {
        self.default.is_empty() && self.groups.iter().all(|(_, t)| t.is_empty())
    }
}

/// No tiers for any group, for what needs a plan that lives as long as the process.
pub static NO_TIERS: TierPlan = TierPlan::NONE;

/// One `[[target.group]]` table: a group's own settings at the target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierGroupSection {
    name: String,
    #[serde(default)]
    tier: Vec<TierSection>,
}

/// Checks `[[target.tier]]` and every `[[target.group]]` and gives the plan, or every mistake.
pub fn validate_plan(tiers: &[TierSection], groups: &[TierGroupSection]) -> Result<TierPlan, Vec<TierMistake>> {
    let mut mistakes = Vec::new();
    let default = validate_tiers("target.tier", tiers).unwrap_or_else(|m| {
        mistakes.extend(m);
        Vec::new()
    });
    let mut plan = TierPlan { default, groups: Vec::new() };
    for (i, g) in groups.iter().enumerate() {
        if plan.groups.iter().any(|(n, _)| *n == g.name) {
            mistakes.push(TierMistake::DuplicateGroup { at: format!("target.group[{i}]"), name: g.name.clone() });
            continue;
        }
        match validate_tiers(&format!("target.group[{i}] ({:?}).tier", g.name), &g.tier) {
            Ok(t) => plan.groups.push((g.name.clone(), t)),
            Err(m) => mistakes.extend(m),
        }
    }
    if mistakes.is_empty() {
        Ok(plan)
    } else {
        Err(mistakes)
    }
}

/// A mistake in a list of tiers. `at` names the table (`target.tier[2]`, or with a group's
/// name for its overrides).
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum TierMistake {
    /// `every` is neither `"write"` nor a duration.
    #[error("{at}.every: {source}; or write every = \"write\" for the first tier")]
    Every {
        /// Which table.
        at: String,
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// `for` is not a duration.
    #[error("{at}.for: {source}")]
    For {
        /// Which table.
        at: String,
        /// The cause.
        #[source]
        source: ValueError,
    },
    /// Under a second.
    #[error("{at}.{key} must be at least 1s")]
    Zero {
        /// Which table.
        at: String,
        /// `every` or `for`.
        key: &'static str,
    },
    /// `every = "write"` after the first tier.
    #[error("{at}.every = \"write\" is only for the first tier: later tiers keep fewer points, e.g. every = \"1m\"")]
    WriteNotFirst {
        /// Which table.
        at: String,
    },
    /// Not coarser than the tier before.
    #[error("{at}.every = {every:?} must be coarser than the tier before ({before:?}): tiers go from fine to coarse")]
    NotCoarser {
        /// Which table.
        at: String,
        /// Its `every`.
        every: String,
        /// The tier before's.
        before: String,
    },
    /// Not a whole multiple of the tier before's interval.
    #[error(
        "{at}.every = {every:?} must be a whole multiple of the tier before ({before:?}), so that every point it keeps is one \
         the finer tier kept; e.g. {suggest:?}"
    )]
    NotMultiple {
        /// Which table.
        at: String,
        /// Its `every`.
        every: String,
        /// The tier before's.
        before: String,
        /// The nearest multiple above.
        suggest: String,
    },
    /// Not longer than the tier before.
    #[error("{at}.for = {keep_for:?} must be longer than the tier before's ({before:?}): each tier begins where the one before ends")]
    NotLonger {
        /// Which table.
        at: String,
        /// Its `for`.
        keep_for: String,
        /// The tier before's.
        before: String,
    },
    /// Two `[[target.group]]` tables for one group.
    #[error("{at}: group {name:?} has a [[target.group]] table already; merge the two")]
    DuplicateGroup {
        /// Which table.
        at: String,
        /// The group.
        name: String,
    },
    /// A span shorter than one interval: the tier could keep no point.
    #[error(
        "{at}: it keeps one point every {every:?} but spans only {span:?} (from {from:?} to {to:?}); make `for` longer or `every` shorter"
    )]
    SpanTooShort {
        /// Which table.
        at: String,
        /// Its `every`.
        every: String,
        /// Its span.
        span: String,
        /// Where it begins and ends.
        from: String,
        /// See `from`.
        to: String,
    },
}

/// Checks a list of tiers (finest first) and gives them, or every mistake found. `at` is the
/// key of the list (`target.tier`).
pub fn validate_tiers(at: &str, raw: &[TierSection]) -> Result<Vec<Tier>, Vec<TierMistake>> {
    let mut mistakes = Vec::new();
    let mut tiers: Vec<Tier> = Vec::new();
    for (i, t) in raw.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let every = if t.every.trim() == "write" {
            Some(Every::Write)
        } else {
            match parse_duration(&t.every) {
                Ok(d) if d < Duration::from_secs(1) => {
                    mistakes.push(TierMistake::Zero { at: at.clone(), key: "every" });
                    None
                }
                Ok(d) => Some(Every::Interval(d)),
                Err(source) => {
                    mistakes.push(TierMistake::Every { at: at.clone(), source });
                    None
                }
            }
        };
        let until = match parse_duration(&t.keep_for) {
            Ok(d) if d < Duration::from_secs(1) => {
                mistakes.push(TierMistake::Zero { at: at.clone(), key: "for" });
                None
            }
            Ok(d) => Some(d),
            Err(source) => {
                mistakes.push(TierMistake::For { at: at.clone(), source });
                None
            }
        };
        let (Some(every), Some(until)) = (every, until) else { continue };
        if let Some(before) = tiers.last().copied() {
            check_after(&at, before, every, until, &mut mistakes);
        } else if let Every::Interval(e) = every {
            check_span(&at, e, Duration::ZERO, until, &mut mistakes);
        }
        tiers.push(Tier { every, until });
    }
    if mistakes.is_empty() {
        Ok(tiers)
    } else {
        Err(mistakes)
    }
}

/// The checks of a tier against the one before it.
fn check_after(at: &str, before: Tier, every: Every, until: Duration, mistakes: &mut Vec<TierMistake>) {
    let show = |e: Every| match e {
        Every::Write => "write".to_owned(),
        Every::Interval(d) => format_duration(d),
    };
    match (before.every, every) {
        (_, Every::Write) => mistakes.push(TierMistake::WriteNotFirst { at: at.to_owned() }),
        (Every::Interval(b), Every::Interval(e)) if e <= b => {
            mistakes.push(TierMistake::NotCoarser { at: at.to_owned(), every: show(every), before: show(before.every) });
        }
        (Every::Interval(b), Every::Interval(e)) if e.as_nanos() % b.as_nanos() != 0 => {
            let k = e.as_nanos().div_ceil(b.as_nanos());
            let suggest = b.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX));
            mistakes.push(TierMistake::NotMultiple {
                at: at.to_owned(),
                every: show(every),
                before: show(before.every),
                suggest: format_duration(suggest),
            });
        }
        _ => {}
    }
    if until <= before.until {
        mistakes.push(TierMistake::NotLonger {
            at: at.to_owned(),
            keep_for: format_duration(until),
            before: format_duration(before.until),
        });
    } else if let Every::Interval(e) = every {
        check_span(at, e, before.until, until, mistakes);
    }
}

fn check_span(at: &str, every: Duration, from: Duration, to: Duration, mistakes: &mut Vec<TierMistake>) {
    let span = to.saturating_sub(from);
    if every >= span {
        mistakes.push(TierMistake::SpanTooShort {
            at: at.to_owned(),
            every: format_duration(every),
            span: format_duration(span),
            from: format_duration(from),
            to: format_duration(to),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Tier>, Vec<String>> {
        #[derive(Deserialize)]
        struct File {
            tier: Vec<TierSection>,
        }
        let f: File = toml::from_str(text).unwrap();
        validate_tiers("target.tier", &f.tier).map_err(|m| m.iter().map(ToString::to_string).collect())
    }

    fn tiers(pairs: &[(&str, &str)]) -> String {
        pairs.iter().map(|(e, f)| format!("[[tier]]\nevery = \"{e}\"\nfor = \"{f}\"\n")).collect()
    }

    #[test]
    fn the_example_of_the_documentation_is_valid() {
        let t = parse(&tiers(&[("write", "1h"), ("1m", "24h"), ("1h", "7d"), ("1d", "30d")])).unwrap();
        let h = Duration::from_secs(3600);
        assert_eq!(t[0], Tier { every: Every::Write, until: h });
        assert_eq!(t[1], Tier { every: Every::Interval(Duration::from_secs(60)), until: 24 * h });
        assert_eq!(t[3], Tier { every: Every::Interval(24 * h), until: 30 * 24 * h });
        // A first tier that is already coarse is allowed.
        assert!(parse(&tiers(&[("10s", "1h"), ("1m", "2h")])).is_ok());
    }

    #[test]
    fn each_mistake_names_the_table_and_the_fix() {
        let e = parse(&tiers(&[("write", "1h"), ("write", "2h")])).unwrap_err();
        assert_eq!(e, ["target.tier[1].every = \"write\" is only for the first tier: later tiers keep fewer points, e.g. every = \"1m\""]);
        let e = parse(&tiers(&[("write", "1h"), ("1m", "24h"), ("30s", "48h")])).unwrap_err();
        assert!(e[0].starts_with("target.tier[2].every = \"30s\" must be coarser than the tier before (\"1m\")"), "{e:?}");
        let e = parse(&tiers(&[("write", "1h"), ("1m", "24h"), ("90s", "48h")])).unwrap_err();
        assert!(e[0].contains("must be a whole multiple of the tier before (\"1m\")") && e[0].ends_with("e.g. \"2m\""), "{e:?}");
        let e = parse(&tiers(&[("write", "1h"), ("1m", "30m")])).unwrap_err();
        assert!(e[0].starts_with("target.tier[1].for = \"30m\" must be longer than the tier before's (\"1h\")"), "{e:?}");
        let e = parse(&tiers(&[("write", "1h"), ("1h", "90m")])).unwrap_err();
        assert!(e[0].starts_with("target.tier[1]: it keeps one point every \"1h\" but spans only \"30m\""), "{e:?}");
        let e = parse(&tiers(&[("often", "1h"), ("1m", "soon"), ("0s", "2d")])).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("target.tier[0].every: \"often\" is not a duration"), "{e:?}");
        assert!(e[1].starts_with("target.tier[1].for: \"soon\" is not a duration"), "{e:?}");
        assert_eq!(e[2], "target.tier[2].every must be at least 1s");
    }
}
