//! Picking a request's endpoint: power of two choices on load and latency.
//!
//! Two endpoints in rotation are drawn at random and the one with the lower
//! cost wins, where cost = recent time to first token × (requests this
//! worker has outstanding there + 1), as linkerd's peak-EWMA balancer
//! weighs latency by load. Two random choices avoid the herd that "always
//! the best" causes when many workers act on the same slightly stale view
//! (Mitzenmacher), and still send almost nothing to an endpoint five times
//! slower than its peers. The rest follow as fallbacks, cheapest first: the
//! router's retries walk that list (`override_host`).

/// Where an endpoint stands for picking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// In rotation.
    InRotation,
    /// Ejection over: may receive a probe.
    Probe,
    /// Ejected or benched by a 429.
    Out,
}

/// An endpoint as the picker sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub addr: String,
    pub standing: Standing,
    /// Recent time to first token, ms; `None` before any sample.
    pub ttft_ms: Option<f64>,
    /// How many recent samples `ttft_ms` rests on (decayed).
    pub ttft_weight: f64,
    /// Recent time per output token, ms.
    pub tpot_ms: Option<f64>,
}

/// The other candidates' estimates (`ttft_ms` or `tpot_ms`), for judging a
/// sample of candidate `me` ([`super::is_slow`]).
pub fn peers(
    candidates: &[Candidate],
    me: usize,
    estimate: impl Fn(&Candidate) -> Option<f64>,
) -> Vec<f64> {
    candidates
        .iter()
        .enumerate()
        .filter(|&(i, c)| i != me && c.standing != Standing::Out)
        .filter_map(|(_, c)| estimate(c))
        .collect()
}

/// Why the first endpoint of a [`Choice`] was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PickReason {
    /// It won a draw of two (lower latency × load).
    TwoChoices,
    /// It was the only endpoint in rotation.
    Only,
    /// A probe of an endpoint whose ejection ended.
    Probe,
}

impl PickReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PickReason::TwoChoices => "p2c",
            PickReason::Only => "only",
            PickReason::Probe => "probe",
        }
    }
}

/// The endpoints for one request: the pick first, then fallbacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    /// Indexes into the candidates.
    pub order: Vec<usize>,
    pub reason: PickReason,
}

/// An endpoint's place in a request's zone order (`[failover]`): 0 for the
/// request's zone, 1 for the next, …; [`NO_ZONE`] for a zone the request
/// may not go to. Without zone preferences every endpoint ranks 0.
pub type Rank = u8;

/// The rank of an endpoint whose zone the request may not use.
pub const NO_ZONE: Rank = Rank::MAX;

