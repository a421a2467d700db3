//! The wall clock of the rules that follow the calendar: `tokens_per_day`, budgets per
//! period (`limit_reset`) and key expiry (`expires_at`), and the UTC calendar they use.
//!
//! A [`Clock`] is the system clock unless a test (or an embedder) gives the stores,
//! [`AuthLayer`](crate::auth::AuthLayer) and
//! [`GatewayBuilder`](crate::gateway::GatewayBuilder) one of its own: a
//! [`ManualClock`] moves across midnight, a Monday or the first of a month at once,
//! without sleeping.
//!
//! # Example
//! ```
//! use switchboard::clock::{month_start, utc_day, week_start, ManualClock};
//!
//! // Sunday 2025-03-02, 23:59:59 UTC.
//! let manual = ManualClock::new(1_740_959_999);
//! let clock = manual.clock();
//! let sunday = clock.day();
//! assert_eq!(week_start(sunday), sunday - 6); // weeks run Monday to Sunday
//! assert_eq!(month_start(sunday), utc_day(1_740_787_200)); // 2025-03-01
//! assert_eq!(clock.until_midnight().as_secs(), 1);
//! manual.advance(1); // Monday 00:00:00: a new day and a new week
//! assert_eq!(clock.day(), sunday + 1);
//! assert_eq!(week_start(clock.day()), clock.day());
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Seconds in a UTC day.
const DAY: u64 = 86_400;

/// A source of Unix seconds: the system clock by default. Cheap to clone.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<dyn Fn() -> u64 + Send + Sync>>);

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("Clock(system)"),
            Some(_) => write!(f, "Clock(custom, now = {})", self.now()),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that reads `now` (Unix seconds) each time it is asked.
    pub fn from_fn(now: impl Fn() -> u64 + Send + Sync + 'static) -> Clock {
        Clock(Some(Arc::new(now)))
    }

    /// Unix seconds now.
    pub fn now(&self) -> u64 {
        match &self.0 {
            None => crate::store::now_unix(),
            Some(f) => f(),
        }
    }

    /// Today's UTC day number (days since 1970-01-01).
    pub fn day(&self) -> u64 {
        utc_day(self.now())
    }

    /// How long until the next UTC midnight (when `tokens_per_day` and daily budgets
    /// start over).
    pub fn until_midnight(&self) -> Duration {
        Duration::from_secs(DAY - self.now() % DAY)
    }
}

/// A clock a test sets by hand; [`clock`](ManualClock::clock) gives the [`Clock`] to
/// hand to the stores and auth (every copy reads the same time).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock standing at `unix` seconds.
    pub fn new(unix: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(unix)))
    }

    /// The time it shows.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets it to `unix` seconds.
    pub fn set(&self, unix: u64) {
        self.0.store(unix, Ordering::SeqCst);
    }

    /// Moves it `secs` seconds on.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }

    /// A [`Clock`] that reads this one.
    pub fn clock(&self) -> Clock {
        let at = self.0.clone();
        Clock::from_fn(move || at.load(Ordering::SeqCst))
    }
}

/// The UTC day number (days since 1970-01-01) of Unix seconds `unix`.
pub fn utc_day(unix: u64) -> u64 {
    unix / DAY
}

/// The first day (a Monday) of the week of UTC day `day`: weeks run Monday to Sunday.
pub fn week_start(day: u64) -> u64 {
    // Day 0, 1970-01-01, was a Thursday: 3 days after a Monday.
    let since_monday = (day + 3) % 7;
    day.saturating_sub(since_monday)
}

/// The first day of the calendar month of UTC day `day`.
pub fn month_start(day: u64) -> u64 {
    match date(day) {
        Some(d) => day - (u64::from(d.day()) - 1),
        None => day,
    }
}

/// The Julian day number of 1970-01-01.
const UNIX_EPOCH_JULIAN_DAY: i64 = 2_440_588;

fn date(day: u64) -> Option<time::Date> {
    let julian = i64::try_from(day)
        .ok()?
        .checked_add(UNIX_EPOCH_JULIAN_DAY)?;
    time::Date::from_julian_day(i32::try_from(julian).ok()?).ok()
}

/// Parses an RFC 3339 time (`2025-12-31T23:59:59Z`, `2026-01-01T01:00:00+01:00`)
/// into Unix seconds; a fraction of a second counts as the whole next second.
/// Times before 1970 are refused.
pub fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let t =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .map_err(|e| {
                format!("`{text}` is not an RFC 3339 time like 2026-01-31T00:00:00Z ({e})")
            })?;
    let secs = u64::try_from(t.unix_timestamp())
        .map_err(|_| format!("`{text}` is before 1970-01-01T00:00:00Z"))?;
    Ok(secs + u64::from(t.nanosecond() > 0))
}

/// Unix seconds as RFC 3339 in UTC (`2026-01-31T00:00:00Z`).
pub fn format_rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|u| time::OffsetDateTime::from_unix_timestamp(u).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a UTC date at midnight.
    fn at(text: &str) -> u64 {
        parse_rfc3339(&format!("{text}T00:00:00Z")).unwrap()
    }

    #[test]
    fn weeks_start_on_monday() {
        // 2025-03-03 was a Monday.
        let monday = utc_day(at("2025-03-03"));
        for d in 0..7 {
            assert_eq!(week_start(monday + d), monday, "{d}");
        }
        assert_eq!(week_start(monday + 7), monday + 7);
        assert_eq!(week_start(monday - 1), monday - 7);
        // 1970-01-01 (Thursday) belongs to the week of Monday 1969-12-29.
        assert_eq!(week_start(0), 0);
        assert_eq!(week_start(4), 4);
    }

    #[test]
    fn months_are_calendar_months() {
        for (day, first) in [
            ("2025-01-31", "2025-01-01"),
            ("2025-02-01", "2025-02-01"),
            ("2025-02-28", "2025-02-01"),
            ("2024-02-29", "2024-02-01"),
            ("2024-03-01", "2024-03-01"),
            ("2025-12-31", "2025-12-01"),
            ("1970-01-15", "1970-01-01"),
        ] {
            assert_eq!(month_start(utc_day(at(day))), utc_day(at(first)), "{day}");
        }
    }

    #[test]
    fn rfc3339_in_and_out() {
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00Z"), Ok(86_400));
        assert_eq!(parse_rfc3339("1970-01-02T01:00:00+01:00"), Ok(86_400));
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00.25Z"), Ok(86_401));
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").is_err());
        assert!(parse_rfc3339("tomorrow").unwrap_err().contains("RFC 3339"));
        assert!(parse_rfc3339("2025-13-01T00:00:00Z").is_err());
        assert_eq!(format_rfc3339(86_400), "1970-01-02T00:00:00Z");
        let t = parse_rfc3339("2031-07-04T12:34:56Z").unwrap();
        assert_eq!(format_rfc3339(t), "2031-07-04T12:34:56Z");
    }

    #[test]
    fn a_manual_clock_is_shared_by_its_copies() {
        let manual = ManualClock::new(86_399);
        let (a, b) = (manual.clock(), manual.clock());
        assert_eq!((a.day(), a.until_midnight().as_secs()), (0, 1));
        manual.advance(1);
        assert_eq!((b.now(), b.day()), (86_400, 1));
        assert_eq!(b.until_midnight().as_secs(), 86_400);
        assert!(Clock::system().now() > 1_700_000_000);
    }
}
