//! Seeded mesh scenarios: many requests arriving over virtual time through a
//! filter chain into simulated clusters, summarised as a trace and an outcome
//! distribution.
//!
//! A scenario is pure data plus a seed. Arrivals are a Poisson process drawn
//! from the seed, endpoints answer from the same seeded generator, and the
//! host processes events in (time, sequence) order, so running a scenario twice
//! gives the identical trace: a failing scenario can be replayed exactly.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use crate::host::{Host, HostOptions, PluginConfig, Request, RouteConfig};
use crate::prng::Prng;
use crate::upstream::Cluster;

/// Builds the request with this index (its arrival order).
pub type RequestFactory = Box<dyn Fn(usize, &mut Prng) -> Request>;

/// A scenario: who sends what, when, through which filters, to which upstreams.
pub struct Scenario {
    pub seed: u64,
    /// Number of requests to send.
    pub requests: usize,
    /// Mean arrival rate (requests per virtual second, Poisson arrivals).
    pub rate_per_second: f64,
    pub workers: usize,
    pub clusters: Vec<Cluster>,
    /// The filter chain, in request order.
    pub filters: Vec<PluginConfig>,
    pub route: RouteConfig,
    pub request: RequestFactory,
}

impl Scenario {
    /// A scenario with defaults: 2 workers, 100 requests/s, `GET /` requests.
    pub fn new(seed: u64, requests: usize) -> Self {
        Self {
            seed,
            requests,
            rate_per_second: 100.0,
            workers: 2,
            clusters: Vec::new(),
            filters: Vec::new(),
            route: RouteConfig::default(),
            request: Box::new(|_, _| Request::get("/")),
        }
    }
}

/// What happened to one request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceLine {
    /// Arrival index.
    pub index: u64,
    /// Arrival time since the start (µs).
    pub start_us: u64,
    pub worker: usize,
    pub status: u32,
    pub attempts: u64,
    pub upstream: Option<String>,
    /// Time to response headers (µs).
    pub headers_us: Option<u64>,
    /// Time to the end of the response (µs).
    pub duration_us: Option<u64>,
    pub body_bytes: usize,
    pub local_reply: bool,
    pub reset: bool,
}

impl fmt::Display for TraceLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{:05} t={}us w{} {} attempts={} upstream={} ttfb={:?}us dur={:?}us bytes={}{}{}",
            self.index,
            self.start_us,
            self.worker,
            self.status,
            self.attempts,
            self.upstream.as_deref().unwrap_or("-"),
            self.headers_us,
            self.duration_us,
            self.body_bytes,
            if self.local_reply { " local" } else { "" },
            if self.reset { " reset" } else { "" },
        )
    }
}

impl TraceLine {
    /// The outcome class used in [`Report::outcomes`]: `"200"`, `"503 local"`, `"200 reset"`...
    pub fn outcome(&self) -> String {
        let mut s = self.status.to_string();
        if self.local_reply {
            s.push_str(" local");
        }
        if self.reset {
            s.push_str(" reset");
        }
        s
    }
}

/// The result of a scenario.
pub struct Report {
    /// One line per request, in arrival order.
    pub trace: Vec<TraceLine>,
    /// Count per outcome class.
    pub outcomes: BTreeMap<String, usize>,
    /// Answers per upstream endpoint (the one that answered last).
    pub by_upstream: BTreeMap<String, usize>,
    /// Requests by number of attempts.
    pub attempts: BTreeMap<u64, usize>,
    /// Counters and gauges at the end.
    pub metrics: BTreeMap<String, i64>,
    /// Virtual time the scenario took.
    pub virtual_time: Duration,
    /// Wall time it took to simulate.
    pub wall_time: Duration,
    /// Guest calls made.
    pub guest_calls: u64,
    /// Hash of the whole trace (equal hashes: identical traces).
    pub trace_hash: u64,
    /// VM failures (plugin, worker, reason); a healthy run has none.
    pub vm_failures: Vec<(String, usize, String)>,
}

