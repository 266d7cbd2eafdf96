//! The failover harness: zones that go down, slow, out of quota, flap and
//! disappear with their region, driven tick by tick through the same
//! flush and plan the filter runs, with the properties the design
//! promises checked on every tick.

use std::time::Duration;

use super::plan::{draw, shares};
use super::*;
use crate::config::{FailoverConfig, LocalZone, Spill, Zone};
use crate::draw::unit;
use crate::outlier::estimate::{Estimate, retention};
use crate::time::Timestamp;
use crate::units::Ratio;

const TICK: Duration = Duration::from_millis(50);
const REQUESTS_PER_TICK: u32 = 10;
const HEALTHY_TTFT_MS: f64 = 44.0;

/// What a zone does to the requests it gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Up,
    /// Answers 503 to every request.
    Failing,
    /// Adds this many ms to every first token.
    Slow(f64),
    /// Its provider reports this share of the quota left (0: answers 429).
    Quota(f64),
    /// Answers whole (not streamed) generations of mixed length: the first
    /// byte comes after 300 ms or after 3 s, at random.
    Mixed,
}

struct Sim {
    zones: Vec<Zone>,
    specs: Vec<ZoneSpec>,
    ranked: Vec<usize>,
    cfg: FailoverConfig,
    latency: Latency,
    state: FailoverState,
    /// The worker's copy of the granted shares, by zone.
    ttft: Vec<Estimate>,
    now: Timestamp,
    rng: u64,
    probes_owed: Vec<usize>,
    /// By zone, from the last flush: what its samples are judged against.
    references: Vec<Option<f64>>,
    /// Per tick: requests by zone (not probes), probes by zone, client
    /// failures.
    log: Vec<TickLog>,
    events: Vec<(Timestamp, Event)>,
}

#[derive(Clone, Debug, Default)]
struct TickLog {
    at: Timestamp,
    sent: Vec<u32>,
    probes: Vec<u32>,
    shares: Vec<f64>,
    failed: u32,
}

pub(crate) fn zone(name: &str, region: &str) -> Zone {
    Zone {
        name: name.into(),
        region: region.into(),
        cluster: "c".into(),
        endpoints: Vec::new(),
        requests_per_minute: None,
        tokens_per_minute: None,
    }
}

pub(crate) fn config() -> FailoverConfig {
    FailoverConfig {
        local_zone: LocalZone::Named("a".into()),
        order: Vec::new(),
        min_healthy: Ratio::percent(71),
        max_utilization: Ratio::percent(90),
        spill: Spill::Gradual,
        failback_after: Duration::from_secs(10),
        probe_interval: Duration::from_secs(1),
        cross_region: true,
    }
}

impl Sim {
    fn new(zones: Vec<Zone>, cfg: FailoverConfig) -> Self {
        let ranked = order::rank(&zones, &cfg, None);
        let specs = zones.iter().map(ZoneSpec::from).collect();
        let n = zones.len();
        Sim {
            zones,
            specs,
            ranked,
            cfg,
            latency: Latency {
                factor: 3.0,
                floor_ms: 200.0,
                min_samples: 5.0,
            },
            state: FailoverState::default(),
            ttft: vec![Estimate::default(); n],
            now: Timestamp::from_millis(1_000_000),
            rng: 0x2545_f491_4f6c_dd1d,
            probes_owed: Vec::new(),
            references: Vec::new(),
            log: Vec::new(),
            events: Vec::new(),
        }
    }

