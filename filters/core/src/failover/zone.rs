//! A backend's zones in shared data: their recent signals, their health,
//! and the share of new requests each is granted.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::quota::Headroom;
use crate::config::{FailoverConfig, OutlierConfig};
use crate::outlier::estimate::{Estimate, aged};
use crate::outlier::{BackendState, Health, Run};
use crate::time::Timestamp;

/// Health is kept in steps of 1/LEVELS (5%): small wobbles do not count as
/// changes, and the fail-back window stays a handful of entries.
pub const LEVELS: u8 = 20;

/// A zone granted less than this (10%) is drained: it gets probe requests
/// only.
pub const DRAINED: u8 = 2;

/// Levels within which a partly healthy zone counts as settled (no longer
/// recovering): it is then granted the level it held, rather than waiting
/// for a health it may never reach (an endpoint ejected for minutes).
pub const SETTLED: u8 = 2;

/// Time constant of a zone's failure share: short, so a zone that starts
/// failing every request is left within a tick or two.
pub const ERROR_WINDOW: Duration = Duration::from_secs(2);

/// Judged attempts (decayed) before a healthy zone's failure share counts:
/// one failed request of one is no zone outage.
pub const MIN_ATTEMPTS: f64 = 5.0;

/// Failures in a row (over all workers) that drain a zone at once, before
/// its failure share has moved: a zone that fails every request is left
/// within a tick. Five, Envoy's `consecutive_5xx`: a zone failing a fifth
/// of its attempts or more is drained too (a run of five comes every few
/// hundred attempts), rather than kept for the retries to cover; a steady
/// few percent is not (5% makes a run of five once in millions).
pub const CONSECUTIVE_FAILURES: u32 = 5;

/// Time constant of the time to first token a zone is the reference of
/// (what other zones' first tokens are judged against). Long, so that a
/// standby zone seen through its probes alone (one a second) rests on tens
/// of them: answers of mixed length (a whole non-streamed generation is
/// its own "first token") average out, rather than the last probe or two
/// setting the bar.
pub const REFERENCE_WINDOW: Duration = Duration::from_secs(30);

/// The span a zone's `requests_per_minute` and `tokens_per_minute` count
/// over.
pub const MINUTE: Duration = Duration::from_secs(60);

/// Requests and tokens over the last minute: the current minute's count and
/// the previous one's, weighted by how much of it still falls in the last
/// 60 s (the sliding-window counter of rate limiters, two numbers each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MinuteUse {
    /// The current minute's start.
    pub start: Timestamp,
    /// `(requests, tokens)` of the previous minute and of the current one.
    pub prev: (u64, u64),
    pub cur: (u64, u64),
}

impl MinuteUse {
    fn roll(&mut self, now: Timestamp) {
        if self.start == Timestamp::ZERO || now < self.start {
            // First use, or the clock went back: start afresh.
            *self = MinuteUse {
                start: now,
                ..MinuteUse::default()
            };
            return;
        }
        let minutes = now.since(self.start).as_secs() / MINUTE.as_secs();
        match minutes {
            0 => return,
            1 => self.prev = self.cur,
            _ => self.prev = (0, 0),
        }
        self.cur = (0, 0);
        self.start = self.start + MINUTE * u32::try_from(minutes).unwrap_or(u32::MAX);
    }

    fn add(&mut self, requests: u32, tokens: u64) {
        self.cur.0 = self.cur.0.saturating_add(u64::from(requests));
        self.cur.1 = self.cur.1.saturating_add(tokens);
    }

    /// Requests and tokens in the 60 s before `now` (after a roll to it).
    pub fn last_minute(&self, now: Timestamp) -> (f64, f64) {
        let into = (now.since(self.start).as_secs_f64() / MINUTE.as_secs_f64()).clamp(0.0, 1.0);
        let w = 1.0 - into;
        (
            self.prev.0 as f64 * w + self.cur.0 as f64,
            self.prev.1 as f64 * w + self.cur.1 as f64,
        )
    }
}

/// Why a zone's health is down: its largest factor below 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// Its endpoints are ejected or benched by 429s ([`crate::outlier`]).
    Endpoints,
    /// Its attempts fail (5xx, resets, timeouts, 429s).
    Errors,
    /// Its provider reports the quota nearly used (rate-limit headers).
    Quota,
    /// This proxy's use nears the zone's `requests_per_minute` or
    /// `tokens_per_minute`.
    Capacity,
    /// Its time to first token is an outlier against the other zones'.
    Slow,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Endpoints => "endpoints",
            Cause::Errors => "errors",
            Cause::Quota => "quota",
            Cause::Capacity => "capacity",
            Cause::Slow => "slow",
        }
    }
}

