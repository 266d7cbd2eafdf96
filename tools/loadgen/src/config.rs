//! The command line and its validation into a [`Config`].

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};

/// Drive OpenAI-shaped chat completions at a proxy and record what clients see.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadgen", version)]
#[command(group(ArgGroup::new("mode").required(true).args(["open_loop", "closed_loop"])))]
pub struct Args {
    /// Base URL of the proxy, e.g. http://127.0.0.1:10000 (plain HTTP/1.1).
    #[arg(long)]
    pub base_url: String,
    /// Open loop: start RATE requests per second on a fixed schedule, whether
    /// or not earlier ones finished.
    #[arg(long, value_name = "RATE")]
    pub open_loop: Option<f64>,
    /// Closed loop: N clients, each sending its next request when the
    /// previous one ends.
    #[arg(long, value_name = "N")]
    pub closed_loop: Option<u32>,
    /// Closed loop: milliseconds a client waits after a request that did not
    /// end `ok` (a 429, an error) before its next one, as an SDK backs off;
    /// 0 (default) sends at once, which turns fast refusals into a busy loop.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub error_pause_ms: u64,
    /// How long to send, in seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Open loop: most requests in flight; a request due while this many are
    /// outstanding is not sent and is counted as `dropped_by_generator`.
    #[arg(long, default_value_t = 512)]
    pub max_in_flight: u32,
    /// Stop after this many requests (sent or dropped), whatever the duration.
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// The `model` of every request.
    #[arg(long, default_value = "sim-model")]
    pub model: String,
    /// The `max_tokens` of every request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// The user message of every request.
    #[arg(long, default_value = "Write two lines about rivers.")]
    pub prompt: String,
    /// Share of requests sent with `stream: true`, 0 to 1 (chosen per request
    /// from --seed, so a run is reproducible).
    #[arg(long, default_value_t = 0.0)]
    pub stream_share: f64,
    /// Seed for the per-request choices (streamed or not, flood tenant ids).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Extra request header, `NAME:VALUE`; repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// Header carrying the tenant.
    #[arg(long, default_value = "x-tenant-id")]
    pub tenant_header: String,
    /// A fixed tenant for every request.
    #[arg(long, conflicts_with = "tenant_flood")]
    pub tenant: Option<String>,
    /// A new random tenant id per request, `PREFIX` followed by 16 hex digits
    /// (key-flood drills).
    #[arg(long, value_name = "PREFIX")]
    pub tenant_flood: Option<String>,
    /// Sent as `authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Per-request timeout in seconds, from the request's actual start to the
    /// end of its body.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub timeout: f64,
    /// Directory for requests.jsonl and summary.json (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Width of the summary's time windows, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub window_ms: u64,
    /// Wait until this wall-clock time (Unix milliseconds) before starting.
    #[arg(long, value_name = "UNIX_MS")]
    pub start_at: Option<u64>,
    /// Allow a base URL that is not a loopback address.
    #[arg(long)]
    pub allow_remote: bool,
}

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A fixed schedule, `rate` requests per second.
    OpenLoop { rate: f64 },
    /// `clients` sequential clients.
    ClosedLoop { clients: NonZeroU32 },
}

/// Where the tenant header's value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Tenant {
    /// No tenant header.
    None,
    /// The same tenant on every request.
    Fixed(String),
    /// `prefix` plus a random id, new for every request.
    Flood { prefix: String },
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Scheme, authority and optional path prefix of the proxy.
    pub base_url: Uri,
    pub mode: Mode,
    pub duration: Duration,
    pub max_in_flight: NonZeroU32,
    pub max_requests: Option<u64>,
    pub error_pause: Duration,
    pub model: String,
    pub max_tokens: u32,
    pub prompt: String,
    pub stream_share: f64,
    pub seed: u64,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub tenant_header: HeaderName,
    pub tenant: Tenant,
    pub api_key: Option<HeaderValue>,
    pub timeout: Duration,
    pub out: PathBuf,
    pub window_ms: NonZeroU64,
    pub start_at_unix_ms: Option<u64>,
}

