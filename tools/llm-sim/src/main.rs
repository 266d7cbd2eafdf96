//! The `llm-sim` binary: parse flags, start, print the readiness line, run
//! until SIGTERM or SIGINT.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use llm_sim::{Config, RunningServer};

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if config.threads > 1 {
            builder.worker_threads(config.threads);
        }
        builder.enable_all().build()?
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let quiet = config.quiet;
    let server = RunningServer::start(config).await?;
    let line = serde_json::to_string(server.readiness())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").context("writing the readiness line")?;
        out.flush().context("flushing the readiness line")?;
    }
    if !quiet {
        eprintln!(
            "llm-sim: serving {} (control {})",
            server.listen_addr(),
            server.control_addr()
        );
    }
    wait_for_signal().await?;
    if !quiet {
        eprintln!("llm-sim: shutting down");
    }
    drop(server);
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}
