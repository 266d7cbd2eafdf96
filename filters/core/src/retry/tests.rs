//! Scenarios and properties of retry budgets: workers sharing one budget
//! through sequential (compare-and-swap-like) updates, an upstream that
//! fails more the more it is asked, and the bound of the module docs over
//! arbitrary traffic.

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::{FailureKind, RetryConfig};
use crate::time::Timestamp;
use crate::units::Ratio;

/// The policy's defaults, with `max_retries` given.
fn config(max_retries: u32) -> RetryConfig {
    RetryConfig {
        budget: Ratio::percent(20),
        min_retries_per_second: 10,
        ttl: Duration::from_secs(10),
        max_retries,
        retry_on: vec![
            FailureKind::GatewayError,
            FailureKind::Reset,
            FailureKind::ConnectFailure,
        ],
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
        honor_retry_after: true,
        typical_request_tokens: 0,
    }
}

/// A realistic epoch, so that clock arithmetic is exercised.
fn at(ms: u64) -> Timestamp {
    Timestamp::from_millis(1_795_978_959_000 + ms)
}

/// The floor's share of the bound over `elapsed`:
/// `min_retries_per_second × (elapsed + ttl + ttl/10)`.
fn floor_share(cfg: &RetryConfig, elapsed: Duration) -> f64 {
    let slice = cfg.ttl.as_secs_f64() / BUCKETS as f64;
    f64::from(cfg.min_retries_per_second) * (elapsed.as_secs_f64() + cfg.ttl.as_secs_f64() + slice)
}

const TICK_MS: u64 = 100;

/// xorshift64*: deterministic, good enough for draws.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15)
    }

    /// A draw in [0, 1).
    fn next(&mut self) -> f64 {
        crate::draw::unit(&mut self.0)
    }
}

/// How a simulated worker decides to retry a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Retries {
    /// Up to this many per request, no budget: what a route's
    /// `num_retries` alone does.
    Naive(u32),
    /// Finagle's form: each retry is withdrawn from the shared budget at
    /// once (a compare-and-swap update), up to `max_retries`.
    Withdraw,
    /// Envoy's form: the request is planned at admission from the worker's
    /// view; every retry the router then makes is charged to the shared
    /// budget at once.
    Plan,
}

#[derive(Default)]
struct Worker {
    /// Requests and weight not yet flushed into the shared budget.
    pending: (u32, f64),
    /// The shared budget as of the last tick, plus this worker's own
    /// deposits and charges since.
    view: RetryBudget,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    requests: u64,
    attempts: u64,
    answered: u64,
}

struct Sim {
    cfg: RetryConfig,
    retries: Retries,
    shared: RetryBudget,
    workers: Vec<Worker>,
    rng: Rng,
    /// Attempts in each of the last ten ticks: the upstream's load.
    recent: VecDeque<u64>,
    /// Counts per tick, for looking at stretches of the run.
    log: Vec<Counts>,
    /// The lowest balance the shared budget had at a tick, before the
    /// workers' deposits: below 0 when they overshot it.
    lowest: f64,
}

impl Sim {
    fn new(workers: usize, cfg: RetryConfig, retries: Retries) -> Sim {
        Sim {
            cfg,
            retries,
            shared: RetryBudget::default(),
            workers: (0..workers).map(|_| Worker::default()).collect(),
            rng: Rng::new(),
            recent: VecDeque::from(vec![0; 10]),
            log: Vec::new(),
            lowest: f64::INFINITY,
        }
    }

    /// Retries the other workers can make in one tick at `rps` without a
    /// worker seeing them: the overshoot planning from views allows
    /// (none when each retry is withdrawn from the shared budget).
    fn unseen(&self, rps: u64) -> f64 {
        if self.retries != Retries::Plan {
            return 0.0;
        }
        let workers = self.workers.len() as u64;
        let per_worker = (rps * TICK_MS / 1000).div_ceil(workers);
        ((workers - 1) * per_worker * u64::from(self.cfg.max_retries)) as f64
    }

