//! One inference request, from request body to (possibly streamed) response.
//!
//! The order of checks follows a real server's: read the body (411, 413),
//! parse it (400), check the model (404), charge the provider quota (429,
//! when the fault set has one), take a capacity slot (429), then the fault
//! decision, then generation paced by the timing model. With a quota, every
//! answer (but a bare fault error) carries the provider's rate-limit
//! headers, as of the request's admission. The
//! blackhole fault holds a request right after the read. The slot is held until
//! the last token is written, so a slow stream occupies capacity the way a
//! real sequence occupies a batch slot.
//!
//! A stream is produced by a task that sleeps until each token is due and
//! pushes SSE frames into a small channel that the response body drains. A
//! client that goes away closes the channel and the task stops at its next
//! wake-up or earlier (it also watches for the close while sleeping). The
//! abort fault ends the body with an error, which makes hyper drop the
//! connection without the terminating chunk: the client sees a cut stream,
//! not a clean end.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::api::anthropic::{self, AnthropicStream};
use crate::api::openai::{self, OpenAiStream};
use crate::api::{ApiError, Body, Endpoint, Flavor, ResponseMeta, json_response};
use crate::capacity::Slot;
use crate::quota::QuotaStatus;
use crate::server::{BlackholeExpired, Shared};
use crate::timing::{Schedule, generated_text, token_text};

/// Serves one inference request on `endpoint`; every failure is an answer in
/// the endpoint's error shape, except a request the blackhole held until its
/// limit, which gets no answer at all.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Response<Body>, BlackholeExpired> {
    let body = read_request(shared, req).await;
    // Held once read, as by a server that hangs mid-work; a request the read
    // refused (411, 413) too: a blackholed server answers nothing.
    shared.pass_blackhole().await?;
    // The quota as of this request's charge; unset if it never got there.
    let mut quota = None;
    let result = match body {
        Ok(body) => run(shared, endpoint, &body, &mut quota).await,
        Err(err) => Err(err),
    };
    let bare = matches!(&result, Err(err) if err.bare);
    let mut resp = match result {
        Ok(resp) => resp,
        Err(err) => err.into_response(endpoint.flavor()),
    };
    if !bare && let Some(status) = quota.or_else(|| shared.quota_status()) {
        add_quota_headers(&mut resp, &status, endpoint.flavor());
    }
    Ok(resp)
}

/// The provider's rate-limit headers of `status`, in `flavor`'s style. A
/// header the answer already has (a fault's `retry_after_s` reset hint)
/// is kept.
fn add_quota_headers(resp: &mut Response<Body>, status: &QuotaStatus, flavor: Flavor) {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let headers = resp.headers_mut();
    for (name, value) in status.headers(flavor, std::time::Instant::now(), wall) {
        // Digits, letters, `.`, `:` and `-`: always a valid value.
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.entry(name).or_insert(value);
        }
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(err) => Err(ApiError::bad_request(format!(
            "Could not read the request body: {err}"
        ))),
    }
}

/// The request body, within `--max-body-bytes` and `--require-content-length`.
async fn read_request(shared: &Shared, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    if shared.config.require_content_length && !req.headers().contains_key(CONTENT_LENGTH) {
        return Err(ApiError::length_required());
    }
    read_body(req.into_body(), shared.config.max_body_bytes).await
}

