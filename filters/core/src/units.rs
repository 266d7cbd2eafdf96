//! Quantities a policy speaks in: ratios, token rates and counts.
//!
//! They are plain values once validated; parsing their human spelling
//! (`"20%"`, `"60k/min"`) is the policy crate's job, printing it back is here
//! so that every tool shows the same spelling.

use std::fmt;
use std::time::Duration;

use serde::{Serialize, Serializer};

/// A fraction in `[0, 1]`, spelled as a percentage (`"20%"`).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Ratio(f64);

impl Ratio {
    /// The ratio `value`, or `None` when it is not a finite number in `[0, 1]`.
    pub fn new(value: f64) -> Option<Self> {
        (value.is_finite() && (0.0..=1.0).contains(&value)).then_some(Self(value))
    }

    /// The ratio `percent / 100`, or `None` outside `[0, 100]`.
    pub fn from_percent(percent: f64) -> Option<Self> {
        Self::new(percent / 100.0)
    }

    /// A whole percentage, capped at 100%; for constants.
    pub const fn percent(p: u8) -> Self {
        let p = if p > 100 { 100 } else { p };
        Self(p as f64 / 100.0)
    }

    /// The fraction, in `[0, 1]`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = self.0 * 100.0;
        if (percent - percent.round()).abs() < 1e-9 {
            write!(f, "{}%", percent.round())
        } else {
            write!(f, "{percent}%")
        }
    }
}

impl Serialize for Ratio {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An amount allowed per period: `"60k/min"` is 60,000 per minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// How many units (tokens or requests) the period allows.
    pub amount: u64,
    /// The length of the period; never zero.
    pub period: Duration,
}

impl Rate {
    /// The amount scaled to one second, as a float (for explanations and
    /// comparisons between rates of different periods).
    pub fn per_second(&self) -> f64 {
        self.amount as f64 / self.period.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let period = match self.period.as_secs() {
            1 => "s".to_string(),
            60 => "min".to_string(),
            3600 => "hour".to_string(),
            86_400 => "day".to_string(),
            _ => format!("{}", HumanDuration(self.period)),
        };
        write!(f, "{}/{}", Count(self.amount), period)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A count printed with a `k`/`M`/`G` suffix when that is exact (`60000` → `60k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Count(pub u64);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, suffix) in [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")] {
            if n >= unit && n.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", n / unit);
            }
        }
        write!(f, "{n}")
    }
}

/// A duration printed in the policy's spelling (`250ms`, `30s`, `5m`, `2h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0s");
        }
        for (unit, suffix) in [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ] {
            if ms.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", ms / unit);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// Serializes a [`Duration`] in the policy's spelling; for `#[serde(serialize_with)]`.
pub fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&HumanDuration(*d))
}

/// A byte size printed with binary units (`256KiB`, `1MiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, suffix) in [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if n >= unit && n.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", n / unit);
            }
        }
        write!(f, "{n}B")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_human_spellings() {
        assert_eq!(Ratio::from_percent(20.0).unwrap().to_string(), "20%");
        assert_eq!(Ratio::from_percent(12.5).unwrap().to_string(), "12.5%");
        assert_eq!(
            Rate {
                amount: 60_000,
                period: Duration::from_secs(60)
            }
            .to_string(),
            "60k/min"
        );
        assert_eq!(
            Rate {
                amount: 5_000_000,
                period: Duration::from_secs(86_400)
            }
            .to_string(),
            "5M/day"
        );
        assert_eq!(
            HumanDuration(Duration::from_millis(250)).to_string(),
            "250ms"
        );
        assert_eq!(HumanDuration(Duration::from_secs(300)).to_string(), "5m");
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(ByteSize(256 * 1024).to_string(), "256KiB");
        assert_eq!(Count(1234).to_string(), "1234");
    }

    #[test]
    fn ratio_rejects_out_of_range() {
        assert!(Ratio::new(1.01).is_none());
        assert!(Ratio::new(-0.1).is_none());
        assert!(Ratio::new(f64::NAN).is_none());
    }
}
