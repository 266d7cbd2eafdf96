//! How long a simulated inference takes and how many tokens it produces.
//!
//! A real server spends a prefill phase on the prompt before the first token
//! (so time to first token grows with prompt length), then decodes tokens at a
//! roughly steady rate. sluice's outlier detection and token-aware limits key on
//! exactly these two numbers, so the simulator models them and nothing else:
//!
//! ```text
//! TTFT          = base + per_prompt_token × prompt_tokens + added (fault)
//! token i at    = TTFT + i / rate          (i = 0 .. n-1)
//! n             = min(max_tokens, default output length)
//! ```
//!
//! Token counts are deterministic: the prompt estimate is ceil(chars / 4)
//! (the usual rule of thumb for English BPE tokenizers) and each generated
//! token is one short word, so `usage` always equals what was produced.

use std::time::Duration;

use thiserror::Error;

/// A timing flag out of range.
#[derive(Debug, Error, PartialEq)]
pub enum TimingError {
    /// A duration or rate that is negative, NaN or infinite.
    #[error("{name} must be a finite number >= 0, got {value}")]
    NotFiniteNonNegative {
        /// The flag's name.
        name: &'static str,
        /// The value given.
        value: f64,
    },
}

/// The latency model of one simulated server.
#[derive(Debug, Clone, PartialEq)]
pub struct TimingModel {
    ttft_base: Duration,
    /// Prefill cost per prompt token, in nanoseconds.
    ttft_per_prompt_token_ns: f64,
    /// Decode rate in tokens per second; 0 = no pacing.
    tokens_per_sec: f64,
    default_output_tokens: u32,
}

/// When the tokens of one request are due, relative to its admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Time to first token.
    pub ttft: Duration,
    /// Gap between two tokens (zero = all at once).
    pub interval: Duration,
}

impl Schedule {
    /// When token `i` (0-based) is due, relative to admission.
    pub fn token_due(&self, i: u32) -> Duration {
        self.ttft.saturating_add(self.interval.saturating_mul(i))
    }
}

fn check(name: &'static str, value: f64) -> Result<f64, TimingError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(TimingError::NotFiniteNonNegative { name, value })
    }
}

impl TimingModel {
    /// Builds a model from the command-line units.
    ///
    /// `ttft_ms` in milliseconds, `per_prompt_token_us` in microseconds,
    /// `tokens_per_sec` in tokens per second (0 = unpaced),
    /// `default_output_tokens` ≥ 1 (0 is raised to 1).
    pub fn try_new(
        ttft_ms: f64,
        per_prompt_token_us: f64,
        tokens_per_sec: f64,
        default_output_tokens: u32,
    ) -> Result<Self, TimingError> {
        let ttft_ms = check("--ttft-ms", ttft_ms)?;
        let per_token_us = check("--ttft-per-prompt-token-us", per_prompt_token_us)?;
        let tokens_per_sec = check("--tokens-per-sec", tokens_per_sec)?;
        Ok(Self {
            ttft_base: Duration::from_secs_f64(ttft_ms / 1e3),
            ttft_per_prompt_token_ns: per_token_us * 1e3,
            tokens_per_sec,
            default_output_tokens: default_output_tokens.max(1),
        })
    }

    /// A model with no simulated latency, for benchmarks and fast tests.
    pub fn instant(default_output_tokens: u32) -> Self {
        Self {
            ttft_base: Duration::ZERO,
            ttft_per_prompt_token_ns: 0.0,
            tokens_per_sec: 0.0,
            default_output_tokens: default_output_tokens.max(1),
        }
    }

    /// Tokens to generate for a request asking for at most `max_tokens`.
    ///
    /// Returns the count and whether the request's limit cut it short
    /// (OpenAI `finish_reason: "length"`, Anthropic `stop_reason: "max_tokens"`).
    pub fn output_tokens(&self, max_tokens: Option<u32>) -> (u32, bool) {
        match max_tokens {
            Some(max) if max < self.default_output_tokens => (max, true),
            _ => (self.default_output_tokens, false),
        }
    }