/// A zone as the policy declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct ZoneSpec {
    pub name: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

impl From<&crate::config::Zone> for ZoneSpec {
    fn from(z: &crate::config::Zone) -> Self {
        ZoneSpec {
            name: z.name.clone(),
            requests_per_minute: z.requests_per_minute.map(|n| n.get()),
            tokens_per_minute: z.tokens_per_minute.map(|n| n.get()),
        }
    }
}

/// What the endpoint records say of one zone.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ZoneInputs {
    pub endpoints: u32,
    pub in_rotation: u32,
    /// Attempts sent to its endpoints and not ended (all workers).
    pub outstanding: u32,
    /// Time to first token over its endpoints not ejected.
    pub ttft: Estimate,
}

/// Sums `outlier`'s endpoint records per zone (`zones` by name).
pub fn inputs(outlier: &BackendState, zones: &[ZoneSpec], now: Timestamp) -> Vec<ZoneInputs> {
    let mut out = vec![ZoneInputs::default(); zones.len()];
    for r in &outlier.endpoints {
        let Some(z) = zones.iter().position(|z| z.name == r.zone) else {
            continue;
        };
        let zi = &mut out[z];
        zi.endpoints += 1;
        zi.in_rotation += u32::from(r.in_rotation(now));
        zi.outstanding = zi.outstanding.saturating_add(r.outstanding);
        if !matches!(r.health, Health::Ejected { .. }) {
            zi.ttft.add(r.ttft.sum, r.ttft.weight);
        }
    }
    out
}

/// The latency rule zones are judged by (the backend's `[outlier]` one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub factor: f64,
    pub floor_ms: f64,
    pub min_samples: f64,
}

impl Latency {
    /// Whether a time to first token is slow against `reference` (the
    /// best other zone's); `None` without a reference or with the rule off.
    pub fn judge(&self, ms: f64, reference: Option<f64>) -> Option<bool> {
        let best = reference?;
        (self.factor > 0.0).then_some(ms > self.factor * best && ms > self.floor_ms)
    }

    pub fn of(cfg: &OutlierConfig) -> Self {
        Latency {
            factor: cfg.latency_factor,
            floor_ms: cfg.ttft_floor.as_secs_f64() * 1000.0,
            min_samples: f64::from(cfg.min_samples.max(1)),
        }
    }
}

/// One worker's record of one zone between two flushes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ZoneTally {
    /// Attempts sent (each takes from a provider's request quota).
    pub requests: u32,
    /// Attempts judged, and those that failed or were refused (429).
    pub judged: u32,
    pub failures: u32,
    /// Tokens the zone served (prompt and completion).
    pub tokens: u64,
    /// When the failed attempts started (the first [`RUN_SAMPLES`]), and
    /// the latest start of a successful one: a run of failures is counted
    /// in the order attempts were sent, so an answer to a request sent
    /// before the zone broke does not end the run its successors make.
    pub failure_starts: Vec<Timestamp>,
    pub last_success_start: Option<Timestamp>,
    /// Times to first token judged against the best other zone's
    /// ([`Latency::judge`]).
    pub slow: Run,
    /// Sum and count of successful attempts' times to first token, ms
    /// (the zone's reference estimate, [`REFERENCE_WINDOW`]).
    pub ttft_ms: f64,
    pub ttft_samples: u32,
    /// The newest rate-limit reading.
    pub reading: Option<Headroom>,
}

/// Failure start times a tally keeps (more than [`CONSECUTIVE_FAILURES`]
/// between two flushes drains the zone anyway).
pub const RUN_SAMPLES: usize = 64;

impl ZoneTally {
    /// Records an attempt's outcome; `failed` counts 429s.
    pub fn judge(&mut self, started: Timestamp, failed: bool) {
        self.judged += 1;
        if failed {
            self.failures += 1;
            if self.failure_starts.len() < RUN_SAMPLES {
                self.failure_starts.push(started);
            }
        } else {
            self.last_success_start = self.last_success_start.max(Some(started));
        }
    }

    /// Records a successful attempt's time to first token.
    pub fn first_token(&mut self, ms: f64) {
        if ms.is_finite() && ms >= 0.0 {
            self.ttft_ms += ms;
            self.ttft_samples = self.ttft_samples.saturating_add(1);
        }
    }

    /// Whether it holds a failure sent after its last success.
    pub fn ends_in_failure(&self) -> bool {
        self.failure_starts
            .iter()
            .any(|&f| self.last_success_start.is_none_or(|s| f > s))
    }

