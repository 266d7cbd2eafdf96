//! Splitting new requests over zones: Envoy's priority load, from granted
//! shares.

use crate::config::Spill;

/// Each zone's share of new requests, by rank (`granted[r]` is the granted
/// health of the zone ranked `r`, `endpoints[r]` its endpoint count).
///
/// Like Envoy's priority load with overprovisioning `1 / min_healthy`: the
/// best zone takes `granted / min_healthy` of the traffic (all of it while
/// at least `min_healthy` of it is healthy), the next takes as much of the
/// rest, and so on; what no zone can take is spread over the zones in
/// proportion to what they took. With `spill = "all"` a zone takes all or
/// nothing at `min_healthy`. A zone granted less than `drained` takes none.
/// In `panic`, or when no zone can take anything, requests spread over all
/// zones by their endpoint count, health ignored. The shares sum to 1
/// unless there is no zone.
pub fn shares(
    granted: &[f64],
    endpoints: &[u32],
    min_healthy: f64,
    drained: f64,
    spill: Spill,
    panic: bool,
) -> Vec<f64> {
    let n = granted.len();
    let mut out = vec![0.0; n];
    if !panic {
        let mut left = 1.0_f64;
        for (r, &g) in granted.iter().enumerate() {
            let can = if g < drained {
                0.0
            } else {
                match spill {
                    Spill::Gradual => (g / min_healthy.max(1e-9)).min(1.0),
                    Spill::All if g >= min_healthy => 1.0,
                    Spill::All => 0.0,
                }
            };
            out[r] = can.min(left);
            left -= out[r];
        }
        let taken: f64 = out.iter().sum();
        if taken > 0.0 {
            for s in &mut out {
                *s /= taken;
            }
            return out;
        }
        // Under `spill = "all"` no zone may be at `min_healthy` while some
        // are above `drained`: the best of those takes it all.
        if let Some(r) = granted.iter().position(|&g| g >= drained) {
            out[r] = 1.0;
            return out;
        }
    }
    let total: u32 = endpoints.iter().map(|&e| e.max(1)).sum();
    if total == 0 {
        return out;
    }
    for (r, &e) in endpoints.iter().enumerate() {
        out[r] = f64::from(e.max(1)) / f64::from(total);
    }
    out
}

/// The rank a uniform draw in [0, 1) falls on.
pub fn draw(shares: &[f64], u: f64) -> Option<usize> {
    let mut acc = 0.0;
    let mut last = None;
    for (r, &s) in shares.iter().enumerate() {
        if s <= 0.0 {
            continue;
        }
        acc += s;
        last = Some(r);
        if u < acc {
            return Some(r);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn a_healthy_first_zone_takes_everything() {
        let s = shares(&[1.0, 1.0], &[2, 2], 0.71, 0.1, Spill::Gradual, false);
        assert!(close(&s, &[1.0, 0.0]), "{s:?}");
        // At min_healthy it still does (Envoy's 1.4 overprovisioning).
        let s = shares(&[0.75, 1.0], &[2, 2], 0.71, 0.1, Spill::Gradual, false);
        assert!(close(&s, &[1.0, 0.0]), "{s:?}");
    }

    #[test]
    fn below_min_healthy_the_missing_share_spills_in_order() {
        let s = shares(
            &[0.5, 0.2, 1.0],
            &[2, 2, 2],
            0.8,
            0.1,
            Spill::Gradual,
            false,
        );
        assert!(close(&s, &[0.625, 0.25, 0.125]), "{s:?}");
        // All or nothing.
        let s = shares(&[0.5, 1.0], &[2, 2], 0.8, 0.1, Spill::All, false);
        assert!(close(&s, &[0.0, 1.0]), "{s:?}");
    }

    #[test]
    fn drained_zones_take_nothing_and_shortfalls_are_normalized() {
        let s = shares(&[0.05, 0.4], &[2, 2], 0.8, 0.1, Spill::Gradual, false);
        assert!(close(&s, &[0.0, 1.0]), "{s:?}");
        let s = shares(&[0.4, 0.4], &[2, 2], 0.8, 0.1, Spill::Gradual, false);
        assert!(close(&s, &[0.5, 0.5]), "{s:?}");
        let s = shares(&[0.5, 0.3], &[2, 2], 0.8, 0.1, Spill::All, false);
        assert!(close(&s, &[1.0, 0.0]), "{s:?}");
    }

    #[test]
    fn panic_spreads_by_endpoints() {
        let s = shares(&[0.0, 0.0], &[1, 3], 0.71, 0.1, Spill::Gradual, false);
        assert!(close(&s, &[0.25, 0.75]), "{s:?}");
        let s = shares(&[1.0, 1.0], &[1, 3], 0.71, 0.1, Spill::Gradual, true);
        assert!(close(&s, &[0.25, 0.75]), "{s:?}");
        assert!(shares(&[], &[], 0.71, 0.1, Spill::All, false).is_empty());
    }

    #[test]
    fn draws_land_on_shares() {
        let s = [0.0, 0.25, 0.75];
        assert_eq!(draw(&s, 0.0), Some(1));
        assert_eq!(draw(&s, 0.2499), Some(1));
        assert_eq!(draw(&s, 0.25), Some(2));
        assert_eq!(draw(&s, 1.0), Some(2));
        assert_eq!(draw(&s, f64::NAN), Some(2));
        assert_eq!(draw(&[0.0, 0.0], 0.5), None);
    }
}