/// Longest wait `--start-at` accepts, so a typo cannot park the process.
pub const MAX_START_WAIT: Duration = Duration::from_secs(3600);
/// Highest open-loop rate accepted, requests per second.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Longest run accepted, in seconds (one day).
pub const MAX_DURATION_S: f64 = 86_400.0;
/// Most time windows a run may have: each holds two small histograms
/// (about 25 KB), so this bounds the summary's memory.
pub const MAX_WINDOWS: u64 = 10_000;

/// Why the command line was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("--base-url {url:?}: {reason}")]
    BaseUrl { url: String, reason: &'static str },
    #[error(
        "--base-url host {host:?} is not a loopback address (tests talk only to 127.0.0.1); pass --allow-remote to send elsewhere"
    )]
    RemoteHost { host: String },
    #[error("--open-loop {rate}: must be a number above 0 and at most {MAX_RATE}")]
    Rate { rate: f64 },
    #[error("--closed-loop must be at least 1")]
    NoClients,
    #[error("--{flag} {value}: must be a number of seconds above 0 and at most {MAX_DURATION_S}")]
    Seconds { flag: &'static str, value: f64 },
    #[error("--max-in-flight must be at least 1")]
    NoInFlight,
    #[error("--window-ms must be at least 1")]
    NoWindow,
    #[error(
        "--duration / --window-ms gives {windows} windows; the most is {MAX_WINDOWS}: widen the windows"
    )]
    TooManyWindows { windows: u64 },
    #[error("--stream-share {share}: must be between 0 and 1")]
    StreamShare { share: f64 },
    #[error("--header {header:?}: {reason}")]
    Header {
        header: String,
        reason: &'static str,
    },
    #[error("--tenant-header {name:?} is not a valid header name")]
    TenantHeader { name: String },
    #[error("tenant {value:?} is not a valid header value")]
    TenantValue { value: String },
    #[error("--api-key is not a valid header value")]
    ApiKey,
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(args: Args) -> Result<Self, ConfigError> {
        let base_url = parse_base_url(&args.base_url, args.allow_remote)?;
        let mode = match (args.open_loop, args.closed_loop) {
            (Some(rate), _) => {
                if !(rate > 0.0 && rate <= MAX_RATE) {
                    return Err(ConfigError::Rate { rate });
                }
                Mode::OpenLoop { rate }
            }
            (None, Some(n)) => Mode::ClosedLoop {
                clients: NonZeroU32::new(n).ok_or(ConfigError::NoClients)?,
            },
            // clap's required group makes this unreachable; refuse anyway.
            (None, None) => return Err(ConfigError::NoClients),
        };
        let duration = seconds("duration", args.duration)?;
        let timeout = seconds("timeout", args.timeout)?;
        if !(0.0..=1.0).contains(&args.stream_share) {
            return Err(ConfigError::StreamShare {
                share: args.stream_share,
            });
        }
        let headers = args
            .headers
            .iter()
            .map(|h| parse_header(h))
            .collect::<Result<Vec<_>, _>>()?;
        let tenant_header = HeaderName::try_from(args.tenant_header.as_str()).map_err(|_| {
            ConfigError::TenantHeader {
                name: args.tenant_header.clone(),
            }
        })?;
        let tenant = match (args.tenant, args.tenant_flood) {
            (Some(t), _) => {
                HeaderValue::try_from(t.as_str())
                    .map_err(|_| ConfigError::TenantValue { value: t.clone() })?;
                Tenant::Fixed(t)
            }
            (None, Some(prefix)) => {
                HeaderValue::try_from(format!("{prefix}0")).map_err(|_| {
                    ConfigError::TenantValue {
                        value: prefix.clone(),
                    }
                })?;
                Tenant::Flood { prefix }
            }
            (None, None) => Tenant::None,
        };
        let api_key = args
            .api_key
            .map(|k| HeaderValue::try_from(format!("Bearer {k}")).map_err(|_| ConfigError::ApiKey))
            .transpose()?;
        let window_ms = NonZeroU64::new(args.window_ms).ok_or(ConfigError::NoWindow)?;
        let windows = (duration.as_millis() as u64).div_ceil(window_ms.get());
        if windows > MAX_WINDOWS {
            return Err(ConfigError::TooManyWindows { windows });
        }
        Ok(Config {
            base_url,
            mode,
            duration,
            max_in_flight: NonZeroU32::new(args.max_in_flight).ok_or(ConfigError::NoInFlight)?,
            max_requests: args.max_requests,
            error_pause: Duration::from_millis(args.error_pause_ms),
            model: args.model,
            max_tokens: args.max_tokens,
            prompt: args.prompt,
            stream_share: args.stream_share,
            seed: args.seed,
            headers,
            tenant_header,
            tenant,
            api_key,
            timeout,
            out: args.out,
            window_ms,
            start_at_unix_ms: args.start_at,
        })
    }
}