    /// Attempts per second the upstream saw over the last second.
    fn load(&self) -> f64 {
        self.recent.iter().sum::<u64>() as f64
    }

    /// Runs `seconds` from `from_ms` at `rps` requests per second,
    /// round-robin over the workers. An attempt at time `t` (ms) fails with
    /// probability `fail(t, load)`. Attempts are instantaneous; workers
    /// flush their deposits and refresh their views every tick.
    fn run(&mut self, from_ms: u64, seconds: u64, rps: u64, fail: impl Fn(u64, f64) -> f64) {
        let per_tick = rps * TICK_MS / 1000;
        let mut n = 0usize;
        for step in 0..seconds * 1000 / TICK_MS {
            let start = from_ms + step * TICK_MS;
            let mut counts = Counts::default();
            for i in 0..per_tick {
                let t = start + i * TICK_MS / per_tick;
                let w = n % self.workers.len();
                n += 1;
                let p = fail(t, self.load());
                let (attempts, answered) = self.request(w, t, p);
                counts.requests += 1;
                counts.attempts += attempts;
                counts.answered += u64::from(answered);
            }
            self.recent.pop_front();
            self.recent.push_back(counts.attempts);
            self.log.push(counts);
            self.tick(start + TICK_MS);
        }
    }

    /// One request: its attempts and whether one succeeded.
    fn request(&mut self, w: usize, t: u64, p: f64) -> (u64, bool) {
        let now = at(t);
        let cfg = self.cfg.clone();
        let worker = &mut self.workers[w];
        worker.pending.0 += 1;
        worker.pending.1 += 1.0;
        worker.view.deposit(now, &cfg, 1.0);
        let allowed = match self.retries {
            Retries::Naive(n) => n,
            Retries::Withdraw => cfg.max_retries,
            Retries::Plan => plan(&cfg, worker.view.balance(now, &cfg), false, 0).max_retries,
        };
        let mut attempts = 1;
        let mut failed = self.rng.next() < p;
        let mut retries = 0;
        while failed && retries < allowed {
            match self.retries {
                Retries::Naive(_) => {}
                Retries::Withdraw => {
                    if !self.shared.try_withdraw(now, &cfg, 1.0) {
                        break;
                    }
                }
                Retries::Plan => {
                    self.shared.charge(now, &cfg, 1.0);
                    self.workers[w].view.charge(now, &cfg, 1.0);
                }
            }
            retries += 1;
            attempts += 1;
            failed = self.rng.next() < p;
        }
        (attempts, !failed)
    }

    /// Every worker flushes its deposits, then takes a fresh copy.
    fn tick(&mut self, ms: u64) {
        let now = at(ms);
        self.lowest = self.lowest.min(self.shared.balance(now, &self.cfg));
        for w in &mut self.workers {
            let (requests, weight) = std::mem::take(&mut w.pending);
            self.shared.deposit_many(now, &self.cfg, requests, weight);
        }
        for w in &mut self.workers {
            w.view = self.shared.clone();
        }
    }

    /// Counts over the ticks of `[from, to)` seconds of the run.
    fn counts(&self, from: u64, to: u64) -> Counts {
        let per_s = (1000 / TICK_MS) as usize;
        self.log
            .iter()
            .skip(from as usize * per_s)
            .take((to - from) as usize * per_s)
            .fold(Counts::default(), |a, c| Counts {
                requests: a.requests + c.requests,
                attempts: a.attempts + c.attempts,
                answered: a.answered + c.answered,
            })
    }
}

/// The most attempts the bound allows for `requests` requests of weight 1
/// over `elapsed`.
fn most_attempts(cfg: &RetryConfig, requests: u64, elapsed: Duration) -> f64 {
    requests as f64 * (1.0 + cfg.budget.get()) + floor_share(cfg, elapsed)
}

