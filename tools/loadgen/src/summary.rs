//! Counting outcomes and latency percentiles, overall and per time window,
//! into `summary.json`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::record::{Outcome, Record};

/// Highest latency a histogram holds, in microseconds (one hour); longer
/// values are recorded as this.
const MAX_MICROS: u64 = 3_600_000_000;

/// Outcome counts over the whole run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// Every request due, sent or dropped.
    pub requests: u64,
    pub ok: u64,
    /// 4xx other than 429, by status code.
    pub http_4xx: BTreeMap<u16, u64>,
    pub http_429: u64,
    /// 5xx by status code.
    pub http_5xx: BTreeMap<u16, u64>,
    /// Statuses neither 2xx, 4xx nor 5xx, by code.
    pub http_other: BTreeMap<u16, u64>,
    /// No status received, by error kind.
    pub transport_errors: BTreeMap<&'static str, u64>,
    /// 2xx answers whose body stopped early, by error kind.
    pub cut_streams: BTreeMap<&'static str, u64>,
    pub dropped_by_generator: u64,
}

/// Outcome counts of one window, flattened for plotting.
#[derive(Debug, Default, Clone, Serialize)]
pub struct WindowCounts {
    pub requests: u64,
    pub ok: u64,
    pub http_4xx: u64,
    pub http_429: u64,
    pub http_5xx: u64,
    pub transport_errors: u64,
    pub cut_streams: u64,
    pub dropped_by_generator: u64,
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// The two percentiles a timeline plot shows, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct WindowPercentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
}

/// One window of the timeline: the requests *due* in `[start_ms, end_ms)`.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub start_ms: u64,
    pub end_ms: u64,
    pub counts: WindowCounts,
    /// TTFT of the window's `ok` requests; null when there are none.
    pub ttft_ms: Option<WindowPercentiles>,
    /// Total time of the window's `ok` requests; null when there are none.
    pub total_ms: Option<WindowPercentiles>,
}

/// Latency percentiles over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Latencies {
    /// Time to first token of `ok` requests.
    pub ttft_ok: Option<Percentiles>,
    /// Total time of `ok` requests.
    pub total_ok: Option<Percentiles>,
    /// Total time of every request sent, whatever its outcome (timeouts
    /// and slow errors included; dropped requests excluded).
    pub total_all: Option<Percentiles>,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Wall-clock time of the run start (Unix milliseconds); every `_ms`
    /// time in requests.jsonl is relative to it.
    pub run_start_unix_ms: u64,
    pub mode: &'static str,
    /// Open loop: requests per second.
    pub rate: Option<f64>,
    /// Closed loop: clients.
    pub clients: Option<u32>,
    pub duration_s: f64,
    /// From the run start until the last request ended.
    pub elapsed_ms: f64,
    /// Whether SIGINT/SIGTERM stopped the run early.
    pub interrupted: bool,
    pub window_ms: u64,
    pub counts: Counts,
    pub latency_ms: Latencies,
    pub windows: Vec<Window>,
}

/// Accumulates records as they arrive.
pub struct Stats {
    window_ms: u64,
    counts: Counts,
    ttft_ok: Histogram<u64>,
    total_ok: Histogram<u64>,
    total_all: Histogram<u64>,
    windows: Vec<WindowStats>,
}

struct WindowStats {
    counts: WindowCounts,
    ttft_ok: Histogram<u32>,
    total_ok: Histogram<u32>,
}

fn histogram<T: hdrhistogram::Counter>(sigfig: u8) -> Histogram<T> {
    // Bounds are constants within hdrhistogram's limits.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_MICROS, sigfig).expect("valid histogram bounds")
}

fn micros(ms: f64) -> u64 {
    (ms * 1000.0).round().clamp(1.0, MAX_MICROS as f64) as u64
}

impl Stats {
    /// Empty statistics with windows `window_ms` wide.
    pub fn new(window_ms: u64) -> Stats {
        Stats {
            window_ms: window_ms.max(1),
            counts: Counts::default(),
            ttft_ok: histogram(3),
            total_ok: histogram(3),
            total_all: histogram(3),
            windows: Vec::new(),
        }
    }