    /// One tick: this tick's requests go out on the current plan (each
    /// failed one retried once on the next zone, as the override list
    /// does), then the flush.
    fn tick(&mut self, mode: &dyn Fn(usize) -> Mode) {
        let n = self.zones.len();
        let granted: Vec<f64> = self
            .ranked
            .iter()
            .map(|&z| {
                self.state
                    .zones
                    .get(z)
                    .map_or(1.0, ZoneRecord::granted_share)
            })
            .collect();
        let endpoints: Vec<u32> = self.ranked.iter().map(|_| 2).collect();
        let plan = shares(
            &granted,
            &endpoints,
            self.cfg.min_healthy.get(),
            f64::from(DRAINED) / f64::from(LEVELS),
            self.cfg.spill,
            self.state.panic,
        );
        let mut tallies = vec![ZoneTally::default(); n];
        let mut entry = TickLog {
            at: self.now,
            sent: vec![0; n],
            probes: vec![0; n],
            shares: vec![0.0; n],
            failed: 0,
        };
        for (r, &z) in self.ranked.iter().enumerate() {
            entry.shares[z] = plan[r];
        }
        let probes = std::mem::take(&mut self.probes_owed);
        let decay = retention(TICK, Duration::from_secs(2));
        for e in &mut self.ttft {
            e.decay(decay);
        }
        // Known down while another is not: no planned request may go there.
        let drained: Vec<bool> = (0..n)
            .map(|z| self.state.zones.get(z).is_some_and(ZoneRecord::is_drained))
            .collect();
        let somewhere_else = self.ranked.iter().any(|&z| !drained[z]);
        for k in 0..REQUESTS_PER_TICK {
            let (first, probe) = match probes.get(k as usize) {
                Some(&z) => (z, true),
                None => {
                    let Some(r) = draw(&plan, unit(&mut self.rng)) else {
                        entry.failed += 1;
                        continue;
                    };
                    (self.ranked[r], false)
                }
            };
            if probe {
                entry.probes[first] += 1;
            } else {
                assert!(
                    !(drained[first] && somewhere_else && !self.state.panic),
                    "a request went to drained zone {first} at {:?}",
                    self.now
                );
                entry.sent[first] += 1;
            }
            // The fallback: the best other zone not drained.
            let fallback =
                self.ranked.iter().copied().find(|&z| {
                    z != first && self.state.zones.get(z).is_none_or(|r| !r.is_drained())
                });
            let mut ok = false;
            for z in std::iter::once(first).chain(fallback) {
                let t = &mut tallies[z];
                t.requests += 1;
                let sample = match mode(z) {
                    Mode::Up | Mode::Quota(_) => Some(HEALTHY_TTFT_MS),
                    Mode::Slow(ms) => Some(HEALTHY_TTFT_MS + ms),
                    Mode::Mixed if unit(&mut self.rng) < 0.5 => Some(300.0),
                    Mode::Mixed => Some(3000.0),
                    Mode::Failing => None,
                };
                match mode(z) {
                    Mode::Up | Mode::Slow(_) | Mode::Mixed => {
                        let ms = sample.unwrap_or_default();
                        self.ttft[z].add(ms, 1.0);
                        let reference = self.references.get(z).copied().flatten();
                        t.slow.push(self.latency.judge(ms, reference));
                        t.first_token(ms);
                        ok = true;
                    }
                    Mode::Failing => t.judge(self.now, true),
                    Mode::Quota(left) => {
                        t.reading = Some(Headroom {
                            left,
                            requests: None,
                            at: self.now,
                            until: self.now + Duration::from_secs(30),
                        });
                        if left > 0.0 {
                            self.ttft[z].add(HEALTHY_TTFT_MS, 1.0);
                            ok = true;
                        } else {
                            t.judge(self.now, true);
                        }
                    }
                }
                if ok {
                    t.judge(self.now, false);
                    break;
                }
            }
            entry.failed += u32::from(!ok);
        }
        self.log.push(entry);
        let inputs: Vec<ZoneInputs> = (0..n)
            .map(|z| ZoneInputs {
                endpoints: 2,
                in_rotation: 2,
                outstanding: 0,
                ttft: self.ttft[z],
            })
            .collect();
        let flushed = self.state.flush(
            &self.specs,
            &tallies,
            &inputs,
            &self.ranked,
            &self.cfg,
            &self.latency,
            self.now,
            true,
        );
        for e in flushed.events {
            self.events.push((self.now, e));
        }
        self.probes_owed = flushed.probes;
        self.references = flushed.references;
        self.now = self.now + TICK;
        self.check_invariants();
    }

