//! Listeners, connections, routing, the refuse / die / revive faults, and
//! the blackhole's hold.
//!
//! The accept loop is owned here (rather than handed to a framework) because
//! three faults act below HTTP:
//! - *refuse connections* closes the listening socket, so a connect gets
//!   `ECONNREFUSED` exactly as from a host with nothing listening, while open
//!   connections keep being served;
//! - *dead* also cuts every open connection (streams in progress end without
//!   a clean end), as when the server process dies;
//! - *revive* binds the same address again (`SO_REUSEADDR`), so Envoy's
//!   endpoint comes back at the same `host:port`.
//!
//! A supervisor task owns the listener and follows a `watch` channel saying
//! whether it should be open; a second channel reports whether it is, so the
//! control port answers only once the change has taken effect. Each
//! connection task watches a "kill epoch" that the dead fault bumps.
//!
//! The blackhole must answer nothing, not even a status line, so it is not
//! an answer but a wait inside the request's service future, on a `watch` of
//! the fault. A client that goes away ends it (hyper drops the future with
//! the connection), clearing the fault ends it (the request is served), and
//! so does the hold limit (the service fails, and hyper closes the
//! connection without writing a byte): no held request outlives its client
//! or the limit.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH, HeaderValue, VARY};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiError, Body, Endpoint, Flavor, GenRequest, ResponseMeta};
use crate::capacity::Capacity;
use crate::config::Config;
use crate::control;
use crate::faults::{Decision, FaultState, Faults};
use crate::quota::{Exhausted, QuotaStatus};
use crate::stats::Stats;
use crate::timing::TimingModel;

/// Response header naming the instance's zone.
pub const ZONE_HEADER: &str = "x-llm-sim-zone";
/// Response header naming the instance.
pub const INSTANCE_HEADER: &str = "x-llm-sim-instance";

/// How long the control port waits for the listener to open or close.
const LISTENER_CHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts to bind the API address again after a failure.
const REBIND_RETRY: Duration = Duration::from_millis(100);

/// The readiness line: where the server listens, printed once as JSON.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Readiness {
    /// Bound address of the inference API.
    pub listen: SocketAddr,
    /// Bound address of the control API.
    pub control: SocketAddr,
    /// The `--zone`.
    pub zone: String,
    /// The `--instance`.
    pub instance: String,
}

/// Desired and actual state of the API listener.
#[derive(Debug)]
pub(crate) struct ListenerControl {
    /// Whether the listener should be open (written by the control port).
    desired: watch::Sender<bool>,
    /// Whether it is open (written by the supervisor).
    listening: watch::Sender<bool>,
    /// Bumped to cut every open API connection.
    kill_epoch: watch::Sender<u64>,
}

/// State shared by every task of one server.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) timing: TimingModel,
    pub(crate) capacity: Capacity,
    pub(crate) stats: Stats,
    faults: Mutex<FaultState>,
    listener: ListenerControl,
    /// Whether the blackhole fault is on (held requests wait for false).
    blackhole: watch::Sender<bool>,
    next_id: AtomicU64,
    id_salt: u64,
    zone: HeaderValue,
    instance: HeaderValue,
}

/// The blackhole held a request for `--blackhole-max-hold-s`: its connection
/// is closed without an answer.
#[derive(Debug, thiserror::Error)]
#[error("blackholed request held for the longest hold; connection closed unanswered")]
pub(crate) struct BlackholeExpired;

