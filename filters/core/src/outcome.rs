//! What a finished upstream call says about an upstream's health.
//!
//! Every capability that learns from outcomes judges a call the same way:
//! the breaker (per backend × model), outlier detection (per endpoint) and
//! retry budgets. So the verdict lives here, once, and each capability's
//! configuration says only which failures it counts and what is slow
//! ([`Judge`]).

use std::time::Duration;

use crate::config::{BreakerConfig, FailureKind};

/// What a capability counts as a failure and as slow.
pub trait Judge {
    /// The failure kinds that count (`failure_on`).
    fn failure_on(&self) -> &[FailureKind];
    /// A time to first token above this is slow.
    fn slow_ttft(&self) -> Duration;
    /// A mean time per output token above this is slow.
    fn slow_tpot(&self) -> Duration;
}

impl Judge for BreakerConfig {
    fn failure_on(&self) -> &[FailureKind] {
        &self.failure_on
    }
    fn slow_ttft(&self) -> Duration {
        self.slow_ttft
    }
    fn slow_tpot(&self) -> Duration {
        self.slow_tpot
    }
}

/// The verdict on one call, as the breaker counts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Why the call failed, when it did in a way `failure_on` lists.
    pub failure: Option<FailureKind>,
    /// Whether the call was slow (time to first token above `slow_ttft`, or
    /// mean time per output token above `slow_tpot`).
    pub slow: bool,
}

impl Outcome {
    /// A fast, successful call.
    pub const SUCCESS: Outcome = Outcome {
        failure: None,
        slow: false,
    };

    /// A fast call that failed with `kind`.
    pub fn failure(kind: FailureKind) -> Self {
        Self {
            failure: Some(kind),
            slow: false,
        }
    }

    /// A successful but slow call.
    pub fn slow() -> Self {
        Self {
            failure: None,
            slow: true,
        }
    }

    pub fn is_failure(&self) -> bool {
        self.failure.is_some()
    }
}

/// The parts of Envoy's response flags that judge an upstream.
///
/// A filter reads the `response.flags` attribute (a bit set, see
/// [`ResponseFlags::from_envoy_bits`]) once the response is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseFlags {
    /// `UF`: the connection to the upstream could not be made.
    pub connect_failure: bool,
    /// `UR` or `UC`: the upstream reset the stream or closed the connection.
    pub reset: bool,
    /// `UT`: the route timeout fired before the upstream answered in full.
    pub timeout: bool,
    /// `DC`: the client went away. Not the upstream's fault: the call should
    /// not be judged at all (see [`classify`]).
    pub downstream_disconnect: bool,
}

impl ResponseFlags {
    /// Envoy's `UpstreamRequestTimeout` bit (`UT`).
    pub const ENVOY_UT: u64 = 0x4;
    /// `UpstreamRemoteReset` (`UR`).
    pub const ENVOY_UR: u64 = 0x10;
    /// `UpstreamConnectionFailure` (`UF`).
    pub const ENVOY_UF: u64 = 0x20;
    /// `UpstreamConnectionTermination` (`UC`).
    pub const ENVOY_UC: u64 = 0x40;
    /// `DownstreamConnectionTermination` (`DC`).
    pub const ENVOY_DC: u64 = 0x4000;

    /// Decodes Envoy's `response.flags` bit set (the legacy `ResponseFlag`
    /// values, which Envoy keeps stable for that attribute).
    pub fn from_envoy_bits(bits: u64) -> Self {
        Self {
            connect_failure: bits & Self::ENVOY_UF != 0,
            reset: bits & (Self::ENVOY_UR | Self::ENVOY_UC) != 0,
            timeout: bits & Self::ENVOY_UT != 0,
            downstream_disconnect: bits & Self::ENVOY_DC != 0,
        }
    }
}

/// Judges a finished call. `None` when the call says nothing about the
/// upstream (the client disconnected before any sign of upstream trouble):
/// the filter then neither records it nor counts it, and a probe it carried
/// is abandoned.
///
/// - `status`: the upstream's HTTP status, `None` when none arrived;
/// - `ttft`: time from sending the request to the first response byte (or
///   token), `None` if no byte came;
/// - `tpot`: mean time per output token after the first, `None` if unknown
///   (non-streaming, fewer than two tokens).
///
/// Only the kinds listed in `cfg.failure_on()` count as failures; the first
/// listed kind that applies names the failure, checked in this order:
/// connect failure, reset, timeout, 429, 5xx, gateway error (502/503/504).
pub fn classify(
    status: Option<u16>,
    flags: ResponseFlags,
    ttft: Option<Duration>,
    tpot: Option<Duration>,
    cfg: &impl Judge,
) -> Option<Outcome> {
    let listed = |kind: FailureKind| cfg.failure_on().contains(&kind);
    let status_5xx = status.is_some_and(|s| (500..600).contains(&s));
    let gateway = matches!(status, Some(502..=504));
    let candidates = [
        (flags.connect_failure, FailureKind::ConnectFailure),
        (flags.reset, FailureKind::Reset),
        (flags.timeout, FailureKind::Timeout),
        (status == Some(429), FailureKind::Status429),
        (status_5xx, FailureKind::Status5xx),
        (gateway, FailureKind::GatewayError),
    ];
    let failure = candidates
        .into_iter()
        .find(|&(applies, kind)| applies && listed(kind))
        .map(|(_, kind)| kind);
    let upstream_trouble = candidates.iter().any(|&(applies, _)| applies);
    if flags.downstream_disconnect && !upstream_trouble {
        return None;
    }
    let slow =
        ttft.is_some_and(|t| t > cfg.slow_ttft()) || tpot.is_some_and(|t| t > cfg.slow_tpot());
    Some(Outcome { failure, slow })
}