    fn run(&mut self, seconds: f64, mode: &dyn Fn(usize, f64) -> Mode) {
        let start = self.log.len();
        let ticks = (seconds / TICK.as_secs_f64()).round() as usize;
        for i in 0..ticks {
            let t = i as f64 * TICK.as_secs_f64();
            self.tick(&|z| mode(z, t));
        }
        let _ = start;
    }

    /// Promised on every tick: the shares sum to 1.
    fn check_invariants(&self) {
        let last = self.log.last().unwrap();
        let sum: f64 = last.shares.iter().sum();
        assert!((sum - 1.0).abs() < 1e-9, "shares {:?}", last.shares);
    }

    fn raises(&self, zone: usize) -> Vec<Timestamp> {
        self.events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::Raised { zone: z, .. } if *z == zone => Some(*t),
                _ => None,
            })
            .collect()
    }

    /// Ticks from `from` until zone `z` got no planned request, if it did.
    fn moved_after(&self, z: usize, from: Timestamp) -> Option<Duration> {
        let last = self
            .log
            .iter()
            .filter(|l| l.at >= from && l.sent[z] > 0)
            .map(|l| l.at)
            .max()?;
        Some((last + TICK).since(from))
    }

    fn sent_since(&self, z: usize, from: Timestamp) -> (u32, u32) {
        self.log
            .iter()
            .filter(|l| l.at >= from)
            .fold((0, 0), |(s, p), l| (s + l.sent[z], p + l.probes[z]))
    }

    fn failed_since(&self, from: Timestamp) -> u32 {
        self.log
            .iter()
            .filter(|l| l.at >= from)
            .map(|l| l.failed)
            .sum()
    }
}

fn two_zones() -> Sim {
    Sim::new(vec![zone("a", "r1"), zone("b", "r1")], config())
}

#[test]
fn a_failing_zone_is_left_within_two_ticks_and_no_request_fails() {
    let mut sim = two_zones();
    sim.run(3.0, &|_, _| Mode::Up);
    assert_eq!(
        sim.sent_since(1, Timestamp::ZERO).0,
        0,
        "zone b took traffic while a was healthy"
    );
    let fault = sim.now;
    sim.run(5.0, &|z, _| if z == 0 { Mode::Failing } else { Mode::Up });
    let moved = sim.moved_after(0, fault).unwrap();
    assert!(moved <= 2 * TICK, "left zone a after {moved:?}");
    assert_eq!(
        sim.failed_since(fault),
        0,
        "the retry on zone b covers the first ticks"
    );
    // Probes continue, one per probe_interval.
    let (_, probes) = sim.sent_since(0, fault + Duration::from_secs(1));
    assert!((3..=5).contains(&probes), "{probes} probes in 4 s");
    assert!(sim.state.zones[0].is_drained());
    assert!(sim.events.iter().any(|(_, e)| *e
        == Event::Drained {
            zone: 0,
            cause: Cause::Errors
        }));
}

#[test]
fn a_recovered_zone_fails_back_once_after_failback_after() {
    let mut sim = two_zones();
    sim.run(2.0, &|_, _| Mode::Up);
    sim.run(5.0, &|z, _| if z == 0 { Mode::Failing } else { Mode::Up });
    let healed = sim.now;
    sim.run(25.0, &|_, _| Mode::Up);
    let raises = sim.raises(0);
    assert_eq!(raises.len(), 1, "{:?}", sim.events);
    let after = raises[0].since(healed);
    // Healthy once its probes (one a second) outweigh the failures they
    // saw (a couple of error windows), then for failback_after.
    let settle = sim.cfg.probe_interval + 2 * zone::ERROR_WINDOW;
    assert!(
        after >= sim.cfg.failback_after && after <= sim.cfg.failback_after + settle,
        "failed back {after:?} after healing"
    );
    assert!(sim.state.zones[0].granted >= LEVELS - 1);
    let back = raises[0] + TICK;
    let (sent_a, _) = sim.sent_since(0, back);
    let (sent_b, _) = sim.sent_since(1, back);
    assert!(sent_a > 0 && sent_b == 0, "a {sent_a}, b {sent_b}");
}

