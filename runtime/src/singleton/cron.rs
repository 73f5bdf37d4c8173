//! Cron schedules of `#[singleton(cron = "...")]`: parsing (5 or 6 fields,
//! an optional IANA timezone) and the next occurrence after an instant.

use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed cron pattern with its timezone (UTC when none is given).
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    cron: Cron,
    timezone: Option<chrono_tz::Tz>,
}

/// Why a cron pattern or timezone was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The pattern does not have 5 or 6 fields, or does not parse.
    #[error("invalid cron pattern `{pattern}`: {reason}")]
    Pattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The timezone is not an IANA name (e.g. `Europe/Paris`).
    #[error("unknown timezone `{0}` (expected an IANA name such as `Europe/Paris`)")]
    Timezone(String),
}

impl Schedule {
    /// Parses `pattern` (5 fields: minute to weekday; 6: with seconds
    /// first; or an `@daily`-style nickname) in `timezone` (IANA name).
    pub(crate) fn parse(pattern: &str, timezone: Option<&str>) -> Result<Self, ScheduleError> {
        let cron = parse_pattern(pattern)?;
        let timezone = timezone
            .map(|tz| {
                tz.parse::<chrono_tz::Tz>()
                    .map_err(|_| ScheduleError::Timezone(tz.to_owned()))
            })
            .transpose()?;
        Ok(Self { cron, timezone })
    }

    /// The first occurrence strictly after `after_ms` (unix milliseconds),
    /// or `None` if there is none (a pattern that can never match again).
    pub(crate) fn next_after(&self, after_ms: i64) -> Option<i64> {
        let after = DateTime::<Utc>::from_timestamp_millis(after_ms)?;
        let next = match self.timezone {
            None => self
                .cron
                .find_next_occurrence(&after, false)
                .ok()?
                .timestamp_millis(),
            Some(tz) => self
                .cron
                .find_next_occurrence(&after.with_timezone(&tz), false)
                .ok()?
                .timestamp_millis(),
        };
        // Occurrences fall on whole seconds; never return `after` itself.
        (next > after_ms).then_some(next)
    }

    /// The gap between the two occurrences following `at_ms`: the interval
    /// the health check allows twice over.
    pub(crate) fn interval_after(&self, at_ms: i64) -> Option<Duration> {
        let first = self.next_after(at_ms)?;
        let second = self.next_after(first)?;
        Some(Duration::from_millis((second - first).max(0) as u64))
    }
}

/// Parses a 5- or 6-field pattern (or a nickname); years are not accepted.
pub(crate) fn parse_pattern(pattern: &str) -> Result<Cron, ScheduleError> {
    let fields = pattern.split_whitespace().count();
    let nickname = pattern.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields) {
        return Err(ScheduleError::Pattern {
            pattern: pattern.to_owned(),
            reason: format!("expected 5 or 6 fields, found {fields}"),
        });
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(pattern)
        .map_err(|error| ScheduleError::Pattern {
            pattern: pattern.to_owned(),
            reason: error.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn five_and_six_fields_parse_others_do_not() {
        assert!(Schedule::parse("*/5 * * * *", None).is_ok());
        assert!(Schedule::parse("*/10 * * * * *", None).is_ok());
        assert!(Schedule::parse("@daily", None).is_ok());
        assert!(matches!(
            Schedule::parse("* * * *", None),
            Err(ScheduleError::Pattern { .. })
        ));
        assert!(matches!(
            Schedule::parse("0 0 0 1 1 * 2030", None),
            Err(ScheduleError::Pattern { .. })
        ));
        assert!(matches!(
            Schedule::parse("61 * * * *", None),
            Err(ScheduleError::Pattern { .. })
        ));
        assert_eq!(
            Schedule::parse("* * * * *", Some("Mars/Olympus")).unwrap_err(),
            ScheduleError::Timezone("Mars/Olympus".to_owned())
        );
    }

    #[test]
    fn the_next_occurrence_is_strictly_later() {
        let every_second = Schedule::parse("* * * * * *", None).unwrap();
        let t = ms("2026-03-01T10:00:00Z");
        assert_eq!(every_second.next_after(t), Some(t + 1000));
        assert_eq!(every_second.next_after(t + 400), Some(t + 1000));
        let five_minutes = Schedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(
            five_minutes.next_after(t + 1),
            Some(ms("2026-03-01T10:05:00Z"))
        );
        assert_eq!(
            five_minutes.interval_after(t),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn a_timezone_moves_the_wall_clock_hour() {
        let paris = Schedule::parse("0 9 * * *", Some("Europe/Paris")).unwrap();
        // Winter: UTC+1.
        assert_eq!(
            paris.next_after(ms("2026-01-10T00:00:00Z")),
            Some(ms("2026-01-10T08:00:00Z"))
        );
        // Summer: UTC+2.
        assert_eq!(
            paris.next_after(ms("2026-07-10T00:00:00Z")),
            Some(ms("2026-07-10T07:00:00Z"))
        );
    }

    #[test]
    fn dst_gaps_and_overlaps_fire_once() {
        // 2026-03-29 02:30 does not exist in Paris (02:00 CET -> 03:00 CEST):
        // a fixed-time job runs once, when the gap ends (03:00 CEST).
        let gap = Schedule::parse("30 2 * * *", Some("Europe/Paris")).unwrap();
        let first = gap.next_after(ms("2026-03-28T12:00:00Z")).unwrap();
        assert_eq!(first, ms("2026-03-29T01:00:00Z"));
        assert_eq!(gap.next_after(first), Some(ms("2026-03-30T00:30:00Z")));
        // 2026-10-25 02:30 happens twice in Paris (03:00 CEST -> 02:00 CET):
        // a fixed-time job runs on the first pass only.
        let overlap = Schedule::parse("30 2 * * *", Some("Europe/Paris")).unwrap();
        let first = overlap.next_after(ms("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(first, ms("2026-10-25T00:30:00Z"));
        assert_eq!(overlap.next_after(first), Some(ms("2026-10-26T01:30:00Z")));
        // An interval job keeps its pace in real time through the repeated hour.
        let half_hourly = Schedule::parse("*/30 * * * *", Some("Europe/Paris")).unwrap();
        let mut at = ms("2026-10-25T00:10:00Z");
        let mut seen = Vec::new();
        for _ in 0..4 {
            at = half_hourly.next_after(at).unwrap();
            seen.push(at);
        }
        assert_eq!(
            seen,
            [
                ms("2026-10-25T00:30:00Z"),
                ms("2026-10-25T01:00:00Z"),
                ms("2026-10-25T01:30:00Z"),
                ms("2026-10-25T02:00:00Z"),
            ]
        );
    }
}