    /// Counts one record.
    pub fn add(&mut self, r: &Record) {
        let c = &mut self.counts;
        c.requests += 1;
        let index = (r.scheduled_ms.max(0.0) as u64 / self.window_ms) as usize;
        while self.windows.len() <= index {
            self.windows.push(WindowStats {
                counts: WindowCounts::default(),
                // Two significant figures and 32-bit counters keep a window
                // at about 13 KB, so long runs stay small.
                ttft_ok: histogram(2),
                total_ok: histogram(2),
            });
        }
        let w = &mut self.windows[index];
        w.counts.requests += 1;
        match r.outcome {
            Outcome::Ok => {
                c.ok += 1;
                w.counts.ok += 1;
                if let Some(t) = r.ttft_ms {
                    self.ttft_ok.saturating_record(micros(t));
                    w.ttft_ok.saturating_record(micros(t));
                }
                if let Some(t) = r.total_ms {
                    self.total_ok.saturating_record(micros(t));
                    w.total_ok.saturating_record(micros(t));
                }
            }
            Outcome::HttpError => match r.status {
                429 => {
                    c.http_429 += 1;
                    w.counts.http_429 += 1;
                }
                400..=499 => {
                    *c.http_4xx.entry(r.status).or_default() += 1;
                    w.counts.http_4xx += 1;
                }
                500..=599 => {
                    *c.http_5xx.entry(r.status).or_default() += 1;
                    w.counts.http_5xx += 1;
                }
                s => *c.http_other.entry(s).or_default() += 1,
            },
            Outcome::TransportError => {
                let kind = r.error_kind.map_or("other", |k| k.name());
                *c.transport_errors.entry(kind).or_default() += 1;
                w.counts.transport_errors += 1;
            }
            Outcome::Cut => {
                let kind = r.error_kind.map_or("other", |k| k.name());
                *c.cut_streams.entry(kind).or_default() += 1;
                w.counts.cut_streams += 1;
            }
            Outcome::Dropped => {
                c.dropped_by_generator += 1;
                w.counts.dropped_by_generator += 1;
            }
        }
        if r.outcome != Outcome::Dropped
            && let Some(t) = r.total_ms
        {
            self.total_all.saturating_record(micros(t));
        }
    }

    /// The counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Percentiles and the timeline, for `summary.json`.
    pub fn latencies(&self) -> Latencies {
        Latencies {
            ttft_ok: percentiles(&self.ttft_ok),
            total_ok: percentiles(&self.total_ok),
            total_all: percentiles(&self.total_all),
        }
    }

    /// The timeline, one entry per window from the run start to the last
    /// request due, empty windows included.
    pub fn windows(&self) -> Vec<Window> {
        self.windows
            .iter()
            .enumerate()
            .map(|(i, w)| Window {
                start_ms: i as u64 * self.window_ms,
                end_ms: (i as u64 + 1) * self.window_ms,
                counts: w.counts.clone(),
                ttft_ms: window_percentiles(&w.ttft_ok),
                total_ms: window_percentiles(&w.total_ok),
            })
            .collect()
    }
}

fn to_ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn percentiles(h: &Histogram<u64>) -> Option<Percentiles> {
    (!h.is_empty()).then(|| Percentiles {
        count: h.len(),
        p50: to_ms(h.value_at_quantile(0.50)),
        p90: to_ms(h.value_at_quantile(0.90)),
        p99: to_ms(h.value_at_quantile(0.99)),
        p99_9: to_ms(h.value_at_quantile(0.999)),
        max: to_ms(h.max()),
    })
}

fn window_percentiles(h: &Histogram<u32>) -> Option<WindowPercentiles> {
    (!h.is_empty()).then(|| WindowPercentiles {
        count: h.len(),
        p50: to_ms(h.value_at_quantile(0.50)),
        p99: to_ms(h.value_at_quantile(0.99)),
    })
}
