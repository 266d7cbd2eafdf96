//! Seeded mesh scenarios: many requests arriving over virtual time through a
//! filter chain into simulated clusters, summarised as a trace and an outcome
//! distribution.
