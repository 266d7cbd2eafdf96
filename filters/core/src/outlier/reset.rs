//! When a rate-limited endpoint says it will take requests again.
//!
//! A 429 usually names its own end: `retry-after` (seconds or an HTTP date),
//! `retry-after-ms` (Azure OpenAI), OpenAI's `x-ratelimit-reset-requests` /
//! `-tokens` (Go-style durations: `1s`, `6m0s`, `20ms`), Anthropic's
//! `anthropic-ratelimit-*-reset` (RFC 3339 instants). Parsed by hand: three
//! small grammars do not justify a date crate inside the filter.

use std::time::Duration;

use crate::time::Timestamp;

/// Headers that carry a reset time, as the answer's headers are searched.
pub const RESET_HEADERS: [&str; 9] = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
    "anthropic-ratelimit-unified-reset",
];

/// How long the endpoint asked not to be sent requests, from its answer's
/// headers (`header(name)` → raw value). An explicit `retry-after(-ms)`
/// wins; otherwise the latest of the limit resets (whichever limit was hit
/// ends last at the latest). `None` when no header parses.
pub fn cooldown<'a>(header: impl Fn(&str) -> Option<&'a [u8]>, now: Timestamp) -> Option<Duration> {
    let text = |name: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(1e9)));
    }
    if let Some(d) = text("retry-after").and_then(|v| retry_after(v, now)) {
        return Some(d);
    }
    RESET_HEADERS[2..]
        .iter()
        .filter_map(|name| {
            let v = text(name)?;
            go_duration(v).or_else(|| rfc3339(v).map(|t| t.since(now)))
        })
        .max()
}

/// `retry-after`: delta-seconds or an IMF-fixdate (`Sun, 06 Nov 1994
/// 08:49:37 GMT`).
fn retry_after(v: &str, now: Timestamp) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let mut parts = v.split_whitespace().skip(1);
    let day: u64 = parts.next()?.parse().ok()?;
    let month = month_number(parts.next()?)?;
    let year: u64 = parts.next()?.parse().ok()?;
    let secs = clock_seconds(parts.next()?)?;
    (parts.next()? == "GMT").then_some(())?;
    Some(Timestamp::from_civil(year, month, day, secs, 0)?.since(now))
}

/// Go's `time.Duration` spelling as OpenAI sends it: `1s`, `6m0s`, `1h2m3s`,
/// `20ms`, `0.5s`.
pub(crate) fn go_duration(v: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = v;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(1e9)))
}

/// An RFC 3339 instant: `2026-11-29T19:02:39Z`, `…39.5Z`, `…39+01:00`.
pub fn rfc3339(v: &str) -> Option<Timestamp> {
    let b = v.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year: u64 = v.get(0..4)?.parse().ok()?;
    let month: u64 = v.get(5..7)?.parse().ok()?;
    let day: u64 = v.get(8..10)?.parse().ok()?;
    let secs = clock_seconds(v.get(11..19)?)?;
    let mut rest = v.get(19..)?;
    let mut nanos = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let end = frac
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(frac.len());
        let digits = &frac[..end.min(9)];
        nanos = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
        rest = &frac[end..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            (rest.len() == 6).then_some(())?;
            sign * (h * 3600 + m * 60)
        }
    };
    let utc = Timestamp::from_civil(year, month, day, secs, nanos)?;
    Some(if offset >= 0 {
        utc - Duration::from_secs(offset.unsigned_abs())
    } else {
        utc + Duration::from_secs(offset.unsigned_abs())
    })
}

fn month_number(name: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|m| *m == name).map(|i| i as u64 + 1)
}

/// `HH:MM:SS` → seconds of the day.
fn clock_seconds(v: &str) -> Option<u64> {
    let mut it = v.split(':');
    let h: u64 = it.next()?.parse().ok()?;
    let m: u64 = it.next()?.parse().ok()?;
    let s: u64 = it.next()?.parse().ok()?;
    // Checked before the sum is made: `then_some` would compute it first,
    // and overflow on a huge field (found by the fuzzer).
    if it.next().is_none() && h < 24 && m < 60 && s <= 60 {
        Some(h * 3600 + m * 60 + s)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a [u8]> {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    const NOW: Timestamp = Timestamp(1_795_978_959_000_000_000); // 2026-11-29T19:02:39Z

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(
            cooldown(headers(&[("retry-after", "5")]), NOW),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            cooldown(
                headers(&[("retry-after", "Sun, 29 Nov 2026 19:02:49 GMT")]),
                NOW
            ),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            cooldown(
                headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
                NOW
            ),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn openai_resets_are_go_durations_and_the_latest_counts() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(go_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration("5"), None);
        assert_eq!(go_duration("s"), None);
        assert_eq!(go_duration(""), None);
        assert_eq!(
            cooldown(
                headers(&[
                    ("x-ratelimit-reset-requests", "1s"),
                    ("x-ratelimit-reset-tokens", "6s")
                ]),
                NOW
            ),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn anthropic_resets_are_instants() {
        assert_eq!(rfc3339("2026-11-29T19:02:39Z"), Some(NOW));
        assert_eq!(
            rfc3339("2026-11-29T20:02:39.5+01:00"),
            Some(NOW + Duration::from_millis(500))
        );
        assert_eq!(
            cooldown(
                headers(&[("anthropic-ratelimit-requests-reset", "2026-11-29T19:02:44Z")]),
                NOW
            ),
            Some(Duration::from_secs(5))
        );
        // An instant already past: no wait at all.
        assert_eq!(
            cooldown(
                headers(&[("anthropic-ratelimit-tokens-reset", "2020-01-01T00:00:00Z")]),
                NOW
            ),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_is_no_hint_and_never_panics() {
        for v in [
            "",
            "-1",
            "abc",
            "1e999",
            "NaN",
            "2026-13-01T00:00:00Z",
            "9999999999999999999999",
            "Sun, 99 Foo 2026 99:99:99 GMT",
            "2026-11-29T19:02:39",
            "2026-11-29T19:02:39+1",
            "\u{00e9}\u{00e9}\u{00e9}\u{00e9}-11-29T19:02:39Z",
            // The fuzzer's: a clock field past u64 once summed.
            ", 60 Nov 6 1:0:18446744073709551615",
            "Sun, 29 Nov 2026 23:59:18446744073709551615 GMT",
        ] {
            for name in RESET_HEADERS {
                let _ = cooldown(headers(&[(name, v)]), NOW);
            }
            assert_eq!(
                cooldown(headers(&[("x-ratelimit-reset-requests", v)]), NOW),
                None,
                "{v}"
            );
        }
        assert_eq!(cooldown(|_| Some(&[0xff, 0xfe][..]), NOW), None);
    }
}
