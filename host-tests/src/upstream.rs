//! Simulated upstreams: clusters of endpoints in zones, each with a latency
//! model, error and 429 rates, and a schedule of faults.
//!
//! An endpoint answers an attempt with an [`AttemptPlan`]: fail to connect, or
//! send headers after the time to first token and then body chunks (an SSE
//! stream token by token, or one body), possibly resetting mid-stream. All
//! randomness comes from the host's seeded PRNG, so a seed fixes every answer.

use std::time::Duration;

use crate::headers::HeaderMap;
use crate::prng::Prng;
use crate::world::Locality;

/// What an endpoint's body looks like.
#[derive(Clone, Debug)]
pub enum BodySpec {
    /// One chunk with these bytes.
    Fixed(Vec<u8>),
    /// These SSE events (each already framed, e.g. `"data: {...}\n\n"`), one
    /// chunk each, `time_per_token` apart.
    Sse(Vec<String>),
    /// An OpenAI-style chat completion stream of this many output tokens,
    /// ending with a usage chunk and `data: [DONE]`.
    OpenAiStream { output_tokens: u32 },
}

/// A fault active in a window of virtual time (relative to the host's start).
#[derive(Clone, Debug)]
pub struct Fault {
    pub from: Duration,
    pub until: Duration,
    pub kind: FaultKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FaultKind {
    /// Latencies multiplied by this factor.
    Slow(f64),
    /// Connections fail (Envoy: `UF`, 503 unless retried).
    Down,
    /// Every request gets 429.
    Storm429,
    /// Streams reset after this many body chunks.
    ResetMidStream { after_chunks: usize },
    /// Every request gets this status (e.g. 500, 503).
    Status(u32),
    /// Every request gets 429 with `retry-after` (whole seconds).
    Throttled { retry_after_s: u64 },
    /// The connection is accepted and the request read, and nothing ever
    /// comes back (an hour of virtual time: only a timeout ends it).
    Blackhole,
}

/// How long a blackholed endpoint takes to send anything.
pub const BLACKHOLE_NS: u64 = 3_600 * 1_000_000_000;

/// How one endpoint behaves.
#[derive(Clone, Debug)]
pub struct EndpointBehavior {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    /// Headers sent after `headers` whose values are arbitrary bytes.
    pub raw_headers: Vec<(String, Vec<u8>)>,
    pub body: BodySpec,
    /// Time from the request reaching the endpoint to response headers.
    pub time_to_first_token: Duration,
    /// Time between body chunks (tokens).
    pub time_per_token: Duration,
    /// Time from the response headers to the first body chunk.
    pub body_delay: Duration,
    /// Relative jitter applied to both latencies (0.1 = ±10 %).
    pub jitter: f64,
    /// Probability of a 503 answer.
    pub error_rate: f64,
    /// Probability of a 429 answer.
    pub rate_429: f64,
    pub faults: Vec<Fault>,
}

impl Default for EndpointBehavior {
    fn default() -> Self {
        Self {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            raw_headers: Vec::new(),
            body: BodySpec::Fixed(b"{\"ok\":true}".to_vec()),
            time_to_first_token: Duration::from_millis(10),
            time_per_token: Duration::from_millis(5),
            body_delay: Duration::ZERO,
            jitter: 0.0,
            error_rate: 0.0,
            rate_429: 0.0,
            faults: Vec::new(),
        }
    }
}

impl EndpointBehavior {
    /// A fixed JSON answer after `latency`.
    pub fn fixed(status: u32, body: &str, latency: Duration) -> Self {
        Self {
            status,
            body: BodySpec::Fixed(body.as_bytes().to_vec()),
            time_to_first_token: latency,
            ..Self::default()
        }
    }

    /// An LLM-like SSE stream.
    pub fn llm(ttft: Duration, tpot: Duration, output_tokens: u32) -> Self {
        Self {
            headers: vec![("content-type".into(), "text/event-stream".into())],
            body: BodySpec::OpenAiStream { output_tokens },
            time_to_first_token: ttft,
            time_per_token: tpot,
            ..Self::default()
        }
    }

    /// Adds a response header whose value is arbitrary bytes.
    pub fn with_header_bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.raw_headers.push((name.into(), value.to_vec()));
        self
    }

    /// Sends the response headers at once and the body `delay` later.
    pub fn with_body_delay(mut self, delay: Duration) -> Self {
        self.body_delay = delay;
        self
    }

    pub fn with_error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    pub fn with_429_rate(mut self, rate: f64) -> Self {
        self.rate_429 = rate;
        self
    }

    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    pub fn with_fault(mut self, from: Duration, until: Duration, kind: FaultKind) -> Self {
        self.faults.push(Fault { from, until, kind });
        self
    }