#[test]
fn a_slow_zone_is_left_within_two_seconds_without_a_timeout() {
    let mut sim = two_zones();
    // b gets no planned request: its probes (one a second) are what a's
    // time to first token is judged against, once they are `min_samples`
    // (5) of them; before that, nothing is judged slow.
    sim.run(3.0, &|z, _| {
        if z == 0 { Mode::Slow(500.0) } else { Mode::Up }
    });
    assert!(sim.events.is_empty(), "{:?}", sim.events);
    sim.run(5.0, &|_, _| Mode::Up);
    let b_baseline = sim.sent_since(1, Timestamp::ZERO).0;
    assert_eq!(b_baseline, 0);
    let fault = sim.now;
    sim.run(6.0, &|z, _| {
        if z == 0 { Mode::Slow(500.0) } else { Mode::Up }
    });
    let moved = sim.moved_after(0, fault).unwrap();
    assert!(
        moved <= Duration::from_secs(2),
        "left the slow zone after {moved:?}"
    );
    assert!(sim.events.iter().any(|(_, e)| *e
        == Event::Drained {
            zone: 0,
            cause: Cause::Slow
        }));
}

#[test]
fn quota_moves_traffic_before_the_provider_refuses() {
    let mut sim = two_zones();
    sim.run(2.0, &|_, _| Mode::Up);
    // 5% left (95% used, max_utilization 90%): half the factor.
    let fault = sim.now;
    sim.run(2.0, &|z, _| {
        if z == 0 { Mode::Quota(0.05) } else { Mode::Up }
    });
    assert_eq!(sim.failed_since(fault), 0);
    let share = sim.log.last().unwrap().shares[0];
    assert!(
        share > 0.5 && share < 0.8,
        "zone a keeps {share} of new requests"
    );
    // 2% left: 20% factor, drained? No: 0.2 / 0.71 = 28% of the traffic.
    sim.run(2.0, &|z, _| {
        if z == 0 { Mode::Quota(0.02) } else { Mode::Up }
    });
    let share = sim.log.last().unwrap().shares[0];
    assert!(share < 0.35, "zone a keeps {share}");
    // Gone: no request but probes, none visible as a failure.
    let gone = sim.now;
    sim.run(3.0, &|z, _| {
        if z == 0 { Mode::Quota(0.0) } else { Mode::Up }
    });
    assert_eq!(sim.failed_since(fault), 0);
    assert!(sim.moved_after(0, gone).unwrap() <= 2 * TICK);
    assert!(sim.events.iter().any(|(_, e)| *e
        == Event::Drained {
            zone: 0,
            cause: Cause::Quota
        }));
}

#[test]
fn a_flapping_zone_fails_back_at_most_once_per_failback_after() {
    let mut sim = two_zones();
    sim.run(2.0, &|_, _| Mode::Up);
    let start = sim.now;
    // Down 2 s, up 2 s, for 60 s.
    sim.run(60.0, &|z, t| {
        if z == 0 && ((t / 2.0).floor() as u64).is_multiple_of(2) {
            Mode::Failing
        } else {
            Mode::Up
        }
    });
    let raises = sim.raises(0);
    for w in raises.windows(2) {
        assert!(w[1].since(w[0]) >= sim.cfg.failback_after, "{raises:?}");
    }
    assert!(raises.len() as f64 <= 60.0 / sim.cfg.failback_after.as_secs_f64());
    // No more failures than a steady outage of the same length.
    let flapping = sim.failed_since(start);
    let mut steady = two_zones();
    steady.run(2.0, &|_, _| Mode::Up);
    let s = steady.now;
    steady.run(60.0, &|z, _| if z == 0 { Mode::Failing } else { Mode::Up });
    assert!(
        flapping <= steady.failed_since(s),
        "{flapping} > {}",
        steady.failed_since(s)
    );
}