/// Serves a read request; `quota` is set to the quota's status once the
/// request has been charged (or refused by it).
async fn run(
    shared: &Arc<Shared>,
    endpoint: Endpoint,
    body: &[u8],
    quota: &mut Option<QuotaStatus>,
) -> Result<Response<Body>, ApiError> {
    let request = match endpoint {
        Endpoint::ChatCompletions => openai::parse_chat(body)?,
        Endpoint::Completions => openai::parse_completions(body)?,
        Endpoint::Messages => anthropic::parse_messages(body)?,
    };
    if !shared.config.models.contains(&request.model) {
        return Err(ApiError::model_not_found(&request.model));
    }
    let (n, cut_short) = shared.timing.output_tokens(request.max_tokens);
    let cost = u64::from(request.prompt_tokens)
        .saturating_add(u64::from(n).saturating_mul(u64::from(request.choices)));
    match shared.admit_quota(cost) {
        Ok(status) => *quota = status,
        Err((limit, status)) => {
            *quota = Some(status);
            shared.stats.quota_refused();
            let reset = status.reset(std::time::Instant::now());
            let retry_after = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
            return Err(ApiError::quota_exceeded(limit.name(), retry_after));
        }
    }
    let retry_after = shared.config.retry_after_s;
    let slot = shared.capacity.admit().await.map_err(|_| {
        shared.stats.overloaded();
        ApiError::overloaded(retry_after)
    })?;
    let admitted = Instant::now();
    let decision = shared.decide();
    if let Some(status) = decision.error_status {
        sleep_until(admitted + decision.added_latency).await;
        return Err(ApiError::fault(
            status,
            retry_after,
            decision.retry_after_s,
            decision.bare,
        ));
    }

    let schedule = shared.timing.schedule(
        request.prompt_tokens,
        decision.added_latency,
        decision.rate_override,
    );
    // Tokens produced before a cut: at most all of them, the end is still withheld.
    let cut_after = decision.abort_after_tokens.map(|k| k.min(n));
    let meta = shared.response_meta(endpoint, &request);
    shared.stats.prompt(u64::from(request.prompt_tokens));

    let plan = Plan {
        endpoint,
        meta,
        include_usage: request.include_usage,
        tokens: n,
        cut_short,
        cut_after,
        schedule,
        admitted,
    };
    if request.stream {
        Ok(stream_response(Arc::clone(shared), plan, slot))
    } else {
        Ok(complete_response(shared, plan, slot).await)
    }
}

/// Everything decided about a request before its first token.
struct Plan {
    endpoint: Endpoint,
    meta: ResponseMeta,
    include_usage: bool,
    /// Tokens to generate.
    tokens: u32,
    /// Whether `max_tokens` limited `tokens`.
    cut_short: bool,
    /// The abort fault: cut the connection after this many tokens.
    cut_after: Option<u32>,
    schedule: Schedule,
    /// When the request got its capacity slot; the schedule is relative to it.
    admitted: Instant,
}

impl Plan {
    fn due(&self, token: u32) -> Instant {
        self.admitted + self.schedule.token_due(token)
    }

    fn body(&self, produced: u32) -> Vec<u8> {
        match self.endpoint {
            Endpoint::ChatCompletions => {
                openai::chat_response(&self.meta, produced, self.cut_short)
            }
            Endpoint::Completions => {
                openai::completion_response(&self.meta, produced, self.cut_short)
            }
            Endpoint::Messages => {
                let text = generated_text(self.meta.word_offset, produced);
                anthropic::message_response(&self.meta, &text, produced, self.cut_short)
            }
        }
    }

    /// Tokens produced when each choice has `per_choice`.
    fn all_choices(&self, per_choice: u32) -> u64 {
        u64::from(per_choice) * u64::from(self.meta.choices)
    }
}

/// Sleeps until `deadline`, without touching the timer when it has passed.
async fn sleep_until(deadline: Instant) {
    if deadline > Instant::now() {
        tokio::time::sleep_until(deadline).await;
    }
}

fn simulated_abort() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "llm-sim: simulated abort")
}

/// A non-streamed answer, sent when its last token is due.
async fn complete_response(shared: &Shared, plan: Plan, slot: Slot) -> Response<Body> {
    let produced = plan.cut_after.unwrap_or(plan.tokens);
    sleep_until(plan.due(produced.saturating_sub(1))).await;
    shared.stats.tokens(plan.all_choices(produced));
    let body = plan.body(produced);
    drop(slot);
    if plan.cut_after.is_none() {
        return json_response(StatusCode::OK, body);
    }
    // Abort: headers and half the JSON, then the connection is cut.
    shared.stats.aborted();
    let body_len_half = body.len() / 2;
    let half = Bytes::from(body).slice(..body_len_half);
    let (tx, rx) = mpsc::channel::<FrameResult>(2);
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(half))).await.is_ok() {
            cut(&tx).await;
        }
    });
    channel_response(rx, "application/json")
}

