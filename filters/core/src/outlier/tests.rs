//! Scenarios and properties of the whole detector: a seeded simulation of
//! a backend's endpoints, several workers that each pick from their own view
//! refreshed on their tick, and the shared record they flush into.

use std::num::NonZeroU32;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::OutlierConfig;
use crate::units::Ratio;

/// The defaults of the policy language, spelled out (core does not depend
/// on the policy crate).
pub(crate) fn config() -> OutlierConfig {
    OutlierConfig {
        interval: Duration::from_secs(10),
        latency_window: Duration::from_secs(2),
        consecutive_errors: 5,
        failure_rate: Ratio::new(0.85).unwrap(),
        min_requests: 20,
        success_rate_stdev: 1.9,
        min_hosts: 3,
        latency_factor: 3.0,
        min_samples: 5,
        ttft_floor: Duration::from_millis(200),
        tpot_floor: Duration::from_millis(20),
        phi_threshold: 8.0,
        cooldown_429: Duration::from_secs(5),
        max_cooldown: Duration::from_secs(60),
        first_token_timeout: Duration::from_secs(1),
        retries: 2,
        base_ejection_time: Duration::from_secs(30),
        max_ejection_time: Duration::from_secs(300),
        jitter: Ratio::new(0.1).unwrap(),
        max_ejection: Ratio::new(0.5).unwrap(),
        probes: NonZeroU32::new(3).unwrap(),
    }
}

/// How a simulated endpoint behaves at a given time (ms since start).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Behaviour {
    /// Answers with this time to first token.
    Fine { ttft_ms: u64 },
    /// Answers 503 after this long.
    Errors { after_ms: u64 },
    /// Answers 429 at once, asking for `reset_ms`.
    Throttles { reset_ms: u64 },
    /// Accepts and never answers (the first-token deadline ends it).
    Blackhole,
}

const TICK_MS: u64 = 100;

struct Sim {
    cfg: OutlierConfig,
    shared: BackendState,
    workers: Vec<Worker>,
    rng: u64,
    /// Per request: (arrival ms, latency to first token seen by the client
    /// ms, endpoints tried, answered).
    log: Vec<(u64, u64, Vec<usize>, bool)>,
    events: Vec<(u64, Event)>,
    /// Requests each endpoint received, by arrival ms.
    received: Vec<Vec<u64>>,
}

struct Worker {
    view: Vec<Candidate>,
    tallies: Vec<Tally>,
    load: Vec<u32>,
    /// (first token at ms, endpoint) of this worker's requests still out.
    outstanding: Vec<(u64, usize)>,
    probing: bool,
}

impl Sim {
    fn new(endpoints: usize, workers: usize, cfg: OutlierConfig) -> Sim {
        let mut shared = BackendState::default();
        let list: Vec<(String, String)> = (0..endpoints)
            .map(|i| (format!("10.0.0.{i}:8000"), format!("zone-{}", i % 2)))
            .collect();
        shared.align(&list);
        let view = candidates(&shared, Timestamp::ZERO);
        Sim {
            cfg,
            workers: (0..workers)
                .map(|_| Worker {
                    view: view.clone(),
                    tallies: vec![Tally::default(); endpoints],
                    load: vec![0; endpoints],
                    outstanding: Vec::new(),
                    probing: false,
                })
                .collect(),
            shared,
            rng: 0x9e37_79b9_7f4a_7c15,
            log: Vec::new(),
            events: Vec::new(),
            received: vec![Vec::new(); endpoints],
        }
    }

    fn rand(&mut self) -> f64 {
        crate::draw::unit(&mut self.rng)
    }

    fn at(ms: u64) -> Timestamp {
        // A realistic epoch, so that clock arithmetic is exercised.
        Timestamp::from_millis(1_795_978_959_000 + ms)
    }