fn seconds(flag: &'static str, value: f64) -> Result<Duration, ConfigError> {
    if !(value > 0.0 && value <= MAX_DURATION_S) {
        return Err(ConfigError::Seconds { flag, value });
    }
    Ok(Duration::from_secs_f64(value))
}

fn parse_base_url(url: &str, allow_remote: bool) -> Result<Uri, ConfigError> {
    let bad = |reason| ConfigError::BaseUrl {
        url: url.to_string(),
        reason,
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// is supported (HTTP/1.1 without TLS)"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !allow_remote {
        return Err(ConfigError::RemoteHost {
            host: host.to_string(),
        });
    }
    Ok(uri)
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
    let bad = |reason| ConfigError::Header {
        header: text.to_string(),
        reason,
    };
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| bad("expected NAME:VALUE"))?;
    let name = HeaderName::try_from(name.trim()).map_err(|_| bad("invalid header name"))?;
    let value = HeaderValue::try_from(value.trim()).map_err(|_| bad("invalid header value"))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["loadgen", "--out", "/tmp/x", "--open-loop", "10"];
        argv.extend_from_slice(extra);
        Args::parse_from(argv)
    }

    #[test]
    fn loopback_hosts_pass_and_others_need_allow_remote() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.2:1/prefix",
            "http://localhost:9",
            "http://[::1]:9",
        ] {
            assert!(
                Config::try_from(args(&["--base-url", url])).is_ok(),
                "{url}"
            );
        }
        let err = Config::try_from(args(&["--base-url", "http://10.0.0.1:80"])).unwrap_err();
        assert!(matches!(err, ConfigError::RemoteHost { .. }));
        assert!(
            Config::try_from(args(&[
                "--base-url",
                "http://10.0.0.1:80",
                "--allow-remote"
            ]))
            .is_ok()
        );
        let err = Config::try_from(args(&["--base-url", "https://127.0.0.1:443"])).unwrap_err();
        assert!(matches!(err, ConfigError::BaseUrl { .. }));
    }

    #[test]
    fn bad_numbers_and_headers_are_refused() {
        let base = ["--base-url", "http://127.0.0.1:1"];
        for extra in [
            &["--stream-share", "1.5"][..],
            &["--duration", "0"],
            &["--timeout=-1"],
            &["--header", "no-colon"],
            &["--header", "bad name:v"],
            &["--max-in-flight", "0"],
            &["--window-ms", "0"],
            &["--duration", "100", "--window-ms", "1"],
        ] {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            assert!(Config::try_from(args(&all)).is_err(), "{extra:?}");
        }
        let cfg = Config::try_from(args(&[
            "--base-url",
            "http://127.0.0.1:1",
            "--header",
            "x-a: b:c",
            "--api-key",
            "k",
        ]))
        .unwrap();
        assert_eq!(cfg.headers[0].0, "x-a");
        assert_eq!(cfg.headers[0].1, "b:c");
        assert_eq!(cfg.api_key.unwrap(), "Bearer k");
    }
}