/// By how many attempts the worst 9 s of a run exceeded what the budget
/// allows them: their requests, a fifth of those and of the two seconds
/// before, and the reserve. 9 s lie within the window of their last retry,
/// which reaches up to a slice further back, and deposits are filed a tick
/// late. Negative when every stretch stayed within it.
fn worst_stretch(sim: &Sim) -> f64 {
    let seconds = sim.log.len() as u64 * TICK_MS / 1000;
    (0..=seconds.saturating_sub(9))
        .map(|s| {
            let c = sim.counts(s, s + 9);
            let before = sim.counts(s.saturating_sub(2), s);
            let most = (1.0 + sim.cfg.budget.get()) * c.requests as f64
                + sim.cfg.budget.get() * before.requests as f64
                + reserve(&sim.cfg);
            c.attempts as f64 - most
        })
        .fold(f64::NEG_INFINITY, f64::max)
}

#[test]
fn four_workers_batching_deposits_share_one_budget() {
    // Half of all attempts fail, whatever the load: more failures than the
    // budget covers, so it is spent to its edge.
    let cfg = config(1);
    let mut sim = Sim::new(4, cfg.clone(), Retries::Withdraw);
    sim.run(0, 30, 200, |_, _| 0.5);
    let c = sim.counts(0, 30);
    assert_eq!(c.requests, 6000);
    let retries = (c.attempts - c.requests) as f64;
    // The budget covers 20% of the requests and the floor; about half of
    // the 3000 first failures go unretried.
    let most = most_attempts(&cfg, c.requests, Duration::from_secs(30)) - c.requests as f64;
    assert!(retries <= most, "{retries} retries, at most {most}");
    assert!(
        retries >= 0.2 * c.requests as f64,
        "{retries} retries: the budget was not used"
    );
    // Batching the deposits per tick costs next to nothing against one
    // worker depositing each request at once.
    let mut alone = RetryBudget::default();
    let mut retried_alone = 0u64;
    let mut rng = Rng::new();
    for i in 0..6000u64 {
        let now = at(i * 5);
        alone.deposit(now, &cfg, 1.0);
        if rng.next() < 0.5 && alone.try_withdraw(now, &cfg, 1.0) {
            retried_alone += 1;
        }
    }
    let diff = (retries - retried_alone as f64).abs();
    assert!(
        diff <= 0.03 * retried_alone as f64,
        "{retries} batched vs {retried_alone} at once"
    );
}

#[test]
fn planned_retries_overshoot_by_a_tick_at_most_and_the_debt_pays_it_back() {
    // Envoy's form: every worker plans from its view, which misses the
    // other workers' retries since the last tick. Everything fails.
    let cfg = config(2);
    let mut sim = Sim::new(4, cfg.clone(), Retries::Plan);
    sim.run(0, 60, 400, |_, _| 1.0);
    assert!(sim.lowest < 0.0, "the workers never overshot");
    let unseen = sim.unseen(400);
    assert_eq!(unseen, 60.0, "3 other workers × 10 requests × 2 retries");
    let c = sim.counts(0, 60);
    let most = most_attempts(&cfg, c.requests, Duration::from_secs(60));
    assert!(c.attempts as f64 <= most + unseen, "{c:?}, bound {most}");
    let excess = worst_stretch(&sim);
    assert!(excess <= unseen, "{excess} attempts too many in 9 s");
}

/// The upstream: `capacity` attempts per second served; beyond it the
/// share that fails grows with the excess, every attempt failing at twice
/// the capacity (a server that thrashes when overloaded: queues time out,
/// KV cache is evicted and recomputed). 1% fail at any load.
fn overloaded(load: f64, capacity: f64) -> f64 {
    ((load - capacity) / capacity).clamp(0.01, 1.0)
}

