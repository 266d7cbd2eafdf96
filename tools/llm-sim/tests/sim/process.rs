//! The binary as the lab runs it: readiness line, requests, clean SIGTERM exit.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::chat;
use crate::client::{get, post};

#[tokio::test]
async fn binary_prints_one_readiness_line_and_exits_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--zone",
            "eu-1",
            "--instance",
            "proc-1",
            "--models",
            "a,b",
            "--ttft-ms",
            "0",
            "--tokens-per-sec",
            "0",
            "--quiet",
            "--threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true) // killed even if an assertion fails
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("readiness line within 10 s")
        .unwrap()
        .expect("a readiness line");
    let ready: llm_sim::Readiness = serde_json::from_str(&line).unwrap();
    assert_eq!(ready.zone, "eu-1");
    assert_eq!(ready.instance, "proc-1");
    assert_ne!(ready.listen.port(), 0);
    assert_ne!(ready.control.port(), 0);
    let keys: Vec<String> =
        serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&line)
            .unwrap()
            .keys()
            .cloned()
            .collect();
    assert_eq!(keys.len(), 4, "{line}");

    let resp = post(ready.listen, "/v1/chat/completions", &chat("b", json!({}))).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-llm-sim-zone"), Some("eu-1"));
    assert_eq!(
        get(ready.control, "/_sim/stats").await.json()["requests"],
        1
    );

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exit within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Nothing else on stdout: exactly one line.
    assert_eq!(lines.next_line().await.unwrap(), None);
}