    /// The schedule of a request with `prompt_tokens`, an `added` delay from a
    /// fault and an optional decode rate (tokens/s) that replaces the model's.
    pub fn schedule(
        &self,
        prompt_tokens: u32,
        added: Duration,
        rate_override: Option<f64>,
    ) -> Schedule {
        let prefill_ns = self.ttft_per_prompt_token_ns * f64::from(prompt_tokens);
        let prefill = Duration::try_from_secs_f64(prefill_ns / 1e9).unwrap_or(Duration::MAX);
        let rate = rate_override.unwrap_or(self.tokens_per_sec);
        let interval = if rate > 0.0 && rate.is_finite() {
            Duration::try_from_secs_f64(1.0 / rate).unwrap_or(Duration::MAX)
        } else {
            Duration::ZERO
        };
        Schedule {
            ttft: self.ttft_base.saturating_add(prefill).saturating_add(added),
            interval,
        }
    }
}

/// Estimated prompt tokens for `chars` characters of prompt text: ceil(chars / 4).
pub fn estimate_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// The words generated tokens are made of: short, so each is plausibly one token.
const WORDS: [&str; 32] = [
    "the", "quick", "model", "token", "flows", "through", "a", "mesh", "of", "small", "proxy",
    "filters", "that", "keep", "traffic", "calm", "when", "servers", "slow", "down", "or", "fail",
    "and", "every", "reply", "comes", "back", "in", "time", "for", "you", "now",
];

/// The text of generated token `i` of a request whose words start at `offset`:
/// one word, with a leading space except for the first token.
pub fn token_text(offset: u64, i: u32) -> &'static str {
    const SPACED: [&str; 32] = [
        " the", " quick", " model", " token", " flows", " through", " a", " mesh", " of", " small",
        " proxy", " filters", " that", " keep", " traffic", " calm", " when", " servers", " slow",
        " down", " or", " fail", " and", " every", " reply", " comes", " back", " in", " time",
        " for", " you", " now",
    ];
    let idx = (offset.wrapping_add(u64::from(i)) % WORDS.len() as u64) as usize;
    if i == 0 { WORDS[idx] } else { SPACED[idx] }
}

/// The whole text of `n` generated tokens starting at word `offset`.
pub fn generated_text(offset: u64, n: u32) -> String {
    let mut text = String::with_capacity(n as usize * 6);
    for i in 0..n {
        text.push_str(token_text(offset, i));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_estimate_rounds_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(4), 1);
        assert_eq!(estimate_tokens(5), 2);
    }

    #[test]
    fn output_length_is_the_smaller_limit() {
        let m = TimingModel::instant(10);
        assert_eq!(m.output_tokens(None), (10, false));
        assert_eq!(m.output_tokens(Some(3)), (3, true));
        assert_eq!(m.output_tokens(Some(10)), (10, false));
        assert_eq!(m.output_tokens(Some(50)), (10, false));
    }

    #[test]
    fn ttft_grows_with_prompt() {
        let m = TimingModel::try_new(10.0, 100.0, 20.0, 8).unwrap();
        let s = m.schedule(1000, Duration::from_millis(5), None);
        assert_eq!(s.ttft, Duration::from_millis(10 + 100 + 5));
        assert_eq!(s.interval, Duration::from_millis(50));
        assert_eq!(s.token_due(2), Duration::from_millis(215));
        let slow = m.schedule(0, Duration::ZERO, Some(2.0));
        assert_eq!(slow.interval, Duration::from_millis(500));
    }

    #[test]
    fn rejects_negative_and_nan() {
        assert!(TimingModel::try_new(-1.0, 0.0, 0.0, 1).is_err());
        assert!(TimingModel::try_new(0.0, f64::NAN, 0.0, 1).is_err());
    }

    #[test]
    fn each_token_is_one_word() {
        let text = generated_text(3, 5);
        assert_eq!(text.split(' ').count(), 5);
    }
}