#[test]
fn a_storm_is_capped_where_naive_retries_keep_the_upstream_down() {
    // 90 requests per second on an upstream serving 100; from 10 s to 15 s
    // it serves 60 (a replica restarts), then 100 again.
    let capacity = |t: u64| {
        if (10_000..15_000).contains(&t) {
            60.0
        } else {
            100.0
        }
    };
    let fail = move |t: u64, load: f64| overloaded(load, capacity(t));
    let run = |retries: Retries| {
        let mut sim = Sim::new(4, config(3), retries);
        sim.run(0, 60, 90, fail);
        sim
    };

    // Three retries per request: the dip makes half of the attempts fail,
    // their retries push the load past twice the capacity, and the
    // upstream stays down long after its capacity is back: every request
    // costs four attempts and none succeeds.
    let naive = run(Retries::Naive(3));
    let before = naive.counts(0, 10);
    assert!(before.answered as f64 >= 0.99 * before.requests as f64);
    let late = naive.counts(40, 60);
    assert!(
        late.attempts as f64 >= 3.9 * late.requests as f64,
        "{late:?}"
    );
    assert!(
        late.answered as f64 <= 0.01 * late.requests as f64,
        "{late:?}"
    );

    // Under the budget, the same dip costs at most the budget's share of
    // extra load, and the upstream recovers once its capacity does.
    for retries in [Retries::Withdraw, Retries::Plan] {
        let sim = run(retries);
        let all = sim.counts(0, 60);
        let most = most_attempts(&sim.cfg, all.requests, Duration::from_secs(60));
        let unseen = sim.unseen(90);
        assert!(
            all.attempts as f64 <= most + unseen,
            "{retries:?}: {all:?}, bound {most}"
        );
        let amplification = all.attempts as f64 / all.requests as f64;
        assert!(amplification <= 1.1, "{retries:?}: {amplification}");
        let late = sim.counts(40, 60);
        assert!(
            late.answered as f64 >= 0.99 * late.requests as f64,
            "{retries:?}: {late:?}"
        );
        assert!(
            late.attempts as f64 <= 1.05 * late.requests as f64,
            "{retries:?}: {late:?}"
        );
        // Nor did any 9 s of the run see more than the budget allows them
        // (the credit built up before the dip is what its first second
        // spends: a budget bounds retries per window, not per second).
        let excess = worst_stretch(&sim);
        assert!(
            excess <= unseen,
            "{retries:?}: {excess} attempts too many in 9 s"
        );
    }
}

#[test]
fn one_key_per_backend_and_zone() {
    assert_eq!(state_key("llm", "us-east-1a"), "retry/3/llm/us-east-1a");
    assert_ne!(state_key("a/b", "c"), state_key("a", "b/c"));
}

/// One operation on a budget, for the properties.
#[derive(Clone, Debug)]
enum Op {
    Deposit(f64),
    DepositMany(u32, f64),
    Withdraw(f64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0.01f64..100.0).prop_map(Op::Deposit),
        2 => (0u32..50, 0.01f64..100.0).prop_map(|(n, w)| Op::DepositMany(n, f64::from(n) * w)),
        3 => (0.01f64..100.0).prop_map(Op::Withdraw),
    ]
}

/// A step of the clock in ms: mostly forward, sometimes stepped back.
fn step() -> impl Strategy<Value = i64> {
    prop_oneof![
        12 => 0i64..3_000,
        1 => 0i64..100_000,
        1 => -100_000i64..0,
    ]
}