/// Picks among `candidates` (with this worker's outstanding requests per
/// candidate in `load`), given two uniform draws in [0, 1). `probe` says
/// whether this request may probe an endpoint coming back; `fallbacks` is
/// how many endpoints may follow the pick. `rank` (indexed like the
/// candidates; empty: all 0) keeps the pick to the best-ranked zone with an
/// endpoint in rotation, and orders the fallbacks so that each retry tries
/// the next zone's best endpoint before a zone's second one (a zone-wide
/// fault costs one attempt, not one per endpoint). `None` when no endpoint
/// is in rotation (and none may be probed): Envoy's own balancing then
/// decides.
pub fn pick(
    candidates: &[Candidate],
    load: &[u32],
    draws: (f64, f64),
    probe: bool,
    fallbacks: usize,
    rank: &[Rank],
) -> Option<Choice> {
    let rank_of = |i: usize| rank.get(i).copied().unwrap_or(0);
    let live: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].standing == Standing::InRotation && rank_of(i) != NO_ZONE)
        .collect();
    let typical = typical_latency(candidates);
    let cost = |i: usize| {
        let c = &candidates[i];
        // Shrunk toward the typical latency by a prior of one sample: an
        // estimate that rests on fading samples drifts back to "typical",
        // so an endpoint shunned for a slow spell is tried again once
        // nothing recent says it is slow (tower's peak-EWMA decays the
        // same way), rather than being shunned forever.
        let latency = c.ttft_ms.map_or(typical, |m| {
            (m * c.ttft_weight + typical * PRIOR_WEIGHT) / (c.ttft_weight + PRIOR_WEIGHT)
        });
        let latency = latency.max(1.0);
        latency * f64::from(load.get(i).copied().unwrap_or(0).saturating_add(1))
    };
    let probed = probe
        .then(|| {
            (0..candidates.len())
                .find(|&i| candidates[i].standing == Standing::Probe && rank_of(i) == 0)
        })
        .flatten();
    let best = live.iter().map(|&i| rank_of(i)).min();
    let tier: Vec<usize> = live
        .iter()
        .copied()
        .filter(|&i| Some(rank_of(i)) == best)
        .collect();
    let (first, reason) = match (probed, tier.len()) {
        (Some(p), _) => (p, PickReason::Probe),
        (None, 0) => return None,
        (None, 1) => (tier[0], PickReason::Only),
        (None, n) => {
            let a = index(draws.0, n);
            let mut b = index(draws.1, n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (tier[a], tier[b]);
            (
                if cost(b) < cost(a) { b } else { a },
                PickReason::TwoChoices,
            )
        }
    };
    // Fallbacks: cheapest first within each zone, zones interleaved in
    // rank order (the pick holds its zone's first place).
    let mut rest: Vec<usize> = live.into_iter().filter(|&i| i != first).collect();
    rest.sort_by(|&a, &b| cost(a).total_cmp(&cost(b)));
    let mut place: Vec<(usize, Rank, usize)> = Vec::with_capacity(rest.len());
    for &i in &rest {
        let r = rank_of(i);
        let ahead =
            place.iter().filter(|&&(_, q, _)| q == r).count() + usize::from(rank_of(first) == r);
        place.push((ahead, r, i));
    }
    place.sort_by_key(|&(ahead, r, _)| (ahead, r));
    let mut order = Vec::with_capacity(fallbacks.min(place.len()) + 1);
    order.push(first);
    order.extend(place.into_iter().take(fallbacks).map(|(_, _, i)| i));
    Some(Choice { order, reason })
}

/// Weight of the typical latency in an endpoint's cost, in samples.
const PRIOR_WEIGHT: f64 = 1.0;

/// `draw` in [0, 1) → an index below `n` (> 0).
fn index(draw: f64, n: usize) -> usize {
    ((draw.clamp(0.0, 1.0) * n as f64) as usize).min(n - 1)
}

