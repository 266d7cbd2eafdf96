use clap::Parser;
use sluice_loadgen::{Args, Config, Summary, run};

fn main() -> std::process::ExitCode {
    let config = match Config::try_from(Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let out = config.out.clone();
    match runtime.block_on(run(config)) {
        Ok(summary) => {
            print_summary(&summary, &out);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_summary(s: &Summary, out: &std::path::Path) {
    let c = &s.counts;
    let load = match (s.rate, s.clients) {
        (Some(rate), _) => format!("open loop {rate}/s"),
        (_, Some(n)) => format!("closed loop, {n} clients"),
        _ => String::new(),
    };
    println!(
        "{load}, {:.1} s{}: {} requests",
        s.elapsed_ms / 1000.0,
        if s.interrupted { " (interrupted)" } else { "" },
        c.requests
    );
    println!(
        "  ok {}  429 {}  4xx {:?}  5xx {:?}  transport {:?}  cut {:?}  dropped {}",
        c.ok,
        c.http_429,
        c.http_4xx,
        c.http_5xx,
        c.transport_errors,
        c.cut_streams,
        c.dropped_by_generator
    );
    for (name, p) in [
        ("ttft (ok)", &s.latency_ms.ttft_ok),
        ("total (ok)", &s.latency_ms.total_ok),
        ("total (all sent)", &s.latency_ms.total_all),
    ] {
        if let Some(p) = p {
            println!(
                "  {name:<17} ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                p.p50, p.p90, p.p99, p.p99_9, p.max
            );
        }
    }
    println!("  outputs in {}", out.display());
}