fn cfg_strategy() -> impl Strategy<Value = RetryConfig> {
    (0u8..=100, 0u32..50, 1u64..=600, 0u32..=5).prop_map(|(percent, mrps, ttl_100ms, max)| {
        RetryConfig {
            budget: Ratio::percent(percent),
            min_retries_per_second: mrps,
            ttl: Duration::from_millis(ttl_100ms * 100),
            ..config(max)
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the requests, retries and clock do: retried weight ≤
    /// `budget ×` requested weight + `min_retries_per_second × (T + ttl +
    /// ttl/10)`, where `T` is the time the clock moved forward, and one
    /// more slice per time it was stepped back (each re-anchors the ring).
    #[test]
    fn retried_weight_stays_within_the_bound(
        cfg in cfg_strategy(),
        ops in proptest::collection::vec((step(), op()), 1..400),
    ) {
        let mut b = RetryBudget::default();
        let mut t: u64 = 200_000_000;
        let (mut forward, mut backs) = (0u64, 0u64);
        let (mut deposited, mut retried) = (0.0f64, 0.0f64);
        for (dt, op) in ops {
            if dt >= 0 {
                t += dt as u64;
                forward += dt as u64;
            } else {
                t -= dt.unsigned_abs();
                backs += 1;
            }
            let now = Timestamp::from_millis(t);
            match op {
                Op::Deposit(w) => {
                    b.deposit(now, &cfg, w);
                    deposited += w;
                }
                Op::DepositMany(n, sum) => {
                    b.deposit_many(now, &cfg, n, sum);
                    deposited += sum;
                }
                Op::Withdraw(w) => {
                    if b.try_withdraw(now, &cfg, w) {
                        retried += w;
                    }
                }
            }
            let slice = cfg.ttl.as_secs_f64() / BUCKETS as f64;
            let bound = cfg.budget.get() * deposited
                + floor_share(&cfg, Duration::from_millis(forward))
                + f64::from(cfg.min_retries_per_second) * slice * backs as f64
                + 1e-6 * (1.0 + deposited + retried);
            prop_assert!(retried <= bound, "retried {} > bound {}", retried, bound);
        }
    }

    /// Four workers batching deposits per tick, withdrawing each retry at
    /// once, any pattern of failures: attempts / requests ≤ 1 + `budget` +
    /// the floor's share.
    #[test]
    fn amplification_stays_within_the_budget(
        cfg in cfg_strategy(),
        requests in proptest::collection::vec((0u64..400, 0usize..4, 0u32..=6), 1..600),
    ) {
        let mut shared = RetryBudget::default();
        let mut pending = [0u32; 4];
        let mut t = 0u64;
        let mut next_tick = TICK_MS;
        let mut attempts = 0u64;
        for &(gap, w, failures) in &requests {
            t += gap;
            while next_tick <= t {
                for p in &mut pending {
                    shared.deposit_many(at(next_tick), &cfg, std::mem::take(p), f64::NAN);
                }
                next_tick += TICK_MS;
            }
            pending[w] += 1;
            let mut tries = 1;
            while tries <= failures && tries <= cfg.max_retries && shared.try_withdraw(at(t), &cfg, 1.0) {
                tries += 1;
            }
            attempts += u64::from(tries);
        }
        for p in &mut pending {
            shared.deposit_many(at(next_tick), &cfg, std::mem::take(p), f64::NAN);
        }
        let n = requests.len() as f64;
        let elapsed = Duration::from_millis(next_tick);
        let bound = 1.0 + cfg.budget.get() + floor_share(&cfg, elapsed) / n + 1e-9;
        prop_assert!(attempts as f64 / n <= bound, "amplification {} > {}", attempts as f64 / n, bound);
    }

    /// Any numbers at all, any clock: nothing panics and the balance stays
    /// a finite number within what the deposits could have funded.
    #[test]
    fn nonsense_never_poisons_the_balance(
        cfg in cfg_strategy(),
        ops in proptest::collection::vec((any::<u64>(), 0u8..4, any::<f64>(), any::<u32>()), 1..100),
    ) {
        let mut b = RetryBudget::default();
        let mut funded = 0.0;
        for (t, kind, w, n) in ops {
            let now = Timestamp(t);
            match kind {
                0 => { b.deposit(now, &cfg, w); funded += MAX_WEIGHT; }
                1 => { b.deposit_many(now, &cfg, n, w); funded += f64::from(n) * MAX_WEIGHT; }
                2 => { let _ = b.try_withdraw(now, &cfg, w); }
                _ => b.charge(now, &cfg, w),
            }
            let balance = b.balance(now, &cfg);
            prop_assert!(balance.is_finite());
            prop_assert!(balance <= (reserve(&cfg) + cfg.budget.get() * funded) * (1.0 + 1e-12) + 1e-6);
            let _ = plan(&cfg, balance, t % 2 == 0, (t % 5) as usize);
        }
    }
}
