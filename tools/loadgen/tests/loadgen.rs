//! The `loadgen` binary against an in-process upstream: exact outcome
//! counts, honest open-loop latency, drops, transport errors and signals.
//! Timing assertions are loose bounds: the machine is shared.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Answer, Plan, TestServer, f, loadgen, outcomes};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_counted_exactly() {
    let server = TestServer::start(Plan {
        answers: vec![
            Answer::Ok,
            Answer::Status(503),
            Answer::Cut,
            Answer::Status(429),
            Answer::NoDone,
            Answer::Status(404),
        ],
        piece_gap: Duration::from_millis(5),
        ..Plan::default()
    })
    .await;
    // One client: the server's arrival order is the request order.
    let url = server.base_url();
    let out = loadgen(
        "outcomes",
        &format!("--base-url {url} --closed-loop 1 --max-requests 12 --duration 20 --stream-share 1 --tenant acme --api-key sk-test --header x-drill:outcomes"),
    )
    .await;
    let c = &out.summary["counts"];
    assert_eq!(c["requests"], 12);
    assert_eq!(c["ok"], 2);
    assert_eq!(c["http_5xx"], json!({"503": 2}));
    assert_eq!(c["http_429"], 2);
    assert_eq!(c["http_4xx"], json!({"404": 2}));
    assert_eq!(c["transport_errors"], json!({}));
    assert_eq!(c["cut_streams"], json!({"reset": 2, "missing_done": 2}));
    assert_eq!(c["dropped_by_generator"], 0);
    assert_eq!(
        outcomes(&out.records)[..6],
        ["ok", "http_error", "cut", "http_error", "cut", "http_error"]
    );

    let ok = &out.records[0];
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["stream"], true);
    assert_eq!(ok["stream_done"], true);
    assert_eq!(ok["total_tokens"], 7);
    assert_eq!(ok["completion_tokens"], 2);
    assert_eq!(
        ok["headers"],
        json!({"x-llm-sim-instance": "a1", "x-llm-sim-zone": "zone-a"})
    );
    // Five events 5 ms apart after the first: the first token comes well
    // before the end.
    assert!(f(&ok["ttft_ms"]) < f(&ok["total_ms"]));
    let cut = &out.records[2];
    assert_eq!(
        (cut["status"].as_u64(), cut["error_kind"].as_str()),
        (Some(200), Some("reset"))
    );
    assert_eq!(cut["stream_done"], false);
    assert!(
        cut["ttft_ms"].is_f64(),
        "the cut stream had sent its first token"
    );
    let no_done = &out.records[4];
    assert_eq!(no_done["error_kind"], "missing_done");
    assert_eq!(
        no_done["total_tokens"], 7,
        "usage came before the missing [DONE]"
    );
    let limited = &out.records[3];
    assert_eq!(limited["status"], 429);
    assert_eq!(limited["headers"]["retry-after"], "1");
    assert!(limited["ttft_ms"].is_null(), "an error has no first token");

    let received = server.received();
    assert_eq!(received.len(), 12);
    for r in &received {
        assert_eq!(r.tenant.as_deref(), Some("acme"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer sk-test"));
        assert_eq!(r.drill.as_deref(), Some("outcomes"));
        assert_eq!(r.body["stream"], true);
        assert_eq!(r.body["stream_options"], json!({"include_usage": true}));
        assert_eq!(r.body["model"], "sim-model");
        assert_eq!(r.body["messages"][0]["role"], "user");
    }
    // Only ok requests enter the TTFT percentiles; all twelve enter total_all.
    assert_eq!(out.summary["latency_ms"]["ttft_ok"]["count"], 2);
    assert_eq!(out.summary["latency_ms"]["total_all"]["count"], 12);
    assert!(out.stdout.contains("12 requests"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_share_is_seeded_and_non_streamed_answers_are_timed_to_the_first_byte() {
    let server = TestServer::start(Plan {
        piece_gap: Duration::from_millis(30),
        ..Plan::default()
    })
    .await;
    let url = server.base_url();
    let args =
        format!("--base-url {url} --open-loop 100 --duration 0.3 --stream-share 0.5 --seed 7");
    let (a, b) = tokio::join!(loadgen("share-a", &args), loadgen("share-b", &args));
    let streamed = |out: &common::Output| -> Vec<bool> {
        out.records
            .iter()
            .map(|r| r["stream"].as_bool().unwrap())
            .collect()
    };
    assert_eq!(a.records.len(), 30);
    assert_eq!(streamed(&a), streamed(&b), "same seed, same choices");
    let n = streamed(&a).iter().filter(|s| **s).count();
    assert!(
        (5..=25).contains(&n),
        "{n} of 30 streamed at a share of 0.5"
    );
    assert_eq!(a.summary["counts"]["ok"], 30);
    for r in &a.records {
        assert!(f(&r["ttft_ms"]) < f(&r["total_ms"]), "{r}");
        assert_eq!(r["total_tokens"], 7);
        let stream = r["stream"].as_bool().unwrap();
        assert_eq!(
            r["stream_done"],
            if stream { json!(true) } else { json!(null) }
        );
    }
    let received = server.received();
    assert!(
        received
            .iter()
            .all(|r| r.tenant.is_none() && r.authorization.is_none())
    );
    assert!(
        received
            .iter()
            .filter(|r| r.body["stream"] == false)
            .all(|r| r.body.get("stream_options").is_none())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_flood_sends_a_new_tenant_each_time_and_start_at_waits() {
    let server = TestServer::start(Plan::default()).await;
    let url = server.base_url();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let start_at = (now_ms + 400).to_string();
    let out = loadgen(
        "flood",
        &format!("--base-url {url} --open-loop 100 --duration 0.2 --tenant-flood flood- --start-at {start_at}"),
    )
    .await;
    let run_start = out.summary["run_start_unix_ms"].as_u64().unwrap();
    assert!(run_start >= now_ms + 400, "started before --start-at");
    let tenants: HashSet<String> = server
        .received()
        .into_iter()
        .map(|r| r.tenant.unwrap())
        .collect();
    assert_eq!(tenants.len(), 20, "{tenants:?}");
    assert!(
        tenants
            .iter()
            .all(|t| t.starts_with("flood-") && t.len() == 6 + 16)
    );
    let recorded: HashSet<String> = out
        .records
        .iter()
        .map(|r| r["tenant"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(recorded, tenants);
}

/// The coordinated-omission property: the server stalls once for 1.5 s.
/// In the open loop, the requests due during the stall are still sent on
/// schedule, wait for it, and carry its cost in their latency; the closed
/// loop's clients sit in the stall and send almost nothing, so its record
/// of that window holds one or two slow requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_charges_a_stall_to_every_request_it_delays() {
    const STALL_MS: f64 = 1500.0;
    let plan = Plan {
        first_byte_delay: Duration::from_millis(10),
        stall: Some((10, Duration::from_millis(STALL_MS as u64))),
        ..Plan::default()
    };
    let (open_server, closed_server) =
        tokio::join!(TestServer::start(plan.clone()), TestServer::start(plan));
    let (open_url, closed_url) = (open_server.base_url(), closed_server.base_url());
    let open_args = format!("--base-url {open_url} --open-loop 50 --duration 2.2");
    let closed_args = format!("--base-url {closed_url} --closed-loop 2 --duration 2.2");
    let (open, closed) = tokio::join!(
        loadgen("co-open", &open_args),
        loadgen("co-closed", &closed_args)
    );

    // Requests due while the server stalled, from the stalling request on.
    let in_stall = |out: &common::Output, id: usize| -> Vec<f64> {
        let from = f(&out.records[id]["scheduled_ms"]);
        out.records
            .iter()
            .filter(|r| (from..from + STALL_MS).contains(&f(&r["scheduled_ms"])))
            .map(|r| f(&r["total_ms"]))
            .collect()
    };
    let open_stall = in_stall(&open, 10);
    assert!(
        open_stall.len() >= 50,
        "{} open-loop requests due in the stall",
        open_stall.len()
    );
    // Latency falls from ~1.5 s for the first request due in the stall to
    // ~0 for the last: about half of them waited 0.75 s or more.
    let slow = open_stall.iter().filter(|t| **t >= 700.0).count();
    assert!(
        slow >= open_stall.len() / 4,
        "{slow} of {} waited >= 0.7 s",
        open_stall.len()
    );
    assert!(
        open_stall[0] >= 1000.0,
        "the stalling request took {} ms",
        open_stall[0]
    );
    let open_p90 = f(&open.summary["latency_ms"]["total_ok"]["p90"]);
    assert!(open_p90 >= 500.0, "open-loop p90 {open_p90} ms");

    // The closed loop's stalling request is whichever was tenth to arrive.
    let closed_stall = in_stall(&closed, 10);
    assert!(
        closed_stall.len() <= 4,
        "{} closed-loop requests due in the stall",
        closed_stall.len()
    );
    let closed_slow = closed
        .records
        .iter()
        .filter(|r| f(&r["total_ms"]) >= 700.0)
        .count();
    assert!(closed_slow <= 3, "{closed_slow} slow closed-loop requests");
    assert_eq!(
        open.summary["counts"]["ok"],
        open.summary["counts"]["requests"]
    );

    // The timeline holds one entry per window, the stall visible in TTFT.
    let windows = open.summary["windows"].as_array().unwrap();
    assert!(
        (2..=3).contains(&windows.len()),
        "{} windows",
        windows.len()
    );
    let total: u64 = windows
        .iter()
        .map(|w| w["counts"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(total, open.records.len() as u64);
    assert!(windows.iter().any(|w| f(&w["ttft_ms"]["p99"]) >= 1000.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_cap_are_dropped_and_recorded() {
    let server = TestServer::start(Plan {
        first_byte_delay: Duration::from_secs(1),
        ..Plan::default()
    })
    .await;
    let url = server.base_url();
    let out = loadgen(
        "drops",
        &format!("--base-url {url} --open-loop 100 --duration 0.5 --max-in-flight 5"),
    )
    .await;
    let c = &out.summary["counts"];
    assert_eq!(
        (c["requests"].as_u64(), c["ok"].as_u64()),
        (Some(50), Some(5))
    );
    assert_eq!(c["dropped_by_generator"], 45);
    let dropped: Vec<_> = out
        .records
        .iter()
        .filter(|r| r["outcome"] == "dropped")
        .collect();
    assert_eq!(dropped.len(), 45);
    assert!(
        dropped
            .iter()
            .all(|r| r["start_ms"].is_null() && r["status"] == 0)
    );
    assert_eq!(server.received().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_and_timeouts_are_transport_errors() {
    let server = TestServer::start(Plan {
        answers: vec![Answer::Blackhole],
        ..Plan::default()
    })
    .await;
    // A port that was just free: nothing listens there.
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (url, refused) = (server.base_url(), format!("http://127.0.0.1:{closed_port}"));
    let hung_args = format!("--base-url {url} --open-loop 20 --duration 0.2 --timeout 0.3");
    let down_args = format!("--base-url {refused} --open-loop 20 --duration 0.2");
    let (hung, down) = tokio::join!(
        loadgen("timeouts", &hung_args),
        loadgen("refused", &down_args)
    );
    assert_eq!(
        hung.summary["counts"]["transport_errors"],
        json!({"timeout": 4})
    );
    for r in &hung.records {
        assert_eq!(
            (r["status"].as_u64(), r["error_kind"].as_str()),
            (Some(0), Some("timeout"))
        );
        assert!(f(&r["total_ms"]) >= 290.0);
    }
    assert_eq!(
        down.summary["counts"]["transport_errors"],
        json!({"connect": 4})
    );
    assert!(down.summary["latency_ms"]["ttft_ok"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_sending_lets_requests_finish_and_writes_outputs() {
    let server = TestServer::start(Plan {
        first_byte_delay: Duration::from_millis(300),
        ..Plan::default()
    })
    .await;
    let url = server.base_url();
    let out = common::out_dir("sigterm");
    let child = common::command(
        &out,
        &format!("--base-url {url} --open-loop 20 --duration 60"),
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    signal(&child, "TERM");
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(8), child.wait_with_output())
        .await
        .expect("loadgen stopped")
        .unwrap();
    assert!(output.status.success());
    // In-flight requests needed at most 0.3 s more, well inside the grace.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let run = common::read_outputs(&out, output.status, String::new());
    assert_eq!(run.summary["interrupted"], true);
    let n = run.records.len();
    assert!((5..=40).contains(&n), "{n} requests in ~0.7 s at 20/s");
    assert!(
        outcomes(&run.records).iter().all(|o| *o == "ok"),
        "in-flight requests finished"
    );
    assert_eq!(server.received().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_aborts_what_is_still_in_flight() {
    let server = TestServer::start(Plan {
        answers: vec![Answer::Blackhole],
        ..Plan::default()
    })
    .await;
    let url = server.base_url();
    let out = common::out_dir("abort");
    let child = common::command(
        &out,
        &format!("--base-url {url} --open-loop 20 --duration 60"),
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    signal(&child, "INT");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, "TERM");
    let output = tokio::time::timeout(Duration::from_secs(3), child.wait_with_output())
        .await
        .expect("loadgen stopped at the second signal")
        .unwrap();
    let run = common::read_outputs(&out, output.status, String::new());
    assert!(!run.records.is_empty());
    for r in &run.records {
        assert_eq!(
            (r["outcome"].as_str(), r["error_kind"].as_str()),
            (Some("transport_error"), Some("aborted"))
        );
    }
}

fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// A closed-loop client pauses after a failed request when asked to, so a
/// limiter that refuses at once is not hammered in a busy loop; successes
/// are not paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_pauses_after_failures_only() {
    let server = TestServer::start(Plan {
        answers: vec![Answer::Status(429), Answer::Ok],
        ..Plan::default()
    })
    .await;
    let url = server.base_url();
    let out = loadgen(
        "error-pause",
        &format!("--base-url {url} --closed-loop 1 --duration 1.2 --error-pause-ms 250"),
    )
    .await;
    let c = &out.summary["counts"];
    let requests = c["requests"].as_u64().unwrap();
    // Each 429 costs a 250 ms pause, each ok none: about 5 pairs in 1.2 s.
    // Without the pause it would be thousands.
    assert!((4..=14).contains(&requests), "{requests} requests: {c}");
    assert_eq!(
        c["http_429"].as_u64().unwrap() + c["ok"].as_u64().unwrap(),
        requests
    );
}
