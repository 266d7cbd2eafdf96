//! Time as the algorithms see it: a timestamp handed in by the caller.
//!
//! Algorithms never read a clock. A filter passes the host's
//! `get_current_time` (wall clock, nanoseconds since the Unix epoch), a test
//! passes whatever it likes. Arithmetic saturates, so a clock that jumps
//! backwards yields zero elapsed time, never a panic or a wrap.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    pub fn from_millis(millis: u64) -> Self {
        Self(millis.saturating_mul(1_000_000))
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed since `earlier`; zero when `earlier` is later (the clock
    /// went backwards).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Timestamp {
    /// The instant in RFC 3339, UTC, to the second (rounded up, so a client
    /// waiting until then is never early): `2026-11-29T19:02:39Z`.
    pub fn rfc3339(self) -> String {
        let secs = self.0.div_ceil(1_000_000_000);
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    }
}

impl Timestamp {
    /// The instant of a civil UTC date and time, `secs` into the day
    /// (Howard Hinnant's `days_from_civil`, the inverse of
    /// [`civil_from_days`]); `None` outside 1970–9999 or for a month or
    /// day out of range.
    pub fn from_civil(year: u64, month: u64, day: u64, secs: u64, nanos: u64) -> Option<Self> {
        if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day)
        {
            return None;
        }
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let yoe = y - era * 400;
        let mp = if month > 2 { month - 3 } else { month + 9 };
        let doy = (153 * mp + 2) / 5 + day - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = (era * 146_097 + doe).checked_sub(719_468)?;
        let total = days.checked_mul(86_400)?.checked_add(secs)?;
        Some(Timestamp(
            total.checked_mul(1_000_000_000)?.checked_add(nanos)?,
        ))
    }
}

/// (year, month, day) of a day count since 1970-01-01, in the proleptic
/// Gregorian calendar (Howard Hinnant's `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// `t + d`, saturating.
impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }
}

/// `t - d`, saturating at zero.
impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;

    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_nanos(d)))
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (584 years).
pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(Timestamp::ZERO.rfc3339(), "1970-01-01T00:00:00Z");
        // `date -u -d @1795978959` → 2026-11-29 19:02:39.
        assert_eq!(
            Timestamp::from_millis(1_795_978_959_000).rfc3339(),
            "2026-11-29T19:02:39Z"
        );
        // Leap day, and rounding up to the next second.
        assert_eq!(
            Timestamp::from_millis(951_782_399_001).rfc3339(),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn civil_dates_round_trip() {
        for secs in [0u64, 951_782_400, 1_795_978_959, 4_102_444_800] {
            let t = Timestamp::from_millis(secs * 1000);
            let (y, m, d) = civil_from_days(secs / 86_400);
            assert_eq!(Timestamp::from_civil(y, m, d, secs % 86_400, 0), Some(t));
        }
        assert_eq!(Timestamp::from_civil(2026, 13, 1, 0, 0), None);
        assert_eq!(Timestamp::from_civil(1969, 12, 31, 0, 0), None);
    }

    #[test]
    fn backwards_clock_is_zero_elapsed() {
        let later = Timestamp::from_millis(2_000);
        let earlier = Timestamp::from_millis(1_000);
        assert_eq!(later.since(earlier), Duration::from_secs(1));
        assert_eq!(earlier.since(later), Duration::ZERO);
        assert_eq!(
            Timestamp(u64::MAX) + Duration::from_secs(1),
            Timestamp(u64::MAX)
        );
        assert_eq!(Timestamp::ZERO - Duration::from_secs(1), Timestamp::ZERO);
    }
}
