//! Provider quota readings: how much of its rate limit an upstream says is
//! left, before it starts refusing.
//!
//! Hosted APIs report their limits on every answer, not only on a 429:
//! OpenAI (and the servers that copy it) sends `x-ratelimit-limit-requests`
//! and `x-ratelimit-remaining-requests` (and `-tokens`), with a reset as a
//! Go duration (`x-ratelimit-reset-requests: 6m0s`); Anthropic sends
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,
//! remaining,reset}`, the reset as an RFC 3339 instant. Remaining over limit,
//! the tightest of them, is the zone's headroom: falling toward zero, it
//! moves traffic before the first refusal.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outlier::reset::{go_duration, rfc3339};
use crate::time::Timestamp;

/// The limits read, by the names of their three headers.
const LIMITS: [[&str; 3]; 6] = [
    [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-requests",
        "x-ratelimit-reset-requests",
    ],
    [
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-reset-tokens",
    ],
    [
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-reset",
    ],
    [
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-reset",
    ],
    [
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-reset",
    ],
];

/// How long a reading counts when its answer names no reset time: a limit
/// window is typically a minute, and a reading older than that says
/// nothing of the next one.
pub const READING_TTL: Duration = Duration::from_secs(60);

/// Readings closer than this describe the same moment of the quota.
pub const SAME_MOMENT: Duration = Duration::from_secs(1);

/// The tightest limit an answer reported.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Headroom {
    /// Remaining over limit, in [0, 1].
    pub left: f64,
    /// The request limit's remaining count and size, when the answer gave
    /// one: requests already sent and not answered will take from it.
    #[serde(default)]
    pub requests: Option<(u64, u64)>,
    /// When it was read.
    pub at: Timestamp,
    /// When the limit resets (the reading no longer holds after it).
    pub until: Timestamp,
}

impl Headroom {
    /// The share of the quota in use at `now`, if the reading still holds,
    /// counting `in_flight` requests sent since as used.
    pub fn used(&self, now: Timestamp, in_flight: u32) -> Option<f64> {
        let pending = self.requests.map_or(0.0, |(remaining, limit)| {
            (u64::from(in_flight).min(remaining) as f64) / limit as f64
        });
        (now < self.until).then_some((1.0 - self.left + pending).min(1.0))
    }

    /// What two readings say of the quota now: the newer, unless they
    /// were read within [`SAME_MOMENT`] of each other, then the tighter
    /// (endpoints of one zone answer in any order, and the one closest to
    /// its limit is the one about to refuse).
    pub fn newer(a: Option<Headroom>, b: Option<Headroom>) -> Option<Headroom> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let (old, new) = if b.at >= a.at { (a, b) } else { (b, a) };
                Some(
                    if new.at.since(old.at) <= SAME_MOMENT && old.left < new.left {
                        old
                    } else {
                        new
                    },
                )
            }
            (a, b) => a.or(b),
        }
    }
}