/// The median latency of the endpoints that have one: what an endpoint
/// without samples is assumed to have (neither shunned nor flooded).
fn typical_latency(candidates: &[Candidate]) -> f64 {
    let mut known: Vec<f64> = candidates.iter().filter_map(|c| c.ttft_ms).collect();
    if known.is_empty() {
        return 1.0;
    }
    known.sort_by(f64::total_cmp);
    known[known.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(ttfts: &[Option<f64>]) -> Vec<Candidate> {
        ttfts
            .iter()
            .enumerate()
            .map(|(i, t)| Candidate {
                addr: format!("10.0.0.{i}:8000"),
                standing: Standing::InRotation,
                ttft_ms: *t,
                ttft_weight: 10.0,
                tpot_ms: None,
            })
            .collect()
    }

    #[test]
    fn the_slow_endpoint_wins_no_draw() {
        let c = cands(&[Some(50.0), Some(50.0), Some(250.0), Some(50.0)]);
        let load = [0, 0, 0, 0];
        let mut picked_slow = 0;
        for a in 0..20 {
            for b in 0..20 {
                let choice =
                    pick(&c, &load, (a as f64 / 20.0, b as f64 / 20.0), false, 2, &[]).unwrap();
                picked_slow += usize::from(choice.order[0] == 2);
                assert_eq!(choice.order.len(), 3);
                assert_eq!(choice.reason, PickReason::TwoChoices);
            }
        }
        assert_eq!(picked_slow, 0);
    }

    #[test]
    fn load_spreads_requests_among_equals() {
        let c = cands(&[Some(50.0), Some(50.0)]);
        // Endpoint 0 has 3 outstanding here: 1 wins whatever the draw.
        for d in [(0.0, 0.0), (0.9, 0.1), (0.5, 0.99)] {
            assert_eq!(
                pick(&c, &[3, 0], d, false, 1, &[]).unwrap().order,
                vec![1, 0]
            );
        }
    }

    #[test]
    fn out_of_rotation_is_never_picked_and_none_means_envoy_decides() {
        let mut c = cands(&[Some(50.0), Some(50.0), Some(50.0)]);
        c[0].standing = Standing::Out;
        c[1].standing = Standing::Out;
        let choice = pick(&c, &[0, 0, 0], (0.0, 0.0), false, 5, &[]).unwrap();
        assert_eq!(
            choice,
            Choice {
                order: vec![2],
                reason: PickReason::Only
            }
        );
        c[2].standing = Standing::Out;
        assert_eq!(pick(&c, &[0, 0, 0], (0.3, 0.3), true, 5, &[]), None);
    }

    #[test]
    fn a_probe_goes_first_with_healthy_fallbacks() {
        let mut c = cands(&[Some(50.0), None, Some(60.0)]);
        c[1].standing = Standing::Probe;
        let choice = pick(&c, &[0, 0, 0], (0.0, 0.5), true, 2, &[]).unwrap();
        assert_eq!(
            choice,
            Choice {
                order: vec![1, 0, 2],
                reason: PickReason::Probe
            }
        );
        // Without the right to probe, it is skipped.
        let choice = pick(&c, &[0, 0, 0], (0.0, 0.5), false, 2, &[]).unwrap();
        assert!(!choice.order.contains(&1));
    }

    #[test]
    fn draws_out_of_range_stay_in_bounds() {
        let c = cands(&[Some(1.0), Some(2.0), Some(3.0)]);
        for d in [(1.0, 1.0), (-1.0, 2.0), (f64::NAN, 0.5)] {
            let choice = pick(&c, &[0, 0, 0], d, false, 2, &[]).unwrap();
            assert_eq!(choice.order.len(), 3);
        }
    }

    #[test]
    fn zones_keep_the_pick_and_interleave_the_fallbacks() {
        // a0 a1 | b0 b1 | c0 (excluded)
        let c = cands(&[Some(50.0), Some(60.0), Some(40.0), Some(45.0), Some(10.0)]);
        let rank = [0, 0, 1, 1, NO_ZONE];
        for a in 0..10 {
            for b in 0..10 {
                let d = (a as f64 / 10.0, b as f64 / 10.0);
                let choice = pick(&c, &[0; 5], d, false, 4, &rank).unwrap();
                assert!(choice.order[0] < 2, "{choice:?}");
                let other = 1 - choice.order[0];
                // The next zone's best, this zone's other, the next zone's second.
                assert_eq!(choice.order[1..], [2, other, 3]);
            }
        }
        // The request's zone has nothing in rotation: the next zone serves.
        let mut c = c;
        c[0].standing = Standing::Out;
        c[1].standing = Standing::Out;
        let choice = pick(&c, &[0; 5], (0.0, 0.9), true, 4, &rank).unwrap();
        assert_eq!(choice.order, vec![2, 3]);
        // A probe of the request's zone goes first.
        c[1].standing = Standing::Probe;
        let choice = pick(&c, &[0; 5], (0.0, 0.9), true, 4, &rank).unwrap();
        assert_eq!(choice.order, vec![1, 2, 3]);
        assert_eq!(choice.reason, PickReason::Probe);
    }
}