    /// Runs `seconds` of traffic from `from_ms`, `rps` requests per second
    /// round-robin over the workers, endpoints behaving as `behave` says.
    /// Requests are short (the first token is the answer), which keeps the
    /// simulation a loop over arrivals.
    fn run(
        &mut self,
        from_ms: u64,
        seconds: u64,
        rps: u64,
        behave: impl Fn(usize, u64) -> Behaviour,
    ) {
        let gap = 1000 / rps;
        let end = from_ms + seconds * 1000;
        let mut t = from_ms;
        let mut next_tick = from_ms - from_ms % TICK_MS + TICK_MS;
        let mut n = 0usize;
        while t < end {
            while next_tick <= t {
                self.tick(next_tick);
                next_tick += TICK_MS;
            }
            self.request(n % self.workers.len(), t, &behave);
            n += 1;
            t += gap;
        }
        self.tick(end);
    }

    fn request(&mut self, w: usize, t: u64, behave: &impl Fn(usize, u64) -> Behaviour) {
        let draws = (self.rand(), self.rand());
        // Real servers vary: each answer takes 0.5–1.5× its nominal time.
        let spread = 0.5 + self.rand();
        let behave = |e: usize, t: u64| match behave(e, t) {
            Behaviour::Fine { ttft_ms } => Behaviour::Fine {
                ttft_ms: (ttft_ms as f64 * spread) as u64,
            },
            other => other,
        };
        let worker = &mut self.workers[w];
        worker.outstanding.retain(|&(end, _)| end > t);
        worker.load.iter_mut().for_each(|l| *l = 0);
        for &(_, e) in &worker.outstanding {
            worker.load[e] += 1;
        }
        let worker = &self.workers[w];
        let choice = pick(
            &worker.view,
            &worker.load,
            draws,
            !worker.probing,
            self.cfg.retries as usize,
            &[],
        );
        let order = match choice {
            Some(c) => {
                if c.reason == PickReason::Probe {
                    self.workers[w].probing = true;
                }
                c.order
            }
            // Panic mode: Envoy round-robins over everything.
            None => (0..self.shared.endpoints.len()).collect(),
        };
        let deadline = self.cfg.first_token_timeout.as_millis() as u64;
        let mut elapsed = 0;
        let mut tried = Vec::new();
        let mut answered = false;
        for &e in order.iter().take(self.cfg.retries as usize + 1) {
            tried.push(e);
            self.received[e].push(t);
            let now = Self::at(t + elapsed);
            let mut peers = peers(&self.workers[w].view, e, |c| c.ttft_ms);
            let cfg = &self.cfg;
            let floor = cfg.ttft_floor.as_secs_f64() * 1000.0;
            let mut judge = |ms: u64| {
                is_slow(
                    ms as f64,
                    &mut peers,
                    cfg.latency_factor,
                    floor,
                    cfg.min_hosts,
                )
            };
            let worker = &mut self.workers[w];
            worker
                .outstanding
                .push((t + elapsed + behave_ms(behave(e, t), deadline), e));
            let tally = &mut worker.tallies[e];
            tally.start();
            match behave(e, t) {
                Behaviour::Fine { ttft_ms } if ttft_ms < deadline => {
                    elapsed += ttft_ms;
                    let slow = judge(ttft_ms);
                    tally.end(
                        Verdict::Success,
                        Some(Duration::from_millis(ttft_ms)),
                        slow,
                        now,
                    );
                    answered = true;
                }
                Behaviour::Fine { .. } | Behaviour::Blackhole => {
                    elapsed += deadline;
                    tally.end(Verdict::Failure, None, None, now);
                }
                Behaviour::Errors { after_ms } => {
                    elapsed += after_ms;
                    tally.end(Verdict::Failure, None, None, now);
                }
                Behaviour::Throttles { reset_ms } => {
                    tally.end(Verdict::Throttled, None, None, now);
                    let until = now + Duration::from_millis(reset_ms);
                    tally.throttle(until);
                    // The worker that saw it writes it at once.
                    self.shared
                        .throttle(&self.shared.endpoints[e].addr.clone(), until);
                    self.workers[w].view = candidates(&self.shared, now);
                }
            }
            if answered {
                break;
            }
        }
        if tried
            .first()
            .is_some_and(|&e| self.workers[w].view[e].standing == Standing::Probe)
        {
            self.workers[w].probing = false;
        }
        self.log.push((t, elapsed, tried, answered));
    }