#[test]
fn a_region_loss_moves_traffic_to_the_next_region() {
    let mut sim = Sim::new(
        vec![zone("a", "r1"), zone("b", "r1"), zone("c", "r2")],
        config(),
    );
    assert_eq!(sim.ranked, vec![0, 1, 2]);
    sim.run(2.0, &|_, _| Mode::Up);
    let fault = sim.now;
    sim.run(4.0, &|z, _| if z < 2 { Mode::Failing } else { Mode::Up });
    for z in 0..2 {
        let moved = sim.moved_after(z, fault).unwrap_or_default();
        assert!(
            moved <= Duration::from_secs(2),
            "zone {z} left after {moved:?}"
        );
    }
    assert!(!sim.state.panic);
    let last = sim.log.last().unwrap();
    assert_eq!(last.shares[2], 1.0);
    // Staying in the region: nowhere to go, so panic spreads the load.
    let mut cfg = config();
    cfg.cross_region = false;
    let mut sim = Sim::new(vec![zone("a", "r1"), zone("b", "r1"), zone("c", "r2")], cfg);
    assert_eq!(sim.ranked, vec![0, 1]);
    sim.run(1.0, &|_, _| Mode::Up);
    sim.run(2.0, &|z, _| if z < 2 { Mode::Failing } else { Mode::Up });
    assert!(sim.state.panic);
    assert!(sim.events.iter().any(|(_, e)| *e == Event::Panic(true)));
    let last = sim.log.last().unwrap();
    assert_eq!(last.shares, vec![0.5, 0.5, 0.0]);
    sim.run(15.0, &|_, _| Mode::Up);
    assert!(!sim.state.panic, "{:?}", sim.events);
}

#[test]
fn clock_jumps_neither_panic_nor_shorten_the_dwell() {
    let mut sim = two_zones();
    sim.run(2.0, &|_, _| Mode::Up);
    sim.run(2.0, &|z, _| if z == 0 { Mode::Failing } else { Mode::Up });
    // Back by ten minutes, then healthy.
    sim.now = Timestamp(sim.now.as_nanos() - 600_000_000_000);
    let jumped = sim.now;
    sim.run(30.0, &|_, _| Mode::Up);
    let raises = sim.raises(0);
    assert_eq!(raises.len(), 1);
    assert!(
        raises[0].since(jumped) >= sim.cfg.failback_after,
        "{raises:?}"
    );
    // Forward by a day: no overflow, the zone stays healthy.
    sim.now = sim.now + Duration::from_secs(86_400);
    sim.run(1.0, &|_, _| Mode::Up);
    assert!(sim.state.zones[0].granted >= LEVELS - 1);
    assert_eq!(sim.failed_since(jumped), 0);
}

#[test]
fn capacity_quota_from_the_policy_spills_before_the_provider_says_anything() {
    let mut zones = vec![zone("a", "r1"), zone("b", "r1")];
    // 10 requests a tick is 12,000 a minute, over a quota of 10,000.
    zones[0].requests_per_minute = std::num::NonZeroU32::new(10_000);
    let mut sim = Sim::new(zones, config());
    sim.run(40.0, &|_, _| Mode::Up);
    assert_eq!(sim.log.last().unwrap().shares[0], 1.0);
    let mut worst: f64 = 0.0;
    for _ in 0..(180.0 / TICK.as_secs_f64()) as usize {
        sim.tick(&|_| Mode::Up);
        let now = sim.now;
        worst = worst.max(sim.state.zones[0].used.last_minute(now).0);
    }
    // Never past the quota by more than a tick's requests; b takes the
    // rest; a is used again once its minute allows.
    assert!(worst <= 10_000.0 + f64::from(REQUESTS_PER_TICK), "{worst}");
    let since = sim.log[sim.log.len() - 1200].at;
    let (a, _) = sim.sent_since(0, since);
    let (b, _) = sim.sent_since(1, since);
    assert!(a > 3_000 && b > 1_000, "a {a}, b {b} in the last minute");
    assert!(sim.events.iter().any(|(_, e)| matches!(
        e,
        Event::Drained {
            zone: 0,
            cause: Cause::Capacity
        } | Event::Spilling {
            zone: 0,
            cause: Cause::Capacity,
            ..
        }
    )));
}