/// The SSE encoder of an endpoint.
enum Encoder {
    OpenAi(OpenAiStream),
    Anthropic(AnthropicStream),
}

impl Encoder {
    fn new(plan: &Plan) -> Self {
        let meta = plan.meta.clone();
        match plan.endpoint {
            Endpoint::ChatCompletions => {
                Self::OpenAi(OpenAiStream::new(meta, true, plan.include_usage))
            }
            Endpoint::Completions => {
                Self::OpenAi(OpenAiStream::new(meta, false, plan.include_usage))
            }
            Endpoint::Messages => Self::Anthropic(AnthropicStream::new(meta)),
        }
    }

    fn preamble(&self) -> Vec<u8> {
        match self {
            Self::OpenAi(s) => s.preamble(),
            Self::Anthropic(s) => s.preamble(),
        }
    }

    /// The frames of token `i` (of every choice).
    fn token(&self, i: u32) -> Vec<u8> {
        match self {
            Self::OpenAi(s) => s.token(i),
            Self::Anthropic(s) => s.token(token_text(s.word_offset(), i)),
        }
    }

    fn finish(&self, produced: u32, cut_short: bool) -> Vec<u8> {
        match self {
            Self::OpenAi(s) => s.finish(produced, cut_short),
            Self::Anthropic(s) => s.finish(produced, cut_short),
        }
    }
}

type FrameResult = Result<Frame<Bytes>, io::Error>;

/// Upper bound, in 1 ms polls, on waiting for a stream's frames to be taken before a cut.
const ABORT_DRAIN_POLLS: u32 = 200;

/// Waits until `deadline`; false if the client went away meanwhile.
async fn wait_for_client(tx: &mpsc::Sender<FrameResult>, deadline: Instant) -> bool {
    if deadline <= Instant::now() {
        return !tx.is_closed();
    }
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => true,
        () = tx.closed() => false,
    }
}

/// Ends a body with an error once the frames before it reached the socket.
///
/// hyper drops its unflushed write buffer when a body fails, so the tokens
/// already produced must be written before the cut: wait until the body has
/// taken every frame, then give the connection task a moment to flush.
async fn cut(tx: &mpsc::Sender<FrameResult>) {
    for _ in 0..ABORT_DRAIN_POLLS {
        if tx.capacity() == tx.max_capacity() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(2)).await;
    // Ignored: if the client is gone the connection is closed anyway.
    let _ = tx.send(Err(simulated_abort())).await;
}

async fn send(tx: &mpsc::Sender<FrameResult>, bytes: Vec<u8>) -> bool {
    bytes.is_empty() || tx.send(Ok(Frame::data(Bytes::from(bytes)))).await.is_ok()
}

/// Produces the frames of one stream, paced by the plan; holds the slot until done.
async fn produce(shared: Arc<Shared>, plan: Plan, tx: mpsc::Sender<FrameResult>, slot: Slot) {
    let _slot = slot;
    let encoder = Encoder::new(&plan);
    if !wait_for_client(&tx, plan.due(0)).await || !send(&tx, encoder.preamble()).await {
        return;
    }
    let emit = plan.cut_after.unwrap_or(plan.tokens);
    for i in 0..emit {
        if !wait_for_client(&tx, plan.due(i)).await {
            return;
        }
        if !send(&tx, encoder.token(i)).await {
            return;
        }
        shared.stats.tokens(plan.all_choices(1));
    }
    if plan.cut_after.is_some() {
        shared.stats.aborted();
        cut(&tx).await;
        return;
    }
    send(&tx, encoder.finish(plan.tokens, plan.cut_short)).await;
}

/// An SSE answer: headers now, frames as the producer task makes them.
fn stream_response(shared: Arc<Shared>, plan: Plan, slot: Slot) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<FrameResult>(16);
    tokio::spawn(produce(shared, plan, tx, slot));
    let mut resp = channel_response(rx, "text/event-stream");
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A response whose body is whatever a producer task sends on `rx`.
fn channel_response(
    mut rx: mpsc::Receiver<FrameResult>,
    content_type: &'static str,
) -> Response<Body> {
    let frames = stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