    fn tick(&mut self, ms: u64) {
        let now = Self::at(ms);
        for w in 0..self.workers.len() {
            let tallies: Vec<(String, Tally)> = self.workers[w]
                .tallies
                .iter_mut()
                .enumerate()
                .filter(|(_, t)| !t.is_empty())
                .map(|(i, t)| (self.shared.endpoints[i].addr.clone(), std::mem::take(t)))
                .collect();
            let mut draws: Vec<f64> = (0..8).map(|_| self.rand()).collect();
            let events = self
                .shared
                .flush(&tallies, &self.cfg, now, || draws.pop().unwrap_or(0.5));
            self.events.extend(events.into_iter().map(|e| (ms, e)));
            self.workers[w].view = candidates(&self.shared, now);
        }
        self.check_invariants(now);
    }

    fn check_invariants(&self, now: Timestamp) {
        let out = self
            .shared
            .endpoints
            .iter()
            .filter(|r| r.health != Health::Healthy)
            .count();
        assert!(out < self.shared.endpoints.len(), "every endpoint ejected");
        let longest = self
            .cfg
            .max_ejection_time
            .mul_f64(1.0 + self.cfg.jitter.get());
        for r in &self.shared.endpoints {
            if let Health::Ejected { until, .. } = r.health {
                assert!(until.since(now) <= longest, "ejection longer than the cap");
            }
        }
    }

    fn ejected(&self, e: usize) -> bool {
        matches!(self.shared.endpoints[e].health, Health::Ejected { .. })
    }

    /// Client-seen latencies of requests arriving in [from, to) ms.
    fn latencies(&self, from: u64, to: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .log
            .iter()
            .filter(|(t, ..)| (from..to).contains(t))
            .map(|(_, l, ..)| *l)
            .collect();
        v.sort_unstable();
        v
    }
}

/// How long an attempt stays outstanding.
fn behave_ms(b: Behaviour, deadline: u64) -> u64 {
    match b {
        Behaviour::Fine { ttft_ms } => ttft_ms.min(deadline),
        Behaviour::Errors { after_ms } => after_ms,
        Behaviour::Throttles { .. } => 0,
        Behaviour::Blackhole => deadline,
    }
}

