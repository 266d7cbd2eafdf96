//! Running a load: the open-loop schedule, the closed-loop clients, signals,
//! and writing the outputs.
//!
//! The open loop computes each request's due time as `start + i / rate` and
//! measures from it. It does not use a rate limiter such as `governor`: a
//! limiter answers "may one go now?", and when the generator falls behind
//! (a busy runtime, a full in-flight cap) it lets the missed requests vanish
//! or start late with a fresh clock, which is coordinated omission again. A
//! schedule knows when each request was due, starts late requests at once,
//! and charges the delay to their latency.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::{RequestSpec, Requester, aborted, ms};
use crate::config::{Config, MAX_START_WAIT, Mode};
use crate::record::{Outcome, Record};
use crate::summary::{Stats, Summary};

/// How long in-flight requests may finish after SIGINT/SIGTERM.
pub const SIGNAL_GRACE: Duration = Duration::from_secs(5);

/// Runs the load described by `config`, writes `requests.jsonl` and
/// `summary.json` into `config.out`, and returns the summary.
pub async fn run(config: Config) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let config = Arc::new(config);

    // First signal: stop sending and drain; second: abort what is left.
    let (stop_tx, stop) = watch::channel(false);
    let (abort_tx, abort) = watch::channel(false);
    let signals = tokio::spawn(watch_signals(stop_tx, abort_tx.clone()));

    if let Some(at) = config.start_at_unix_ms {
        wait_until_unix_ms(at, stop.clone()).await?;
    }
    let run_start = Instant::now();
    let run_start_unix_ms = unix_ms_now();

    let (tx, rx) = mpsc::unbounded_channel();
    let path = config.out.join("requests.jsonl");
    let window_ms = config.window_ms.get();
    let writer = tokio::task::spawn_blocking(move || write_records(&path, rx, window_ms));

    let pool = match config.mode {
        Mode::OpenLoop { .. } => config.max_in_flight.get() as usize,
        Mode::ClosedLoop { clients } => clients.get() as usize,
    };
    let requester = Requester::new(config.clone(), run_start, pool)?;
    let mut tasks = JoinSet::new();
    match config.mode {
        Mode::OpenLoop { rate } => {
            open_loop(
                &config, rate, &requester, run_start, &tx, &stop, &abort, &mut tasks,
            )
            .await
        }
        Mode::ClosedLoop { clients } => closed_loop(
            &config,
            clients.get(),
            &requester,
            run_start,
            &tx,
            &stop,
            &abort,
            &mut tasks,
        ),
    }
    drop(tx);

    // Requests end by themselves within --timeout; a signal cuts that to
    // the grace period, a second signal to nothing.
    let mut grace_over = {
        let mut stop = stop.clone();
        Box::pin(async move {
            aborted(&mut stop).await;
            tokio::time::sleep(SIGNAL_GRACE).await;
        })
    };
    loop {
        tokio::select! {
            joined = tasks.join_next() => if joined.is_none() { break },
            () = &mut grace_over => { let _ = abort_tx.send(true); }
        }
    }
    let elapsed_ms = ms(run_start.elapsed());
    let interrupted = *stop.borrow();
    signals.abort();

    let stats = writer.await.context("record writer")??;
    let (mode, rate, clients) = match config.mode {
        Mode::OpenLoop { rate } => ("open_loop", Some(rate), None),
        Mode::ClosedLoop { clients } => ("closed_loop", None, Some(clients.get())),
    };
    let summary = Summary {
        run_start_unix_ms,
        mode,
        rate,
        clients,
        duration_s: config.duration.as_secs_f64(),
        elapsed_ms,
        interrupted,
        window_ms,
        counts: stats.counts().clone(),
        latency_ms: stats.latencies(),
        windows: stats.windows(),
    };
    let path = config.out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    config: &Config,
    rate: f64,
    requester: &Requester,
    run_start: Instant,
    tx: &mpsc::UnboundedSender<Record>,
    stop: &watch::Receiver<bool>,
    abort: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight.get() as usize));
    let limit = config.max_requests.unwrap_or(u64::MAX);
    let mut stop = stop.clone();
    // Bounded: the due times grow with i and end at the duration.
    for id in 0..limit {
        let offset = Duration::from_secs_f64(id as f64 / rate);
        if offset >= config.duration {
            break;
        }
        let due = run_start + offset;
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = aborted(&mut stop) => break,
        }
        if *stop.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let spec = RequestSpec::derive(config, id, None);
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let requester = requester.clone();
                let tx = tx.clone();
                let abort = abort.clone();
                tasks.spawn(async move {
                    let record = requester.send(spec, due, abort).await;
                    drop(permit);
                    let _ = tx.send(record);
                });
            }
            Err(_) => {
                let record = Record::dropped(
                    id,
                    spec.stream,
                    spec.tenant,
                    ms(due.saturating_duration_since(run_start)),
                );
                let _ = tx.send(record);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn closed_loop(
    config: &Arc<Config>,
    clients: u32,
    requester: &Requester,
    run_start: Instant,
    tx: &mpsc::UnboundedSender<Record>,
    stop: &watch::Receiver<bool>,
    abort: &watch::Receiver<bool>,
    tasks: &mut JoinSet<()>,
) {
    let next_id = Arc::new(AtomicU64::new(0));
    let end = run_start + config.duration;
    let limit = config.max_requests.unwrap_or(u64::MAX);
    for client in 0..clients {
        let (config, requester, tx) = (config.clone(), requester.clone(), tx.clone());
        let (stop, abort, next_id) = (stop.clone(), abort.clone(), next_id.clone());
        // Bounded: by the duration and the request limit.
        tasks.spawn(async move {
            loop {
                let now = Instant::now();
                if now >= end || *stop.borrow() {
                    break;
                }
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                if id >= limit {
                    break;
                }
                let spec = RequestSpec::derive(&config, id, Some(client));
                let record = requester.send(spec, now, abort.clone()).await;
                let failed = record.outcome != Outcome::Ok;
                let _ = tx.send(record);
                if failed && !config.error_pause.is_zero() {
                    // Bounded by the run's end: no client outlives the duration.
                    let until = (Instant::now() + config.error_pause).min(end);
                    tokio::time::sleep_until(until).await;
                }
            }
        });
    }
}

/// Writes each record as a JSON line and counts it; returns the counts.
fn write_records(
    path: &Path,
    mut rx: mpsc::UnboundedReceiver<Record>,
    window_ms: u64,
) -> anyhow::Result<Stats> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = BufWriter::new(file);
    let mut stats = Stats::new(window_ms);
    while let Some(record) = rx.blocking_recv() {
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
        stats.add(&record);
    }
    out.flush()?;
    Ok(stats)
}

async fn watch_signals(stop: watch::Sender<bool>, abort: watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!(
            "loadgen: cannot install signal handlers; SIGINT/SIGTERM will kill without outputs"
        );
        return;
    };
    for sender in [stop, abort] {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("loadgen: signal received, stopping");
        let _ = sender.send(true);
    }
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Sleeps until the wall clock reads `at` (Unix ms); returns at once if that
/// has passed, and refuses a time more than [`MAX_START_WAIT`] ahead.
async fn wait_until_unix_ms(at: u64, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let now = unix_ms_now();
    let wait = Duration::from_millis(at.saturating_sub(now));
    anyhow::ensure!(
        wait <= MAX_START_WAIT,
        "--start-at {at} is {} s away; the most is {} s",
        wait.as_secs(),
        MAX_START_WAIT.as_secs()
    );
    tokio::select! {
        () = tokio::time::sleep(wait) => Ok(()),
        () = aborted(&mut stop) => Ok(()),
    }
}