impl Report {
    /// Fraction of requests with this outcome class.
    pub fn share(&self, outcome: &str) -> f64 {
        *self.outcomes.get(outcome).unwrap_or(&0) as f64 / self.trace.len().max(1) as f64
    }

    /// Simulated requests per wall-clock second.
    pub fn requests_per_second(&self) -> f64 {
        self.trace.len() as f64 / self.wall_time.as_secs_f64().max(1e-9)
    }

    /// Percentile (0–100) of the response duration, over completed requests.
    pub fn duration_percentile(&self, p: f64) -> Option<Duration> {
        let mut durations: Vec<u64> = self.trace.iter().filter_map(|t| t.duration_us).collect();
        if durations.is_empty() {
            return None;
        }
        durations.sort_unstable();
        let rank = ((p / 100.0) * (durations.len() - 1) as f64).round() as usize;
        Some(Duration::from_micros(
            durations[rank.min(durations.len() - 1)],
        ))
    }
}

/// Runs a scenario to completion.
pub fn run(scenario: Scenario) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let options = HostOptions {
        workers: scenario.workers,
        seed: scenario.seed,
        route: scenario.route.clone(),
        ..HostOptions::default()
    };
    let mut host = Host::new(options);
    for cluster in scenario.clusters {
        host.add_cluster(cluster);
    }
    for filter in scenario.filters {
        host.add_filter(filter)?;
    }
    let mut arrivals = Prng::derive(scenario.seed, 0xA11);
    let mut at = 0f64;
    for index in 0..scenario.requests {
        // Exponential inter-arrival times: a Poisson process.
        let u = arrivals.next_f64();
        at += -(1.0 - u).ln() / scenario.rate_per_second;
        let request = (scenario.request)(index, &mut arrivals);
        host.schedule_request(Duration::from_secs_f64(at), None, request, index as u64);
    }
    let limit = Duration::from_secs_f64(at) + Duration::from_secs(600);
    let expected = scenario.requests;
    host.run_until(limit, |h| h.finished_count() >= expected);

    let start = host.options().start_time_ns;
    let mut trace: Vec<TraceLine> = host
        .completed()
        .into_iter()
        .map(|(_, tag, r)| TraceLine {
            index: tag.unwrap_or(u64::MAX),
            start_us: (r.started_ns - start) / 1_000,
            worker: r.worker,
            status: r.status,
            attempts: r.attempts,
            upstream: r.upstream.clone(),
            headers_us: r.headers_at_ns.map(|t| (t - r.started_ns) / 1_000),
            duration_us: r.completed_ns.map(|t| (t - r.started_ns) / 1_000),
            body_bytes: r.body.len(),
            local_reply: r.local_reply,
            reset: r.reset,
        })
        .collect();
    trace.sort_by_key(|t| t.index);
    let mut outcomes = BTreeMap::new();
    let mut by_upstream = BTreeMap::new();
    let mut attempts = BTreeMap::new();
    let mut hasher = DefaultHasher::new();
    for line in &trace {
        *outcomes.entry(line.outcome()).or_insert(0) += 1;
        *by_upstream
            .entry(line.upstream.clone().unwrap_or_else(|| "-".into()))
            .or_insert(0) += 1;
        *attempts.entry(line.attempts).or_insert(0) += 1;
        line.hash(&mut hasher);
    }
    let metrics = host
        .metrics()
        .all()
        .iter()
        .map(|(k, m)| (k.clone(), m.value))
        .collect();
    Ok(Report {
        outcomes,
        by_upstream,
        attempts,
        metrics,
        virtual_time: host.elapsed(),
        wall_time: wall.elapsed(),
        guest_calls: host.guest_calls,
        trace_hash: hasher.finish(),
        vm_failures: host.vm_failures(),
        trace,
    })
}