fn p99(sorted: &[u64]) -> u64 {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

fn fine(ms: u64) -> Behaviour {
    Behaviour::Fine { ttft_ms: ms }
}

#[test]
fn a_slow_endpoint_is_shunned_then_ejected_within_two_seconds() {
    let mut sim = Sim::new(4, 2, config());
    sim.run(0, 5, 100, |_, _| fine(50));
    let baseline = p99(&sim.latencies(0, 5000));
    sim.run(5000, 10, 100, |e, _| fine(if e == 2 { 250 } else { 50 }));
    let ejected_at = sim
        .events
        .iter()
        .find_map(|(ms, e)| matches!(e, Event::Ejected { addr, reason: Reason::SlowFirstToken, .. } if addr == "10.0.0.2:8000").then_some(*ms))
        .expect("the slow endpoint is ejected");
    assert!(ejected_at <= 7000, "ejected at {ejected_at} ms");
    let after = p99(&sim.latencies(7000, 15000));
    assert!(
        after as f64 <= 1.2 * baseline as f64,
        "p99 {after} ms vs baseline {baseline} ms"
    );
    // Nobody else was touched.
    for e in [0, 1, 3] {
        assert!(!sim.ejected(e));
    }
}

#[test]
fn a_blackholed_endpoint_costs_at_most_one_deadline_and_is_ejected() {
    let cfg = config();
    let deadline = cfg.first_token_timeout.as_millis() as u64;
    let mut sim = Sim::new(4, 2, cfg);
    sim.run(0, 3, 40, |_, _| fine(50));
    sim.run(3000, 10, 40, |e, _| {
        if e == 1 {
            Behaviour::Blackhole
        } else {
            fine(50)
        }
    });
    assert!(sim.ejected(1));
    let worst = *sim.latencies(3000, 13000).last().unwrap();
    assert!(worst <= deadline + 75, "a client waited {worst} ms"); // one healthy first token (50 ms ± 50%) after the deadline
    assert!(
        sim.log.iter().all(|(.., answered)| *answered),
        "a request failed"
    );
    let ejected_at = sim
        .events
        .iter()
        .find_map(|(ms, e)| {
            matches!(e, Event::Ejected { addr, .. } if addr == "10.0.0.1:8000").then_some(*ms)
        })
        .unwrap();
    let after_ejection = sim.received[1].iter().filter(|&&t| t > ejected_at).count();
    // Its outstanding attempts already steer most requests away (load);
    // the ones it still gets end it within a few seconds.
    assert!(ejected_at <= 6000, "ejected at {ejected_at} ms");
    assert_eq!(after_ejection, 0);
}

#[test]
fn a_throttled_endpoint_gets_nothing_until_its_reset() {
    let mut sim = Sim::new(4, 2, config());
    sim.run(0, 2, 40, |_, _| fine(50));
    // From 2 s, endpoint 3 answers 429 "for 5 s" — and keeps doing so
    // until 2.5 s, then recovers.
    sim.run(2000, 10, 40, |e, t| {
        if e == 3 && t < 2500 {
            Behaviour::Throttles { reset_ms: 5000 }
        } else {
            fine(50)
        }
    });
    let first = *sim.received[3].iter().find(|&&t| t >= 2000).unwrap();
    let during: Vec<u64> = sim.received[3]
        .iter()
        .copied()
        .filter(|&t| t > first && t < first + 5000)
        .collect();
    // Another worker may send one before its next tick; no more.
    assert!(
        during.len() <= 1,
        "requests during the cool-down: {during:?}"
    );
    assert!(
        sim.received[3].iter().any(|&t| t > first + 5000),
        "it came back"
    );
    assert!(sim.log.iter().all(|(.., answered)| *answered));
    assert!(!sim.ejected(3), "a 429 benches, it does not eject");
}

#[test]
fn a_burst_of_429s_benches_and_is_not_taken_for_silence() {
    // Under concurrency several attempts reach an endpoint before its first
    // 429 is shared (the demo's lab saw three within 50 ms). Each is an
    // answer: the endpoint is up and says when to come back. The quiet it
    // asked for is not the silence phi accrual looks for.
    let cfg = config();
    let mut sim = Sim::new(4, 2, cfg.clone());
    sim.run(0, 5, 40, |_, _| fine(50));
    let addr = sim.shared.endpoints[3].addr.clone();
    let shared = &mut sim.shared;
    let now = Sim::at(5000);
    let mut tally = Tally::default();
    for _ in 0..3 {
        tally.start();
        tally.end(Verdict::Throttled, None, None, now);
    }
    tally.throttle(now + Duration::from_secs(5));
    let mut events = shared.flush(&[(addr.clone(), tally)], &cfg, now, || 0.5);
    for ms in (100..5000).step_by(100) {
        let at = now + Duration::from_millis(ms);
        events.extend(shared.flush(&[], &cfg, at, || 0.5));
    }
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(shared.endpoints[3].health, Health::Healthy);
    // Three attempts that get no answer at all still make it silent (the
    // silence counted from when they were sent: it was idle before).
    let later = now + Duration::from_secs(6);
    let mut tally = Tally::default();
    for _ in 0..3 {
        tally.start();
    }
    let mut events = shared.flush(&[(addr, tally)], &cfg, later, || 0.5);
    for ms in (100..3000).step_by(100) {
        let at = later + Duration::from_millis(ms);
        events.extend(shared.flush(&[], &cfg, at, || 0.5));
    }
    let silent = |e: &Event| {
        matches!(
            e,
            Event::Ejected {
                reason: Reason::Silent,
                ..
            }
        )
    };
    assert!(events.iter().any(silent), "{events:?}");
}

#[test]
fn when_all_are_slow_nobody_is_ejected_beyond_the_cap() {
    let mut sim = Sim::new(4, 2, config());
    sim.run(0, 10, 40, |e, _| fine(200 + 150 * e as u64));
    let out = sim
        .shared
        .endpoints
        .iter()
        .filter(|r| r.health != Health::Healthy)
        .count();
    assert!(out <= sim.shared.ejection_cap(&sim.cfg));
    // Every endpoint errors: the cap holds (never the last, checked on
    // every tick), and requests still go out (panic mode or the survivor).
    sim.run(10_000, 10, 40, |_, _| Behaviour::Errors { after_ms: 5 });
    assert!(
        sim.log
            .iter()
            .filter(|(t, ..)| *t >= 10_000)
            .all(|(_, _, tried, _)| !tried.is_empty())
    );
}

#[test]
fn a_flapping_endpoint_is_ejected_for_longer_each_time() {
    let mut sim = Sim::new(4, 1, config());
    let mut lengths = Vec::new();
    let mut t = 0;
    for _ in 0..3 {
        sim.run(t, 1, 40, |e, _| {
            if e == 0 {
                Behaviour::Errors { after_ms: 5 }
            } else {
                fine(50)
            }
        });
        t += 1000;
        // Wait out the ejection (long, cheap: no traffic needed until the
        // probe), then let it fail its probe.
        let length = sim.events.iter().rev().find_map(|(_, e)| match e {
            Event::Ejected { addr, length, .. } if addr == "10.0.0.0:8000" => Some(*length),
            _ => None,
        });
        lengths.push(length.expect("ejected"));
        t += length.unwrap().as_millis() as u64 + 200;
        sim.tick(t);
    }
    assert!(
        lengths[1] > lengths[0] && lengths[2] > lengths[1],
        "{lengths:?}"
    );
    // It recovers: probes succeed and it returns.
    sim.run(t, 2, 40, |_, _| fine(50));
    assert_eq!(sim.shared.endpoints[0].health, Health::Healthy);
}

#[test]
fn a_clock_jump_neither_panics_nor_strands_an_endpoint() {
    let mut sim = Sim::new(3, 1, config());
    sim.run(0, 1, 40, |e, _| {
        if e == 0 {
            Behaviour::Errors { after_ms: 5 }
        } else {
            fine(50)
        }
    });
    assert!(sim.ejected(0));
    // Backwards by an hour: nothing ages, nothing breaks.
    sim.tick(0);
    let back = Sim::at(0) - Duration::from_secs(3600);
    let _ = sim.shared.flush(&[], &sim.cfg, back, || 0.5);
    // Forwards by a day: the ejection is over, the endpoint is probed.
    let later = Sim::at(86_400_000);
    let _ = sim.shared.flush(&[], &sim.cfg, later, || 0.5);
    assert!(matches!(
        sim.shared.endpoints[0].health,
        Health::Probing { .. }
    ));
}

#[test]
fn a_reload_that_reorders_endpoints_keeps_their_records() {
    let mut state = BackendState::default();
    let a = ("10.0.0.1:80".to_string(), "a".to_string());
    let b = ("10.0.0.2:80".to_string(), "b".to_string());
    state.align(&[a.clone(), b.clone()]);
    state.endpoints[1].ejections = 3;
    state.align(&[b.clone(), a.clone()]);
    assert_eq!(state.endpoints[0].addr, b.0);
    assert_eq!(state.endpoints[0].ejections, 3);
    state.align(std::slice::from_ref(&a));
    assert_eq!(state.endpoints.len(), 1);
}

proptest! {
    /// Whatever the endpoints do, one stays in rotation, ejections are
    /// bounded (both checked on every tick), and a healthy endpoint is never
    /// ejected because its peers fail.
    #[test]
    fn healthy_endpoints_survive_their_peers(
        faults in proptest::collection::vec(0u8..4, 4),
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(4, 2, config());
        sim.rng = seed | 1;
        let kinds = faults.clone();
        let behave = move |e: usize, _| match kinds[e] {
            0 => fine(50),
            1 => Behaviour::Errors { after_ms: 5 },
            2 => Behaviour::Throttles { reset_ms: 2000 },
            _ => Behaviour::Blackhole,
        };
        sim.run(0, 6, 40, behave);
        for (e, f) in faults.iter().enumerate() {
            if *f == 0 {
                prop_assert!(
                    !sim.events.iter().any(|(_, ev)| matches!(ev, Event::Ejected { addr, .. } if *addr == sim.shared.endpoints[e].addr)),
                    "healthy endpoint {} ejected: {:?}", e, sim.events
                );
            }
        }
    }
}
