//! Uniform draws for jitter, shedding and picking: xorshift64*.
//!
//! Not cryptographic, and need not be: the draws spread open times and
//! ejection lengths, shed load and pick between two endpoints. Written out
//! (eight lines) rather than a crate: every filter state that draws keeps
//! just its `u64`, which a `Cell` or a closure can hold.

/// A uniform draw in `[0, 1)`, advancing `state` (never 0: seed with `| 1`).
pub fn unit(state: &mut u64) -> f64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    let bits = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn draws_are_in_the_unit_interval_and_spread() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        let draws: Vec<f64> = (0..10_000).map(|_| super::unit(&mut state)).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
