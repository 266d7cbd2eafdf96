//! An in-process upstream for the load generator's tests: answers chat
//! completions from the fixtures, streamed or not, following a cyclic plan
//! (ok, an error status, a stream cut mid-way, a stream without `[DONE]`),
//! with controlled delays and an optional one-off stall. It also records what
//! it received, and runs the `loadgen` binary against itself.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::channel::{Channel, Sender};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::time::Instant;

pub const STREAM: &str = include_str!("../fixtures/stream_ok.sse");
pub const COMPLETION: &str = include_str!("../fixtures/completion.json");

/// What the server does with the n-th request it receives (cycling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    Ok,
    /// This status with a JSON error body; a 429 also carries `retry-after: 1`.
    Status(u16),
    /// 200, part of the body, then the connection is aborted.
    Cut,
    /// 200, the whole stream except `data: [DONE]`, ended cleanly.
    NoDone,
    /// Never answers (until the client goes away).
    Blackhole,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub answers: Vec<Answer>,
    /// Before the status line.
    pub first_byte_delay: Duration,
    /// Between body pieces (SSE events, or the two halves of a JSON body).
    pub piece_gap: Duration,
    /// The request with this arrival index stalls the server for this long:
    /// every request arriving meanwhile waits until the stall ends.
    pub stall: Option<(usize, Duration)>,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            answers: vec![Answer::Ok],
            first_byte_delay: Duration::ZERO,
            piece_gap: Duration::ZERO,
            stall: None,
        }
    }
}

/// What the server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub index: usize,
    pub tenant: Option<String>,
    pub authorization: Option<String>,
    pub drill: Option<String>,
    pub body: Value,
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
}

struct State {
    plan: Plan,
    arrivals: AtomicUsize,
    stalled_until: Mutex<Option<Instant>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl TestServer {
    pub async fn start(plan: Plan) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let state = Arc::new(State {
            plan,
            arrivals: AtomicUsize::new(0),
            stalled_until: Mutex::new(None),
            received: received.clone(),
        });
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                // Without it, Nagle and the client's delayed ACK add 40 ms to
                // every answer written in pieces on a kept-alive connection.
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(state.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer { addr, received }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

type Body = Channel<Bytes, std::io::Error>;

async fn answer(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let index = state.arrivals.fetch_add(1, Ordering::SeqCst);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (tenant, authorization, drill) = (
        header("x-tenant-id"),
        header("authorization"),
        header("x-drill"),
    );
    assert_eq!(req.uri().path(), "/v1/chat/completions");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let stream = body["stream"] == true;
    state.received.lock().unwrap().push(Received {
        index,
        tenant,
        authorization,
        drill,
        body,
    });

    let plan = &state.plan;
    let until = {
        let mut stalled = state.stalled_until.lock().unwrap();
        if let Some((at, length)) = plan.stall
            && at == index
        {
            *stalled = Some(Instant::now() + length);
        }
        *stalled
    };
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
    tokio::time::sleep(plan.first_byte_delay).await;

    let what = plan.answers[index % plan.answers.len()];
    if what == Answer::Blackhole {
        std::future::pending::<()>().await;
    }
    let (tx, body) = Channel::new(4);
    let mut response = Response::builder()
        .header("x-llm-sim-zone", "zone-a")
        .header("x-llm-sim-instance", "a1");
    match what {
        Answer::Status(status) => {
            response = response
                .status(status)
                .header("content-type", "application/json");
            if status == 429 {
                response = response.header("retry-after", "1");
            }
            let text = format!(r#"{{"error":{{"message":"status {status}","type":"test"}}}}"#);
            tokio::spawn(send_pieces(tx, vec![text.into()], Duration::ZERO, false));
        }
        _ if stream => {
            response = response.header("content-type", "text/event-stream");
            let mut events: Vec<Bytes> = STREAM
                .split_inclusive("\n\n")
                .map(|e| Bytes::from(e.to_string()))
                .collect();
            let cut = what == Answer::Cut;
            match what {
                Answer::Cut => events.truncate(2),
                Answer::NoDone => {
                    events.pop();
                }
                _ => {}
            }
            tokio::spawn(send_pieces(tx, events, plan.piece_gap, cut));
        }
        _ => {
            response = response.header("content-type", "application/json");
            let (a, b) = COMPLETION.split_at(COMPLETION.len() / 2);
            let cut = what == Answer::Cut;
            let pieces = if cut {
                vec![a.into()]
            } else {
                vec![a.into(), b.into()]
            };
            let pieces = pieces.into_iter().map(|p: String| Bytes::from(p)).collect();
            tokio::spawn(send_pieces(tx, pieces, plan.piece_gap, cut));
        }
    }
    Ok(response.body(body).unwrap())
}

async fn send_pieces(
    mut tx: Sender<Bytes, std::io::Error>,
    pieces: Vec<Bytes>,
    gap: Duration,
    cut: bool,
) {
    for (i, piece) in pieces.into_iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        if tx.send_data(piece).await.is_err() {
            return;
        }
    }
    if cut {
        tokio::time::sleep(gap).await;
        tx.abort(std::io::Error::other("cut by the test server"));
    }
}

/// What one run of the binary produced.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub summary: Value,
    pub records: Vec<Value>,
}

/// A fresh output directory for one test.
pub fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("loadgen-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The binary, with `args` (split on whitespace) and `--out`.
pub fn command(out: &Path, args: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"));
    cmd.args(args.split_whitespace())
        .arg("--out")
        .arg(out)
        .kill_on_drop(true);
    cmd.stdout(std::process::Stdio::piped());
    cmd
}

/// Reads the outputs of a finished run.
pub fn read_outputs(out: &Path, status: std::process::ExitStatus, stdout: String) -> Output {
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let mut records: Vec<Value> = std::fs::read_to_string(out.join("requests.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    records.sort_by_key(|r| r["id"].as_u64().unwrap());
    Output {
        status,
        stdout,
        summary: serde_json::from_str(&summary).unwrap(),
        records,
    }
}

/// Runs the binary to the end (at most 20 s) and reads its outputs.
pub async fn loadgen(name: &str, args: &str) -> Output {
    let out = out_dir(name);
    let child = command(&out, args).output();
    let output = tokio::time::timeout(Duration::from_secs(20), child)
        .await
        .expect("loadgen ended")
        .unwrap();
    assert!(
        output.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    read_outputs(
        &out,
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

pub fn outcomes(records: &[Value]) -> Vec<&str> {
    records
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect()
}

pub fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}