#[test]
fn a_reload_keeps_each_zones_record_by_name() {
    let mut sim = two_zones();
    sim.run(1.0, &|_, _| Mode::Up);
    sim.run(1.0, &|z, _| if z == 0 { Mode::Failing } else { Mode::Up });
    assert!(sim.state.zones[0].is_drained());
    // The reloaded policy lists b first and adds c: a keeps its drain.
    let specs: Vec<ZoneSpec> = ["b", "c", "a"]
        .iter()
        .map(|n| ZoneSpec {
            name: (*n).into(),
            requests_per_minute: None,
            tokens_per_minute: None,
        })
        .collect();
    sim.state.align(&specs);
    let names: Vec<&str> = sim.state.zones.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["b", "c", "a"]);
    assert!(sim.state.zones[2].is_drained());
    assert_eq!(sim.state.zones[1].granted, LEVELS);
    // A zone the policy dropped is forgotten: the key stays bounded.
    sim.state.align(&specs[..1]);
    assert_eq!(sim.state.zones.len(), 1);
}

#[test]
fn answers_to_requests_sent_before_a_zone_broke_do_not_end_its_run() {
    let mut sim = two_zones();
    sim.run(1.0, &|_, _| Mode::Up);
    let t0 = sim.now;
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let specs: Vec<ZoneSpec> = sim.zones.iter().map(ZoneSpec::from).collect();
    let inputs = vec![
        ZoneInputs {
            endpoints: 2,
            in_rotation: 2,
            outstanding: 0,
            ttft: Estimate::default(),
        };
        2
    ];
    let flush = |sim: &mut Sim, tally: ZoneTally, at: Timestamp| {
        sim.state.flush(
            &specs,
            &[tally, ZoneTally::default()],
            &inputs,
            &sim.ranked,
            &sim.cfg,
            &sim.latency,
            at,
            false,
        )
    };
    // Three failures sent at 10–30 ms, flushed one by one; then the answer
    // to a request sent at 5 ms (before them) arrives: the run goes on.
    for k in 1..=3 {
        let mut t = ZoneTally::default();
        t.judge(ms(10 * k), true);
        flush(&mut sim, t, ms(40 + k));
    }
    let mut t = ZoneTally::default();
    t.judge(ms(5), false);
    flush(&mut sim, t, ms(50));
    assert_eq!(sim.state.zones[0].consecutive, 3);
    // Two more failures: five in a row, drained.
    let mut t = ZoneTally::default();
    t.judge(ms(60), true);
    t.judge(ms(61), true);
    let out = flush(&mut sim, t, ms(70));
    assert!(sim.state.zones[0].is_drained(), "{:?}", sim.state.zones[0]);
    assert!(out.events.contains(&Event::Drained {
        zone: 0,
        cause: Cause::Errors
    }));
    // A success sent after the last failure ends a run.
    let mut sim = two_zones();
    sim.run(1.0, &|_, _| Mode::Up);
    let t0 = sim.now;
    let mut t = ZoneTally::default();
    t.judge(t0 + Duration::from_millis(1), true);
    t.judge(t0 + Duration::from_millis(2), true);
    t.judge(t0 + Duration::from_millis(3), false);
    t.judge(t0 + Duration::from_millis(4), true);
    flush(&mut sim, t, t0 + Duration::from_millis(10));
    assert_eq!(sim.state.zones[0].consecutive, 1);
}