    pub fn is_empty(&self) -> bool {
        self.requests == 0
            && self.ttft_samples == 0
            && self.judged == 0
            && self.tokens == 0
            && self.reading.is_none()
            && self.slow == Run::default()
    }
}

/// One zone as every worker sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneRecord {
    pub name: String,
    /// When the decaying numbers were last aged.
    pub at: Timestamp,
    /// Judged attempts and failures, decayed over [`ERROR_WINDOW`].
    pub judged: f64,
    pub failures: f64,
    /// Failed attempts sent since the last successful one was sent, and
    /// when the latest of them was sent.
    pub consecutive: u32,
    pub last_failure_start: Timestamp,
    /// Slow first tokens since the last fast one.
    pub slow_run: u32,
    /// Its successful attempts' time to first token, decayed over
    /// [`REFERENCE_WINDOW`]: the reference of the other zones.
    pub ttft: Estimate,
    /// This proxy's use against the zone's per-minute quota.
    pub used: MinuteUse,
    pub reading: Option<Headroom>,
    /// Health at the last flush, in [0, 1], and its main cause when below 1.
    pub health: f64,
    pub cause: Option<Cause>,
    /// The share granted, in levels: drops with health at once, rises only
    /// to a level health held for `failback_after`.
    pub granted: u8,
    /// Health levels over the last `failback_after`, increasing (a sliding
    /// minimum: the first entry is the lowest level of the window).
    pub held: Vec<(Timestamp, u8)>,
    /// The last rise of `granted` (one per `failback_after` at most).
    pub raised_at: Timestamp,
    /// No probe before this.
    pub next_probe: Timestamp,
}

impl ZoneRecord {
    pub fn new(name: &str) -> Self {
        ZoneRecord {
            name: name.to_owned(),
            at: Timestamp::ZERO,
            judged: 0.0,
            failures: 0.0,
            consecutive: 0,
            last_failure_start: Timestamp::ZERO,
            slow_run: 0,
            ttft: Estimate::default(),
            used: MinuteUse::default(),
            reading: None,
            health: 1.0,
            cause: None,
            granted: LEVELS,
            held: Vec::new(),
            raised_at: Timestamp::ZERO,
            next_probe: Timestamp::ZERO,
        }
    }

    /// The granted share in [0, 1].
    pub fn granted_share(&self) -> f64 {
        f64::from(self.granted) / f64::from(LEVELS)
    }

    pub fn is_drained(&self) -> bool {
        self.granted < DRAINED
    }

    /// Times after `now` (the clock went back) are brought to `now`, so no
    /// wait is stretched by the jump.
    fn rebase(&mut self, now: Timestamp, probe_interval: Duration) {
        self.at = self.at.min(now);
        self.raised_at = self.raised_at.min(now);
        self.last_failure_start = self.last_failure_start.min(now);
        self.next_probe = self.next_probe.min(now + probe_interval);
        for (t, _) in &mut self.held {
            *t = (*t).min(now);
        }
    }

    fn age(&mut self, now: Timestamp) {
        if self.at == Timestamp::ZERO {
            self.at = now;
            return;
        }
        let keep = aged(self.at, now, ERROR_WINDOW);
        self.judged *= keep;
        self.failures *= keep;
        self.ttft.decay(aged(self.at, now, REFERENCE_WINDOW));
        self.at = now;
    }

    fn absorb(&mut self, t: &ZoneTally, now: Timestamp) {
        self.used.roll(now);
        self.used.add(t.requests, t.tokens);
        self.judged += f64::from(t.judged);
        self.failures += f64::from(t.failures);
        self.slow_run = t.slow.continue_from(self.slow_run);
        self.ttft.add(t.ttft_ms, f64::from(t.ttft_samples));
        let after_success = |f: &&Timestamp| t.last_success_start.is_none_or(|s| **f > s);
        let fresh = t.failure_starts.iter().filter(after_success).count() as u32;
        self.consecutive = match t.last_success_start {
            // A success sent after the run's last failure ends it.
            Some(s) if s > self.last_failure_start => fresh,
            _ => self.consecutive.saturating_add(t.failures),
        };
        if let Some(&latest) = t.failure_starts.iter().max() {
            self.last_failure_start = self.last_failure_start.max(latest);
        }
        self.reading = Headroom::newer(self.reading, t.reading);
    }
}

/// Every zone of one backend, as shared by all workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverState {
    pub zones: Vec<ZoneRecord>,
    /// Every reachable zone is drained: requests are spread over all.
    pub panic: bool,
}