/// A listener change the control port asked for did not take effect in time.
#[derive(Debug, thiserror::Error)]
#[error("the API listener did not {0} within {LISTENER_CHANGE_TIMEOUT:?} (address in use?)")]
pub(crate) struct ListenerStuck(&'static str);

/// SplitMix64's finalizer: spreads a counter into well-mixed bits.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a of a name, to salt response ids per instance.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Shared {
    /// The fault decision for the next request.
    pub(crate) fn decide(&self) -> Decision {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .decide()
    }

    /// Charges one request of `tokens` tokens to the quota, if there is
    /// one: its status after the charge (`None`: no quota), or the limit
    /// that refused the request (nothing charged).
    pub(crate) fn admit_quota(
        &self,
        tokens: u64,
    ) -> Result<Option<QuotaStatus>, (Exhausted, QuotaStatus)> {
        let now = std::time::Instant::now();
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        faults.quota().map(|q| q.admit(now, tokens)).transpose()
    }

    /// Where the quota stands now, if there is one (nothing charged).
    pub(crate) fn quota_status(&self) -> Option<QuotaStatus> {
        let now = std::time::Instant::now();
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .quota()
            .map(|q| q.status(now))
    }

    /// The active faults.
    pub(crate) fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .faults()
            .clone()
    }

    /// Holds an inference request while the blackhole fault is on: returns
    /// once it is cleared, or fails after `--blackhole-max-hold-s`. A client
    /// that goes away ends the wait by dropping this future.
    pub(crate) async fn pass_blackhole(&self) -> Result<(), BlackholeExpired> {
        let mut on = self.blackhole.subscribe();
        if !*on.borrow_and_update() {
            return Ok(());
        }
        self.stats.blackholed();
        let cleared =
            tokio::time::timeout(self.config.blackhole_max_hold(), on.wait_for(|on| !*on)).await;
        match cleared {
            Ok(Ok(_)) => Ok(()),
            // Timed out (the sender lives as long as `self`, so never closed).
            _ => Err(BlackholeExpired),
        }
    }

    /// Whether the API listener is open now.
    pub(crate) fn listening(&self) -> bool {
        *self.listener.listening.borrow()
    }

    /// Replaces the faults (validated by the caller), releases the requests
    /// the blackhole holds unless it stays on, then opens or closes the
    /// listener to match and, for `dead`, cuts every open connection.
    pub(crate) async fn set_faults(&self, faults: Faults) -> Result<(), ListenerStuck> {
        let open = faults.listener_open();
        let dead = faults.dead;
        let blackhole = faults.blackhole;
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(faults);
        // After the reseed: released requests draw like any that follow the change.
        self.blackhole.send_replace(blackhole);
        self.listener.desired.send_replace(open);
        let mut listening = self.listener.listening.subscribe();
        let settled = tokio::time::timeout(
            LISTENER_CHANGE_TIMEOUT,
            listening.wait_for(|is_open| *is_open == open),
        )
        .await;
        // Cut connections only once no new one can arrive.
        if dead {
            self.listener
                .kill_epoch
                .send_modify(|e| *e = e.wrapping_add(1));
        }
        match settled {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ListenerStuck(if open { "open" } else { "close" })),
        }
    }

    /// Names a new response: provider-prefixed id, creation time, echoed model.
    pub(crate) fn response_meta(&self, endpoint: Endpoint, request: &GenRequest) -> ResponseMeta {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bits = mix(self.id_salt ^ n);
        let prefix = match endpoint {
            Endpoint::ChatCompletions => "chatcmpl-",
            Endpoint::Completions => "cmpl-",
            Endpoint::Messages => "msg_",
        };
        ResponseMeta {
            id: format!("{prefix}{bits:016x}{n:08x}"),
            created: api::unix_now(),
            model: request.model.clone(),
            prompt_tokens: request.prompt_tokens,
            word_offset: bits >> 32,
            choices: request.choices,
        }
    }
}

/// Binds `addr` with `SO_REUSEADDR`, so a revived server gets its port back.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Keeps a request counted as in flight until its response body is dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.request_finished();
    }
}

/// A response body that holds its request's [`InFlight`] guard.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Routes one API request; only inference requests can be blackholed.
async fn route(
    shared: &Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, BlackholeExpired> {
    let endpoint = match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
        (&Method::POST, "/v1/completions") => Endpoint::Completions,
        (&Method::POST, "/v1/messages") => Endpoint::Messages,
        (&Method::GET, "/health") => {
            return Ok(api::json_response(
                StatusCode::OK,
                br#"{"status":"ok"}"#.to_vec(),
            ));
        }
        (&Method::GET, "/v1/models") => {
            let body = api::openai::models_body(&shared.config.models, api::unix_now());
            return Ok(api::json_response(StatusCode::OK, body));
        }
        (_, "/v1/messages") => {
            return Ok(ApiError::method_not_allowed().into_response(Flavor::Anthropic));
        }
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/health") => {
            return Ok(ApiError::method_not_allowed().into_response(Flavor::OpenAi));
        }
        (_, path) => return Ok(ApiError::unknown_route(path).into_response(Flavor::OpenAi)),
    };
    crate::generate::serve(shared, endpoint, req).await
}

