//! The control port: faults in, counters out.
//!
//! It listens on its own address so that the faults that close or kill the
//! API listener never take the control channel down with it: a test can kill
//! an instance and revive it through the same connection.
//!
//! - `GET /_sim/faults` → the active [`Faults`] as JSON.
//! - `POST /_sim/faults` with a [`Faults`] JSON body → replaces the whole set
//!   (missing fields = no such fault, `{}` clears all), reseeds the PRNG, and
//!   answers with the new set once the listener is open or closed to match;
//!   400 for a body that does not validate, 500 if the listener could not be
//!   reopened (port taken meanwhile).
//! - `GET /_sim/stats` → a [`StatsSnapshot`](crate::stats::StatsSnapshot).

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::api::{Body, json_response};
use crate::faults::Faults;
use crate::server::Shared;

/// Largest control request body, in bytes.
const MAX_CONTROL_BODY: usize = 64 * 1024;

fn error(status: StatusCode, message: &str) -> Response<Body> {
    let body = json!({ "error": { "message": message } });
    json_response(status, body.to_string().into_bytes())
}

fn faults_response(faults: &Faults) -> Response<Body> {
    match serde_json::to_vec(faults) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn post_faults(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")),
    };
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid faults: {e}")),
    };
    if let Err(e) = faults.validate() {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    if !shared.config.quiet {
        eprintln!(
            "llm-sim[{}]: faults set to {}",
            shared.config.instance,
            serde_json::to_string(&faults).unwrap_or_default()
        );
    }
    match shared.set_faults(faults).await {
        Ok(()) => faults_response(&shared.faults()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/_sim/faults") => faults_response(&shared.faults()),
        (&Method::POST, "/_sim/faults") => post_faults(&shared, req).await,
        (&Method::GET, "/_sim/stats") => {
            let snapshot = shared.stats.snapshot(
                shared.capacity.queued(),
                shared.listening(),
                shared.quota_status().as_ref(),
            );
            match serde_json::to_vec(&snapshot) {
                Ok(body) => json_response(StatusCode::OK, body),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            }
        }
        (_, "/_sim/faults" | "/_sim/stats") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, path) => error(StatusCode::NOT_FOUND, &format!("no control route {path}")),
    }
}

/// Serves the control API on `listener` until the task is aborted.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, std::convert::Infallible>(handle(shared, req).await) }
            });
            // A control client that goes away mid-request is not an error worth reporting.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