/// What a flush changed, for logs and metrics (zones by index).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The zone's share fell under `min_healthy`: part of its traffic spills.
    Spilling {
        zone: usize,
        cause: Cause,
        share: f64,
    },
    /// The zone gets probes only.
    Drained { zone: usize, cause: Cause },
    /// Its share rose after it held a higher health for `failback_after`.
    Raised { zone: usize, from: f64, to: f64 },
    /// Every reachable zone is drained (`true`), or one is back (`false`).
    Panic(bool),
}

/// A flush's outcome.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flushed {
    pub events: Vec<Event>,
    /// Zones this worker may send one probe request to: drained ones (has
    /// it recovered?) and healthy ones the plan gives nothing (how fast is
    /// it? the latency the others are judged against).
    pub probes: Vec<usize>,
    /// Each reachable zone's share of new requests, by rank
    /// ([`super::plan::shares`]).
    pub shares: Vec<f64>,
    /// By zone: the time to first token its samples are judged against
    /// (the best other zone's recent mean), if one is known.
    pub references: Vec<Option<f64>>,
}

/// The quota factor of a use share: 1 up to `max`, then down to 0 at 100%.
fn quota_factor(used: f64, max: f64) -> f64 {
    if used <= max {
        1.0
    } else if max >= 1.0 {
        0.0
    } else {
        ((1.0 - used) / (1.0 - max)).clamp(0.0, 1.0)
    }
}

fn level(health: f64) -> u8 {
    (health.clamp(0.0, 1.0) * f64::from(LEVELS) + 1e-9).floor() as u8
}

impl FailoverState {
    /// Makes the records match the policy's zones (by name, in its order).
    pub fn align(&mut self, zones: &[ZoneSpec]) {
        if self.zones.len() == zones.len()
            && self.zones.iter().zip(zones).all(|(r, z)| r.name == z.name)
        {
            return;
        }
        let mut old = std::mem::take(&mut self.zones);
        for z in zones {
            let record = match old.iter().position(|r| r.name == z.name) {
                Some(i) => old.swap_remove(i),
                None => ZoneRecord::new(&z.name),
            };
            self.zones.push(record);
        }
    }

