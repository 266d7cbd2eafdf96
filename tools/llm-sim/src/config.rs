//! The command line, which is also the whole configuration.
//!
//! Tests build a server from the same struct (`Config::parse_from([...])` or
//! `Config::default()`), so what a test exercises is exactly what the binary
//! accepts. Fault flags only seed the initial [`Faults`]; the control port can
//! replace them at run time.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use clap::Parser;

use crate::faults::{DEFAULT_QUOTA_WINDOW_S, Faults};
use crate::timing::TimingModel;

/// llm-sim: an OpenAI- and Anthropic-compatible inference server simulator.
///
/// On readiness it prints one JSON line to stdout with the bound addresses:
/// {"listen":"127.0.0.1:PORT","control":"127.0.0.1:PORT","zone":"..","instance":".."}
#[derive(Debug, Clone, Parser)]
#[command(name = "llm-sim", version, args_override_self = true)]
pub struct Config {
    /// Address of the inference API (port 0 = let the OS choose).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,

    /// Address of the control API (`/_sim/faults`, `/_sim/stats`); port 0 = choose.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub control: SocketAddr,

    /// Zone name, reported in the `x-llm-sim-zone` response header.
    #[arg(long, default_value = "local")]
    pub zone: String,

    /// Instance name, reported in the `x-llm-sim-instance` response header.
    #[arg(long, default_value = "llm-sim")]
    pub instance: String,

    /// Model names served (comma-separated); other models get a 404.
    #[arg(long, value_delimiter = ',', default_value = "sim-model")]
    pub models: Vec<String>,

    /// Seed of the PRNG behind every random fault decision.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Base time to first token, in milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub ttft_ms: f64,

    /// Time to first token added per prompt token, in microseconds (prefill cost).
    #[arg(long, default_value_t = 20.0)]
    pub ttft_per_prompt_token_us: f64,

    /// Decode rate in tokens per second; 0 = every token at once.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,

    /// Tokens generated when the request's max_tokens does not cut it shorter.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub output_tokens: u32,

    /// Requests served at once (0 = unlimited); beyond it: queue, then 429.
    #[arg(long, default_value_t = 0)]
    pub max_concurrency: usize,

    /// Requests allowed to wait for a slot when all are busy (0 = 429 at once).
    #[arg(long, default_value_t = 0)]
    pub queue_depth: usize,

    /// Longest wait in the queue before a 429, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub queue_timeout_ms: u64,

    /// Value of the `retry-after` header on 429 and 503/529 answers, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_s: u64,

    /// Largest request body accepted, in bytes (beyond: 413).
    #[arg(long, default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Answer 411 to an inference request without `content-length` (a
    /// chunked body), as some servers and gateways do: a proxy that rewrites
    /// a body must send its new length.
    #[arg(long)]
    pub require_content_length: bool,

    /// Compress every answer with gzip, even when the request does not
    /// accept it (a misbehaving upstream). Without it, answers are gzipped
    /// only for requests with `accept-encoding: gzip`.
    #[arg(long)]
    pub gzip_always: bool,

    /// Fault: probability in [0, 1] that a request is answered with --error-status.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,

    /// Fault: the status of --error-rate answers.
    #[arg(long, default_value_t = 503)]
    pub error_status: u16,

    /// Fault: answer every inference request with this status.
    #[arg(long)]
    pub fixed_status: Option<u16>,

    /// Fault: milliseconds added to the time to first token (and before fault errors).
    #[arg(long, default_value_t = 0)]
    pub added_latency_ms: u64,

    /// Fault: decode rate in tokens per second that replaces --tokens-per-sec.
    #[arg(long)]
    pub slow_tokens_per_sec: Option<f64>,

    /// Fault: cut the connection, without a clean end, after this many tokens.
    #[arg(long)]
    pub abort_after_tokens: Option<u32>,

    /// Fault: probability in [0, 1] that --abort-after-tokens applies to a request.
    #[arg(long, default_value_t = 1.0)]
    pub abort_rate: f64,

    /// Fault: start with the API listener closed (connections refused).
    #[arg(long)]
    pub refuse_connections: bool,

    /// Fault: start dead (listener closed); revive through the control port.
    #[arg(long)]
    pub dead: bool,

    /// Fault: read inference requests and never answer them (health and
    /// models still answer).
    #[arg(long)]
    pub blackhole: bool,

    /// Fault: every fault error answer carries `retry-after` with this many
    /// seconds and the provider's rate-limit reset header (at most 86400).
    #[arg(long)]
    pub fault_retry_after_s: Option<u32>,

    /// Fault: fault error answers carry no `retry-after` and no rate-limit
    /// header at all (a 429 that names no end).
    #[arg(long)]
    pub bare_errors: bool,

    /// Quota: requests per window; every inference answer carries the
    /// provider's rate-limit headers, and past the limit it is a 429.
    #[arg(long)]
    pub quota_requests: Option<NonZeroU64>,

    /// Quota: tokens (prompt + completion) per window.
    #[arg(long)]
    pub quota_tokens: Option<NonZeroU64>,

    /// Quota: length of the fixed window, in seconds (at most 86400).
    #[arg(long, default_value_t = DEFAULT_QUOTA_WINDOW_S)]
    pub quota_window_s: NonZeroU32,

    /// Quota: requests already used in the first window.
    #[arg(long, default_value_t = 0)]
    pub quota_requests_used: u64,

    /// Quota: tokens already used in the first window.
    #[arg(long, default_value_t = 0)]
    pub quota_tokens_used: u64,

    /// Longest time the blackhole holds a request before closing its
    /// connection without an answer, in seconds; bounds what a client that
    /// never gives up can pin.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub blackhole_max_hold_s: u64,

    /// Worker threads (0 = one per CPU; 1 = a single-threaded runtime).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,

    /// Print nothing but the readiness line.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for Config {
    /// The defaults of the command line, with nothing given.
    fn default() -> Self {
        Self::parse_from(["llm-sim"])
    }
}

impl Config {
    /// The faults given on the command line, validated.
    pub fn initial_faults(&self) -> Result<Faults, crate::faults::FaultError> {
        let faults = Faults {
            error_rate: self.error_rate,
            error_status: self.error_status,
            fixed_status: self.fixed_status,
            added_latency_ms: self.added_latency_ms,
            slow_tokens_per_sec: self.slow_tokens_per_sec,
            abort_after_tokens: self.abort_after_tokens,
            abort_rate: self.abort_rate,
            refuse_connections: self.refuse_connections,
            dead: self.dead,
            blackhole: self.blackhole,
            retry_after_s: self.fault_retry_after_s,
            bare_errors: self.bare_errors,
            quota_requests: self.quota_requests,
            quota_tokens: self.quota_tokens,
            quota_window_s: self.quota_window_s,
            quota_requests_used: self.quota_requests_used,
            quota_tokens_used: self.quota_tokens_used,
        };
        faults.validate()?;
        Ok(faults)
    }

    /// The timing model from the timing flags, validated.
    pub fn timing(&self) -> Result<TimingModel, crate::timing::TimingError> {
        TimingModel::try_new(
            self.ttft_ms,
            self.ttft_per_prompt_token_us,
            self.tokens_per_sec,
            self.output_tokens,
        )
    }

    /// How long a queued request may wait for a slot.
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    /// How long the blackhole fault holds a request at most.
    pub fn blackhole_max_hold(&self) -> Duration {
        Duration::from_secs(self.blackhole_max_hold_s)
    }
}
