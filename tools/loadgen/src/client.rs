//! Sending one chat completion and timing what comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, Tenant};
use crate::record::{CAPTURED_HEADERS, ErrorKind, Outcome, Record};
use crate::sse::SseReader;

/// Largest non-streamed body kept to read `usage` from, in bytes; longer
/// bodies are still read to the end, just not parsed.
const MAX_KEPT_BODY: usize = 4 << 20;

/// What varies from one request to the next.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub id: u64,
    pub client: Option<u32>,
    pub stream: bool,
    pub tenant: Option<String>,
}

impl RequestSpec {
    /// The choices for request `id`, derived from the seed alone so that a
    /// run is reproducible whatever the timing.
    pub fn derive(config: &Config, id: u64, client: Option<u32>) -> RequestSpec {
        use rand_core::{Rng, SeedableRng};
        let mut rng = rand_xorshift::XorShiftRng::seed_from_u64(
            config.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        // 53 random bits as a uniform number in [0, 1).
        let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let tenant = match &config.tenant {
            Tenant::None => None,
            Tenant::Fixed(t) => Some(t.clone()),
            Tenant::Flood { prefix } => Some(format!("{prefix}{:016x}", rng.next_u64())),
        };
        RequestSpec {
            id,
            client,
            stream: draw < config.stream_share,
            tenant,
        }
    }
}

/// A pooled HTTP/1.1 keep-alive client bound to one proxy and one request shape.
#[derive(Clone)]
pub struct Requester {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    body_plain: Bytes,
    body_stream: Bytes,
    config: std::sync::Arc<Config>,
    run_start: Instant,
}

impl Requester {
    /// Builds the client; `pool_size` bounds the idle connections kept.
    pub fn new(
        config: std::sync::Arc<Config>,
        run_start: Instant,
        pool_size: usize,
    ) -> anyhow::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(pool_size)
            .build(connector);
        let prefix = config.base_url.path().trim_end_matches('/');
        let uri = Uri::builder()
            .scheme("http")
            .authority(
                config
                    .base_url
                    .authority()
                    .ok_or_else(|| anyhow::anyhow!("base URL has no authority"))?
                    .clone(),
            )
            .path_and_query(format!("{prefix}/v1/chat/completions"))
            .build()?;
        let body = |stream: bool| -> anyhow::Result<Bytes> {
            let mut value = serde_json::json!({
                "model": config.model,
                "messages": [{"role": "user", "content": config.prompt}],
                "max_tokens": config.max_tokens,
                "stream": stream,
            });
            if stream {
                value["stream_options"] = serde_json::json!({"include_usage": true});
            }
            Ok(Bytes::from(serde_json::to_vec(&value)?))
        };
        Ok(Requester {
            client,
            uri,
            body_plain: body(false)?,
            body_stream: body(true)?,
            config,
            run_start,
        })
    }

    /// Sends one request due at `scheduled` and returns what the client saw.
    /// Ends within `--timeout` of its start, or as soon as `abort` turns true.
    pub async fn send(
        &self,
        spec: RequestSpec,
        scheduled: Instant,
        mut abort: watch::Receiver<bool>,
    ) -> Record {
        let start = Instant::now();
        let mut seen = Seen::default();
        let ended = tokio::select! {
            r = tokio::time::timeout_at(start + self.config.timeout, self.exchange(&spec, &mut seen)) => {
                r.unwrap_or(Err(ErrorKind::Timeout))
            }
            () = aborted(&mut abort) => Err(ErrorKind::Aborted),
        };
        let end = Instant::now();
        let (outcome, error_kind) = match (ended, seen.status) {
            (Err(kind), 0) => (Outcome::TransportError, Some(kind)),
            (_, s) if !(200..300).contains(&s) => (Outcome::HttpError, None),
            (Err(kind), _) => (Outcome::Cut, Some(kind)),
            (Ok(()), _) if seen.sse && !seen.done => (Outcome::Cut, Some(ErrorKind::MissingDone)),
            (Ok(()), _) => (Outcome::Ok, None),
        };
        let since_scheduled = |t: Instant| ms(t.saturating_duration_since(scheduled));
        let is_2xx = (200..300).contains(&seen.status);
        Record {
            id: spec.id,
            client: spec.client,
            stream: spec.stream,
            tenant: spec.tenant,
            scheduled_ms: ms(scheduled.saturating_duration_since(self.run_start)),
            start_ms: Some(ms(start.saturating_duration_since(self.run_start))),
            ttft_ms: seen.first_token.filter(|_| is_2xx).map(since_scheduled),
            total_ms: Some(since_scheduled(end)),
            status: seen.status,
            outcome,
            error_kind,
            stream_done: seen.sse.then_some(seen.done),
            prompt_tokens: seen.usage.as_ref().and_then(|u| u.prompt_tokens),
            completion_tokens: seen.usage.as_ref().and_then(|u| u.completion_tokens),
            total_tokens: seen.usage.as_ref().and_then(|u| u.total_tokens),
            headers: seen.headers,
        }
    }