    /// Folds a worker's tallies in (indexed like `zones`), judges every
    /// zone's health from them and from `inputs`, moves the granted shares,
    /// and hands out probes of drained zones when `may_probe`. `reachable`
    /// are the zones requests may go to (panic is judged over them). A pure
    /// function of `self` and its arguments: re-run on a lost
    /// compare-and-swap.
    #[allow(clippy::too_many_arguments)]
    pub fn flush(
        &mut self,
        zones: &[ZoneSpec],
        tallies: &[ZoneTally],
        inputs: &[ZoneInputs],
        reachable: &[usize],
        cfg: &FailoverConfig,
        latency: &Latency,
        now: Timestamp,
        may_probe: bool,
    ) -> Flushed {
        self.align(zones);
        let mut out = Flushed::default();
        let full = level(cfg.min_healthy.get());
        for (i, r) in self.zones.iter_mut().enumerate() {
            r.rebase(now, cfg.probe_interval);
            r.age(now);
            if let Some(t) = tallies.get(i) {
                r.absorb(t, now);
            }
        }
        // A zone's time to first token, judged on any sample once the zone
        // is known sick (a drained zone is seen through its probes only).
        let ttft: Vec<Option<f64>> = self
            .zones
            .iter()
            .zip(inputs)
            .map(|(r, zi)| {
                let enough = zi.ttft.weight >= latency.min_samples
                    || (r.granted < full && zi.ttft.weight > 1e-6);
                zi.ttft.mean().filter(|_| enough)
            })
            .collect();
        // What a zone is compared with: another zone's first tokens over
        // the reference window, once they rest on `min_samples`.
        let trusted: Vec<Option<f64>> = self
            .zones
            .iter()
            .map(|r| {
                r.ttft
                    .mean()
                    .filter(|_| r.ttft.weight >= latency.min_samples)
            })
            .collect();
        for (i, r) in self.zones.iter_mut().enumerate() {
            let zi = inputs.get(i).copied().unwrap_or_default();
            let spec = zones.get(i);
            let sick = r.granted < full;
            let endpoints = if zi.endpoints == 0 {
                1.0
            } else {
                f64::from(zi.in_rotation) / f64::from(zi.endpoints)
            };
            let errors = if r.consecutive >= CONSECUTIVE_FAILURES {
                0.0
            } else if r.judged >= MIN_ATTEMPTS || (sick && r.judged > 1e-6) {
                1.0 - (r.failures / r.judged).clamp(0.0, 1.0)
            } else {
                1.0
            };
            let max = cfg.max_utilization.get();
            let quota = quota_factor(
                r.reading
                    .and_then(|h| h.used(now, zi.outstanding))
                    .unwrap_or(0.0),
                max,
            );
            r.used.roll(now);
            let (requests, tokens) = r.used.last_minute(now);
            let used = spec.map_or(0.0, |s| {
                let rpm = s
                    .requests_per_minute
                    .map_or(0.0, |q| requests / f64::from(q));
                let tpm = s.tokens_per_minute.map_or(0.0, |q| tokens / f64::from(q));
                rpm.max(tpm)
            });
            let capacity = quota_factor(used, max);
            let best_other = trusted
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .filter_map(|(_, m)| *m)
                .min_by(f64::total_cmp);
            // Slow: `min_samples` slow first tokens in a row, or a recent
            // mean that is.
            let slow = r.slow_run >= latency.min_samples as u32
                || ttft
                    .get(i)
                    .copied()
                    .flatten()
                    .and_then(|mine| latency.judge(mine, best_other))
                    .unwrap_or(false);
            out.references.push(best_other);
            let factors = [
                (Cause::Endpoints, endpoints),
                (Cause::Errors, errors),
                (Cause::Quota, quota),
                (Cause::Capacity, capacity),
                (Cause::Slow, if slow { 0.0 } else { 1.0 }),
            ];
            r.health = factors.iter().map(|(_, f)| f).product();
            r.cause = factors
                .iter()
                .filter(|(_, f)| *f < 1.0)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(c, _)| *c);
            let now_level = level(r.health);
            // The sliding minimum of the window: entries above this level
            // go; an entry at it keeps its (earlier) time, since the level
            // has held from then on.
            while r.held.last().is_some_and(|&(_, l)| l > now_level) {
                r.held.pop();
            }
            if r.held.last().is_none_or(|&(_, l)| l < now_level) {
                r.held.push((now, now_level));
            }
            // The first entry's level held from its time on; it leaves the
            // window once the next one is older than `failback_after`.
            while r.held.len() > 1 && now.since(r.held[1].0) >= cfg.failback_after {
                r.held.remove(0);
            }
            let before = r.granted;
            let cause = r.cause.unwrap_or(Cause::Errors);
            if now_level < r.granted {
                r.granted = now_level;
            } else if let Some(&(_, sustained)) = r.held.first()
                && sustained > r.granted
                && now.since(r.raised_at) >= cfg.failback_after
                // Healthy (at `min_healthy` or more) for the whole window:
                // back to its health now; else, once its level stopped
                // rising (within [`SETTLED`] of the window's lowest), to
                // that lowest level.
                && (sustained >= full || now_level <= sustained.saturating_add(SETTLED))
            {
                r.granted = if sustained >= full {
                    now_level
                } else {
                    sustained
                };
                r.raised_at = now;
                out.events.push(Event::Raised {
                    zone: i,
                    from: f64::from(before) / f64::from(LEVELS),
                    to: r.granted_share(),
                });
            }
            if r.granted < before {
                if r.granted < DRAINED && before >= DRAINED {
                    // From now on its probes speak: the failure share
                    // that drained it starts afresh (the failures in a row
                    // stay until a probe succeeds).
                    r.judged = 0.0;
                    r.failures = 0.0;
                    out.events.push(Event::Drained { zone: i, cause });
                } else if r.granted < full && before >= full {
                    out.events.push(Event::Spilling {
                        zone: i,
                        cause,
                        share: r.granted_share(),
                    });
                }
            }
        }
        let panic = !reachable.is_empty()
            && reachable
                .iter()
                .all(|&i| self.zones.get(i).is_none_or(ZoneRecord::is_drained));
        if panic != self.panic {
            self.panic = panic;
            out.events.push(Event::Panic(panic));
        }
        let granted: Vec<f64> = reachable
            .iter()
            .map(|&i| self.zones.get(i).map_or(1.0, ZoneRecord::granted_share))
            .collect();
        let endpoints: Vec<u32> = reachable
            .iter()
            .map(|&i| inputs.get(i).map_or(0, |zi| zi.endpoints))
            .collect();
        out.shares = super::plan::shares(
            &granted,
            &endpoints,
            cfg.min_healthy.get(),
            f64::from(DRAINED) / f64::from(LEVELS),
            cfg.spill,
            panic,
        );
        if may_probe && !panic {
            for (rank, &i) in reachable.iter().enumerate() {
                if let Some(r) = self.zones.get_mut(i)
                    && (r.is_drained() || out.shares[rank] <= 0.0)
                    && now >= r.next_probe
                {
                    r.next_probe = now + cfg.probe_interval;
                    out.probes.push(i);
                }
            }
        }
        out
    }
}