/// Serves one API request: counters, in-flight tracking, identity headers.
/// An error (a blackhole hold that ran out) makes hyper close the
/// connection without writing anything.
async fn serve_api(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Tracked>, BlackholeExpired> {
    shared.stats.request_started();
    if req.method() == Method::POST
        && matches!(
            req.uri().path(),
            "/v1/chat/completions" | "/v1/completions" | "/v1/messages"
        )
    {
        shared.stats.inference_started();
    }
    let in_flight = InFlight(Arc::clone(&shared));
    let gzip = shared.config.gzip_always || crate::gzip::accepts_gzip(req.headers());
    let resp = route(&shared, req).await?;
    shared.stats.status(resp.status().as_u16());
    let (mut parts, mut body) = resp.into_parts();
    parts.headers.insert(ZONE_HEADER, shared.zone.clone());
    parts
        .headers
        .insert(INSTANCE_HEADER, shared.instance.clone());
    if gzip {
        shared.stats.gzipped();
        body = crate::gzip::compress(body);
        parts.headers.remove(CONTENT_LENGTH);
        parts
            .headers
            .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        parts
            .headers
            .append(VARY, HeaderValue::from_static("accept-encoding"));
    }
    Ok(Response::from_parts(
        parts,
        Tracked {
            inner: body,
            _in_flight: in_flight,
        },
    ))
}

/// Serves one API connection until it closes or the dead fault cuts it.
fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    shared.stats.connection();
    let mut kill = shared.listener.kill_epoch.subscribe();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        // Streaming latency matters more than packet count here.
        let _ = stream.set_nodelay(true);
        let service = service_fn(move |req| serve_api(Arc::clone(&shared), req));
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            // Connection errors (client reset, aborted body) end the connection; nothing to report.
            _ = conn => {}
            _ = kill.changed() => {}
        }
    });
}

/// Accepts until the listener should close; false when the server is going away.
async fn accept_while_open(
    shared: &Arc<Shared>,
    listener: &TcpListener,
    desired: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        tokio::select! {
            biased;
            changed = desired.changed() => {
                if changed.is_err() {
                    return false;
                }
                if !*desired.borrow_and_update() {
                    return true;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(shared, stream),
                // Out of file descriptors and the like: back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Owns the API listener: open while the faults allow it, closed otherwise.
async fn supervise_listener(
    shared: Arc<Shared>,
    addr: SocketAddr,
    mut listener: Option<TcpListener>,
    mut desired: watch::Receiver<bool>,
) {
    loop {
        if *desired.borrow_and_update() {
            let open = match listener.take() {
                Some(l) => l,
                None => match bind(addr) {
                    Ok(l) => l,
                    Err(err) => {
                        if !shared.config.quiet {
                            eprintln!("llm-sim: cannot bind {addr} again: {err}; retrying");
                        }
                        tokio::select! {
                            () = tokio::time::sleep(REBIND_RETRY) => {}
                            _ = desired.changed() => {}
                        }
                        continue;
                    }
                },
            };
            shared.listener.listening.send_replace(true);
            let keep_going = accept_while_open(&shared, &open, &mut desired).await;
            drop(open);
            shared.listener.listening.send_replace(false);
            if !keep_going {
                return;
            }
        } else {
            listener = None;
            shared.listener.listening.send_replace(false);
            if desired.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A started server; dropping it stops every task of it.
#[derive(Debug)]
pub struct RunningServer {
    readiness: Readiness,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Binds both ports and starts serving; must run inside a tokio runtime.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let timing = config.timing()?;
        let faults = config.initial_faults()?;
        let api_listener = bind(config.listen)?;
        let listen = api_listener.local_addr()?;
        let control_listener = bind(config.control)?;
        let control = control_listener.local_addr()?;

        let zone = HeaderValue::from_str(&config.zone)?;
        let instance = HeaderValue::from_str(&config.instance)?;
        let open = faults.listener_open();
        let blackhole = faults.blackhole;
        let (desired, desired_rx) = watch::channel(open);
        let shared = Arc::new(Shared {
            capacity: Capacity::new(
                config.max_concurrency,
                config.queue_depth,
                config.queue_timeout(),
            ),
            timing,
            stats: Stats::default(),
            faults: Mutex::new(FaultState::new(faults, config.seed)),
            listener: ListenerControl {
                desired,
                // The listener is bound (or not) before the readiness line is printed.
                listening: watch::Sender::new(open),
                kill_epoch: watch::Sender::new(0),
            },
            blackhole: watch::Sender::new(blackhole),
            next_id: AtomicU64::new(0),
            id_salt: fnv1a(&config.instance) ^ config.seed,
            zone,
            instance,
            config,
        });
        let readiness = Readiness {
            listen,
            control,
            zone: shared.config.zone.clone(),
            instance: shared.config.instance.clone(),
        };
        let tasks = vec![
            tokio::spawn(supervise_listener(
                Arc::clone(&shared),
                listen,
                open.then_some(api_listener),
                desired_rx,
            )),
            tokio::spawn(control::serve(Arc::clone(&shared), control_listener)),
        ];
        Ok(Self {
            readiness,
            shared,
            tasks,
        })
    }

    /// The bound addresses and names.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The inference API address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.readiness.listen
    }

    /// The control API address.
    pub fn control_addr(&self) -> SocketAddr {
        self.readiness.control
    }

    /// Stops accepting and cuts every open connection.
    pub fn shutdown(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.shared
            .listener
            .kill_epoch
            .send_modify(|e| *e = e.wrapping_add(1));
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