#[test]
fn a_zone_whose_health_jumps_back_at_once_fails_back_after_failback_after() {
    // Both endpoints ejected for 2 s, then both back at once: health goes
    // from 0 to 1 in one step and stays (the window must age out the low
    // entry, not keep renewing the high one's time).
    let sim = two_zones();
    let mut state = FailoverState::default();
    let start = Timestamp::from_millis(1_000_000);
    let mut raised = Vec::new();
    for i in 0..(40 * 20) {
        let now = start + TICK * i;
        let back = i >= 2 * 20;
        let zone = |in_rotation| ZoneInputs {
            endpoints: 2,
            in_rotation,
            outstanding: 0,
            ttft: Estimate::default(),
        };
        let inputs = [zone(if back { 2 } else { 0 }), zone(2)];
        let out = state.flush(
            &sim.specs,
            &[ZoneTally::default(), ZoneTally::default()],
            &inputs,
            &sim.ranked,
            &sim.cfg,
            &sim.latency,
            now,
            true,
        );
        for e in out.events {
            if let Event::Raised { zone: 0, .. } = e {
                raised.push(now.since(start));
            }
        }
    }
    // Back at 2 s; failback_after (10 s) later, once.
    let expected = Duration::from_secs(2) + sim.cfg.failback_after;
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert!(
        raised[0] >= expected && raised[0] <= expected + 2 * TICK,
        "{raised:?}"
    );
    assert_eq!(state.zones[0].granted, LEVELS);
}

#[test]
fn a_zone_that_settles_half_healthy_fails_back_to_that_level() {
    // Both endpoints out for 2 s, then one back for good (the other stays
    // ejected): health 50%, below min_healthy; after failback_after it
    // gets the share of that level, not nothing and not all.
    let sim = two_zones();
    let mut state = FailoverState::default();
    let start = Timestamp::from_millis(1_000_000);
    let mut raised = Vec::new();
    for i in 0..(30 * 20) {
        let now = start + TICK * i;
        let zone = |in_rotation| ZoneInputs {
            endpoints: 2,
            in_rotation,
            outstanding: 0,
            ttft: Estimate::default(),
        };
        let inputs = [zone(if i >= 2 * 20 { 1 } else { 0 }), zone(2)];
        let out = state.flush(
            &sim.specs,
            &[ZoneTally::default(), ZoneTally::default()],
            &inputs,
            &sim.ranked,
            &sim.cfg,
            &sim.latency,
            now,
            true,
        );
        for e in out.events {
            if let Event::Raised { zone: 0, to, .. } = e {
                raised.push((now.since(start), to));
            }
        }
    }
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(raised[0].1, 0.5);
    assert!(raised[0].0 >= Duration::from_secs(2) + sim.cfg.failback_after);
    let shares = plan::shares(&[0.5, 1.0], &[2, 2], 0.71, 0.1, Spill::Gradual, false);
    assert!((shares[0] - 0.5 / 0.71).abs() < 1e-9);
}

#[test]
fn whole_answers_of_mixed_length_do_not_make_the_local_zone_slow() {
    // Non-streamed answers time their "first token" at the whole answer:
    // 300 ms or 3 s at random, in every zone alike. The standby zone is
    // seen through one probe a second, so a reference resting on the last
    // probe or two would often be a short answer, and runs of long ones
    // would look 3× slower than it.
    let mut sim = two_zones();
    sim.run(60.0, &|_, _| Mode::Mixed);
    assert!(
        !sim.events
            .iter()
            .any(|(_, e)| matches!(e, Event::Drained { .. } | Event::Spilling { .. })),
        "{:?}",
        sim.events
    );
    assert_eq!(sim.state.zones[0].granted, LEVELS);
}