/// Reads an answer's rate-limit headers (`header(name)` → raw value).
/// `None` when no limit parses; a limit of 0 or a remaining count above
/// its limit is ignored as nonsense.
pub fn headroom<'a>(header: impl Fn(&str) -> Option<&'a [u8]>, now: Timestamp) -> Option<Headroom> {
    let text = |name: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let mut tightest: Option<Headroom> = None;
    let mut requests: Option<(u64, u64)> = None;
    for (k, [remaining, limit, reset]) in LIMITS.into_iter().enumerate() {
        let (Some(remaining), Some(limit)) = (
            text(remaining).and_then(|v| v.parse::<u64>().ok()),
            text(limit).and_then(|v| v.parse::<u64>().ok()),
        ) else {
            continue;
        };
        if limit == 0 || remaining > limit {
            continue;
        }
        let left = remaining as f64 / limit as f64;
        // The OpenAI and Anthropic request limits (LIMITS' rows 0 and 2).
        if k % 2 == 0 && k < 4 {
            requests = Some((remaining, limit));
        }
        let resets_in = text(reset)
            .and_then(|v| go_duration(v).or_else(|| rfc3339(v).map(|t| t.since(now))))
            .unwrap_or(READING_TTL)
            .min(READING_TTL);
        let reading = Headroom {
            left,
            requests: None,
            at: now,
            until: now + resets_in,
        };
        if tightest.is_none_or(|t| reading.left < t.left) {
            tightest = Some(reading);
        }
    }
    tightest.map(|t| Headroom { requests, ..t })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_795_978_959_000_000_000); // 2026-11-29T19:02:39Z

    fn read(pairs: &[(&str, &str)]) -> Option<Headroom> {
        headroom(
            |name| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.as_bytes())
            },
            NOW,
        )
    }

    #[test]
    fn the_tightest_openai_limit_wins_and_ends_at_its_reset() {
        let h = read(&[
            ("x-ratelimit-limit-requests", "100"),
            ("x-ratelimit-remaining-requests", "60"),
            ("x-ratelimit-reset-requests", "20s"),
            ("x-ratelimit-limit-tokens", "10000"),
            ("x-ratelimit-remaining-tokens", "500"),
            ("x-ratelimit-reset-tokens", "1.5s"),
        ])
        .unwrap();
        assert!((h.left - 0.05).abs() < 1e-12);
        assert_eq!(h.until, NOW + Duration::from_millis(1500));
        assert_eq!(h.used(NOW, 0), Some(0.95));
        assert_eq!(h.used(NOW + Duration::from_secs(2), 0), None);
        // 60 requests of 100 left: 10 sent and unanswered take 10% more,
        // past the tokens' 95%: all of it.
        assert_eq!(h.requests, Some((60, 100)));
        assert_eq!(h.used(NOW, 10), Some(1.0));
    }

    #[test]
    fn anthropic_resets_are_instants() {
        let h = read(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2026-11-29T19:02:49Z"),
        ])
        .unwrap();
        assert_eq!(h.left, 0.0);
        assert_eq!(h.until, NOW + Duration::from_secs(10));
    }

    #[test]
    fn nonsense_is_ignored_and_a_missing_reset_expires_in_a_minute() {
        for bad in [
            vec![
                ("x-ratelimit-limit-requests", "0"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
            vec![
                ("x-ratelimit-limit-requests", "10"),
                ("x-ratelimit-remaining-requests", "11"),
            ],
            vec![
                ("x-ratelimit-limit-requests", "ten"),
                ("x-ratelimit-remaining-requests", "1"),
            ],
            vec![("x-ratelimit-remaining-requests", "1")],
            vec![
                ("x-ratelimit-limit-requests", "-1"),
                ("x-ratelimit-remaining-requests", "-1"),
            ],
        ] {
            assert_eq!(read(&bad), None, "{bad:?}");
        }
        let h = read(&[
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "yesterday"),
        ])
        .unwrap();
        assert_eq!(h.until, NOW + READING_TTL);
        // A reset far away is capped: the reading is refreshed by then.
        let h = read(&[
            ("x-ratelimit-limit-requests", "10"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-reset-requests", "6h0m0s"),
        ])
        .unwrap();
        assert_eq!(h.until, NOW + READING_TTL);
    }

    #[test]
    fn non_utf8_values_read_as_absent() {
        let h = headroom(
            |name| match name {
                "x-ratelimit-limit-requests" => Some(b"\xff\xfe".as_slice()),
                "x-ratelimit-remaining-requests" => Some(b"1".as_slice()),
                _ => None,
            },
            NOW,
        );
        assert_eq!(h, None);
    }

    #[test]
    fn the_newer_reading_describes_the_quota() {
        let old = Headroom {
            left: 0.0,
            requests: None,
            at: NOW,
            until: NOW + READING_TTL,
        };
        let new = Headroom {
            left: 0.9,
            requests: None,
            at: NOW + Duration::from_secs(1),
            until: NOW + READING_TTL,
        };
        // A second apart: the tighter one is the quota now.
        assert_eq!(Headroom::newer(Some(old), Some(new)), Some(old));
        assert_eq!(Headroom::newer(Some(new), Some(old)), Some(old));
        assert_eq!(Headroom::newer(None, Some(old)), Some(old));
        // Later than that, the newer one (a window reset).
        let later = Headroom {
            at: NOW + Duration::from_millis(1001),
            ..new
        };
        assert_eq!(Headroom::newer(Some(old), Some(later)), Some(later));
    }
}