    async fn exchange(&self, spec: &RequestSpec, seen: &mut Seen) -> Result<(), ErrorKind> {
        let body = if spec.stream {
            self.body_stream.clone()
        } else {
            self.body_plain.clone()
        };
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(body))
            .map_err(|_| ErrorKind::Other)?;
        let headers = request.headers_mut();
        if let Some(key) = &self.config.api_key {
            headers.insert(AUTHORIZATION, key.clone());
        }
        if let Some(tenant) = &spec.tenant {
            let value = HeaderValue::try_from(tenant.as_str()).map_err(|_| ErrorKind::Other)?;
            headers.insert(self.config.tenant_header.clone(), value);
        }
        for (name, value) in &self.config.headers {
            headers.append(name.clone(), value.clone());
        }

        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                classify(&e)
            }
        })?;
        seen.status = response.status().as_u16();
        for name in CAPTURED_HEADERS {
            if let Some(v) = response.headers().get(*name) {
                seen.headers
                    .insert(*name, String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
        }
        let ok = response.status().is_success();
        seen.sse = ok
            && response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));

        let mut body = response.into_body();
        let mut sse = SseReader::default();
        let mut events = Vec::new();
        let mut kept = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| classify(&e))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() || !ok {
                continue;
            }
            let now = Instant::now();
            if !seen.sse {
                seen.first_token.get_or_insert(now);
                if kept.len() + data.len() <= MAX_KEPT_BODY {
                    kept.extend_from_slice(&data);
                }
                continue;
            }
            sse.feed(&data, &mut events);
            for event in events.drain(..) {
                if event == "[DONE]" {
                    seen.done = true;
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Chunk>(&event) else {
                    continue;
                };
                if chunk
                    .choices
                    .iter()
                    .any(|c| c.delta.as_ref().is_some_and(Delta::carries_token))
                {
                    seen.first_token.get_or_insert(now);
                }
                if chunk.usage.is_some() {
                    seen.usage = chunk.usage;
                }
            }
        }
        if ok && !seen.sse {
            seen.usage = serde_json::from_slice::<Completion>(&kept)
                .ok()
                .and_then(|c| c.usage);
        }
        Ok(())
    }
}

/// What has been observed so far; kept outside the exchange's future so a
/// timeout or abort still reports the status and first token.
#[derive(Default)]
struct Seen {
    status: u16,
    headers: BTreeMap<&'static str, String>,
    sse: bool,
    done: bool,
    first_token: Option<Instant>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    role: Option<String>,
    content: Option<String>,
}

impl Delta {
    fn carries_token(&self) -> bool {
        self.role.is_some() || self.content.as_deref().is_some_and(|c| !c.is_empty())
    }
}

#[derive(Deserialize)]
struct Completion {
    usage: Option<Usage>,
}

/// Resolves when `abort` turns true; never if its sender is gone.
pub async fn aborted(abort: &mut watch::Receiver<bool>) {
    if abort.wait_for(|a| *a).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sorts an HTTP client error by walking its sources.
fn classify(error: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return ErrorKind::Timeout;
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return ErrorKind::Reset;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as Io;
            return match io.kind() {
                Io::ConnectionRefused => ErrorKind::Connect,
                Io::TimedOut => ErrorKind::Timeout,
                Io::ConnectionReset
                | Io::ConnectionAborted
                | Io::BrokenPipe
                | Io::UnexpectedEof => ErrorKind::Reset,
                _ => ErrorKind::Other,
            };
        }
        current = e.source();
    }
    ErrorKind::Other
}

/// A duration in milliseconds, to the microsecond.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
