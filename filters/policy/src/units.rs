//! Parsing of the policy's human units.
//!
//! Durations `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`; rates
//! `"60k/min"`, `"600/min"`, `"5M/day"`; counts `"50k"`; percentages `"20%"`;
//! byte sizes `"256KiB"`. Each parser returns a message that says what was
//! expected, which the decoder turns into a located diagnostic.

use std::time::Duration;

use sluice_core::units::{Rate, Ratio};

/// A duration: a non-negative number and one of `ms`, `s`, `m`, `h`, `d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let millis_per_unit: f64 = match unit.trim() {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        "" => return Err(format!("`{s}` has no unit")),
        other => return Err(format!("`{other}` is not a duration unit")),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    let millis = n * millis_per_unit;
    if !millis.is_finite() || millis > 1e15 {
        return Err(format!("`{s}` is too long"));
    }
    Ok(Duration::from_millis(millis.round() as u64))
}

/// A count with an optional `k`, `M` or `G` suffix (`"50k"`, `"1.5M"`).
pub fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, scale) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1e3),
        Some('M') => (&s[..s.len() - 1], 1e6),
        Some('G') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let n: f64 = number
        .replace('_', "")
        .parse()
        .map_err(|_| format!("`{s}` is not a count"))?;
    let value = n * scale;
    if !value.is_finite() || value < 0.0 || value > u64::MAX as f64 / 2.0 {
        return Err(format!("`{s}` is out of range"));
    }
    if (value - value.round()).abs() > 1e-6 {
        return Err(format!("`{s}` is not a whole number"));
    }
    Ok(value.round() as u64)
}

/// A rate: a count, `/`, and a period (`s`, `min`, `hour`, `day`, or a duration).
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let Some((amount, period)) = s.split_once('/') else {
        return Err(format!("`{s}` has no `/period`"));
    };
    let amount = parse_count(amount)?;
    let period = match period.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3_600),
        "d" | "day" => Duration::from_secs(86_400),
        other => parse_duration(other).map_err(|_| format!("`{other}` is not a period"))?,
    };
    if period.is_zero() {
        return Err("the period is zero".into());
    }
    Ok(Rate { amount, period })
}

/// A percentage between 0% and 100%.
pub fn parse_percent(s: &str) -> Result<Ratio, String> {
    let Some(number) = s.trim().strip_suffix('%') else {
        return Err(format!("`{s}` has no `%`"));
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage"))?;
    Ratio::from_percent(n).ok_or_else(|| format!("`{s}` is not between 0% and 100%"))
}

/// A byte size: a count and `B`, `KiB`, `MiB`, `GiB` (or `KB`, `MB`, `GB`, powers of 1000).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("`{other}` is not a size unit")),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("30 parsecs")
                .unwrap_err()
                .contains("not a duration unit")
        );
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn rates_and_counts() {
        assert_eq!(
            parse_rate("60k/min"),
            Ok(Rate {
                amount: 60_000,
                period: Duration::from_secs(60)
            })
        );
        assert_eq!(parse_rate("5M/day").map(|r| r.amount), Ok(5_000_000));
        assert_eq!(
            parse_rate("10/5m").map(|r| r.period),
            Ok(Duration::from_secs(300))
        );
        assert!(parse_rate("60k").unwrap_err().contains("/period"));
        assert!(parse_rate("60k/fortnight").is_err());
        assert!(parse_rate("1/0s").is_err());
        assert_eq!(parse_count("1.5M"), Ok(1_500_000));
        assert!(parse_count("1.5").is_err());
    }

    #[test]
    fn percents_and_sizes() {
        assert_eq!(parse_percent("20%").map(Ratio::get), Ok(0.2));
        assert!(parse_percent("0.2").is_err());
        assert!(parse_percent("120%").is_err());
        assert_eq!(parse_bytes("256KiB"), Ok(262_144));
        assert_eq!(parse_bytes("1MB"), Ok(1_000_000));
        assert!(parse_bytes("1 parsec").is_err());
    }

    proptest! {
        #[test]
        fn printed_durations_parse_back(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            let printed = sluice_core::units::HumanDuration(d).to_string();
            prop_assert_eq!(parse_duration(&printed), Ok(d));
        }

        #[test]
        fn printed_rates_parse_back(amount in 0u64..10_000_000_000, period in prop::sample::select(vec![1u64, 60, 3600, 86_400, 300])) {
            let r = Rate { amount, period: Duration::from_secs(period) };
            prop_assert_eq!(parse_rate(&r.to_string()), Ok(r));
        }

        #[test]
        fn parsers_never_panic(s in "\\PC{0,12}") {
            let _ = parse_duration(&s);
            let _ = parse_rate(&s);
            let _ = parse_percent(&s);
            let _ = parse_bytes(&s);
            let _ = parse_count(&s);
        }
    }
}