    /// Plans the answer to one attempt starting at `elapsed` since the host start.
    pub fn plan(&self, elapsed: Duration, rng: &mut Prng) -> AttemptPlan {
        let active: Vec<&FaultKind> = self
            .faults
            .iter()
            .filter(|f| f.from <= elapsed && elapsed < f.until)
            .map(|f| &f.kind)
            .collect();
        let slow: f64 = active
            .iter()
            .map(|k| if let FaultKind::Slow(f) = k { *f } else { 1.0 })
            .product();
        let spread = self.jitter;
        let jitter = |d: Duration, rng: &mut Prng| -> u64 {
            let base = d.as_nanos() as f64 * slow;
            let factor = if spread > 0.0 {
                1.0 + spread * (2.0 * rng.next_f64() - 1.0)
            } else {
                1.0
            };
            (base * factor).max(0.0) as u64
        };
        let ttft = jitter(self.time_to_first_token, rng);
        if active.iter().any(|k| **k == FaultKind::Down) {
            return AttemptPlan::ConnectFailure {
                after_ns: 1_000_000,
            };
        }
        if active.iter().any(|k| **k == FaultKind::Blackhole) {
            return AttemptPlan::Respond(ResponsePlan {
                status: self.status,
                headers: Vec::new(),
                raw_headers: Vec::new(),
                first_byte_ns: BLACKHOLE_NS,
                chunks: Vec::new(),
                trailers: None,
                reset_after_chunks: None,
            });
        }
        let retry_after = active.iter().find_map(|k| match k {
            FaultKind::Throttled { retry_after_s } => Some(*retry_after_s),
            _ => None,
        });
        let forced_status = active.iter().find_map(|k| match k {
            FaultKind::Storm429 | FaultKind::Throttled { .. } => Some(429),
            FaultKind::Status(s) => Some(*s),
            _ => None,
        });
        let roll = rng.next_f64();
        let status = forced_status.unwrap_or(if roll < self.error_rate {
            503
        } else if roll < self.error_rate + self.rate_429 {
            429
        } else {
            self.status
        });
        if status != self.status {
            // Errors answer fast, with a short body.
            let body = format!("{{\"error\":{status}}}").into_bytes();
            let mut headers: Vec<(String, String)> = vec![
                ("content-type".into(), "application/json".into()),
                ("content-length".into(), body.len().to_string()),
            ];
            if let Some(secs) = retry_after.filter(|_| status == 429) {
                headers.push(("retry-after".into(), secs.to_string()));
            }
            return AttemptPlan::Respond(ResponsePlan {
                status,
                headers,
                raw_headers: Vec::new(),
                first_byte_ns: ttft.min(5_000_000),
                chunks: vec![(0, body)],
                trailers: None,
                reset_after_chunks: None,
            });
        }
        let chunks: Vec<Vec<u8>> = match &self.body {
            BodySpec::Fixed(bytes) => vec![bytes.clone()],
            BodySpec::Sse(events) => events.iter().map(|e| e.as_bytes().to_vec()).collect(),
            BodySpec::OpenAiStream { output_tokens } => openai_stream(*output_tokens),
        };
        let mut at = self.body_delay.as_nanos() as u64;
        let timed = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i > 0 {
                    at += jitter(self.time_per_token, rng);
                }
                (at, c)
            })
            .collect();
        let reset = active.iter().find_map(|k| match k {
            FaultKind::ResetMidStream { after_chunks } => Some(*after_chunks),
            _ => None,
        });
        let mut headers = self.headers.clone();
        // A whole body answered at once carries its length, as an HTTP/1
        // server sends it (streams are chunked and have none).
        if let BodySpec::Fixed(bytes) = &self.body
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            headers.push(("content-length".into(), bytes.len().to_string()));
        }
        AttemptPlan::Respond(ResponsePlan {
            status,
            headers,
            raw_headers: self.raw_headers.clone(),
            first_byte_ns: ttft,
            chunks: timed,
            trailers: None,
            reset_after_chunks: reset,
        })
    }
}

/// OpenAI chat-completion SSE chunks for `tokens` output tokens.
pub fn openai_stream(tokens: u32) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..tokens)
        .map(|i| {
            format!(
                "data: {{\"id\":\"sim\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{i} \"}}}}]}}\n\n"
            )
            .into_bytes()
        })
        .collect();
    out.push(
        format!(
            "data: {{\"id\":\"sim\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":{tokens},\"total_tokens\":{}}}}}\n\n",
            tokens + 10
        )
        .into_bytes(),
    );
    out.push(b"data: [DONE]\n\n".to_vec());
    out
}

/// How an endpoint answers one attempt.
#[derive(Clone, Debug)]
pub enum AttemptPlan {
    ConnectFailure { after_ns: u64 },
    Respond(ResponsePlan),
}

/// A response: headers after `first_byte_ns`, then chunks at offsets from the headers.
#[derive(Clone, Debug)]
pub struct ResponsePlan {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    /// Headers after `headers` whose values are arbitrary bytes.
    pub raw_headers: Vec<(String, Vec<u8>)>,
    pub first_byte_ns: u64,
    /// (offset after the headers in ns, bytes).
    pub chunks: Vec<(u64, Vec<u8>)>,
    pub trailers: Option<HeaderMap>,
    /// Reset the stream after sending this many chunks.
    pub reset_after_chunks: Option<usize>,
}

/// One upstream host.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: String,
    pub locality: Locality,
    pub behavior: EndpointBehavior,
}

impl Endpoint {
    pub fn new(address: &str, zone: &str, behavior: EndpointBehavior) -> Self {
        Self {
            address: address.into(),
            locality: Locality::zone("region", zone),
            behavior,
        }
    }
}

/// A named set of endpoints with a round-robin cursor (the fallback policy).
#[derive(Clone, Debug)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub(crate) round_robin: usize,
}

impl Cluster {
    pub fn new(name: &str, endpoints: Vec<Endpoint>) -> Self {
        Self {
            name: name.into(),
            endpoints,
            round_robin: 0,
        }
    }

    /// A cluster with one endpoint answering `status`/`body` after `latency`.
    pub fn fixed(name: &str, status: u32, body: &str, latency: Duration) -> Self {
        Self::new(
            name,
            vec![Endpoint::new(
                "10.0.0.1:8000",
                "zone-a",
                EndpointBehavior::fixed(status, body, latency),
            )],
        )
    }

    pub(crate) fn next_round_robin(&mut self) -> Option<usize> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.round_robin % self.endpoints.len();
        self.round_robin = self.round_robin.wrapping_add(1);
        Some(i)
    }

    pub(crate) fn index_of(&self, address: &str) -> Option<usize> {
        self.endpoints.iter().position(|e| e.address == address)
    }
}
