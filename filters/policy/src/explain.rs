//! What a policy means, in words: the effective values and a summary.
//!
//! `sluice explain` prints both. The effective policy is the compiled
//! [`Policy`] serialized back to TOML, so every default shows; the summary
//! says in plain English what each rule does, and says loudly which sections
//! no filter enforces yet.

use std::fmt::Write as _;

use sluice_core::config::{
    Backend, BreakerConfig, BreakerMode, DegradeAction, FailoverConfig, FailureKind, LocalZone,
    Match, Policy, Spill, StateErrorPolicy, TenantSource, Window, Zone,
};
use sluice_core::units::{Count, HumanDuration};

use crate::Capability;
use crate::compile::failover::routable_zones;

/// The effective policy as TOML, every default filled in.
pub fn effective_toml(policy: &Policy) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(policy)
}

/// One sentence per rule of the policy.
pub fn summary(policy: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    out.push(match &policy.tenant.source {
        TenantSource::Header { header } => {
            format!("tenant from header {header}; requests without it are tenant \"{}\"", policy.tenant.missing)
        }
        TenantSource::ApiKey { names } => format!(
            "tenant from a SHA-256 hash of the API key (authorization: Bearer or x-api-key; the key itself is never stored or logged), {} key(s) named; requests without a key are tenant \"{}\"",
            names.len(),
            policy.tenant.missing
        ),
    });
    out.push(format!(
        "model from the request body's \"model\" (or header {}){}",
        policy.model.header,
        policy
            .model
            .default
            .as_ref()
            .map(|d| format!(", \"{d}\" when none"))
            .unwrap_or_default()
    ));
    for b in &policy.backends {
        let zones: Vec<String> = b
            .zones
            .iter()
            .map(|z| {
                let eps = if z.endpoints.is_empty() {
                    "endpoints from the cluster".to_string()
                } else {
                    format!("{} endpoint(s)", z.endpoints.len())
                };
                format!(
                    "{} in region {} (cluster {}, {eps})",
                    z.name, z.region, z.cluster
                )
            })
            .collect();
        let models: Vec<&str> = b.models.iter().map(|m| m.as_str()).collect();
        out.push(format!(
            "backend {} ({:?} API) serves {}; zones: {}",
            b.name,
            b.api,
            models.join(", "),
            zones.join("; ")
        ));
    }
    for r in &policy.routes {
        out.push(format!(
            "requests {} go to backend {}",
            describe_match(&r.matcher),
            r.backend
        ));
    }
    out.push(format!(
        "other requests go to the backend serving their model, else to {}",
        policy.default_backend
    ));

    for cap in Capability::ALL {
        if !cap.is_enabled_in(policy) {
            out.push(format!("[{}] off", cap.section()));
            continue;
        }
        let status = if cap.is_enforced() {
            String::new()
        } else {
            " — NOT ENFORCED YET: sluice.wasm does not implement this section, it is validated only"
                .to_string()
        };
        for line in section_lines(cap, policy) {
            out.push(format!("[{}] {line}{status}", cap.section()));
        }
    }
    out
}

fn section_lines(cap: Capability, policy: &Policy) -> Vec<String> {
    let mut lines = Vec::new();
    match cap {
        Capability::Tokens => {
            let Some(t) = &policy.tokens else {
                return lines;
            };
            lines.push(format!(
                "prompts estimated at {} characters per token; {} completion tokens reserved when the client sets no cap; bodies buffered up to {}",
                t.chars_per_token, t.default_max_tokens, t.max_body
            ));
            lines.push(match t.on_state_error {
                StateErrorPolicy::Deny => "when the shared quota state cannot be read or written (host error, persistent contention), requests are turned away (on_state_error = \"deny\")".to_string(),
                StateErrorPolicy::Allow => "when the shared quota state cannot be read or written (host error, persistent contention), requests go on unlimited (on_state_error = \"allow\")".to_string(),
            });
            for q in &t.quotas {
                let mut limits: Vec<String> =
                    q.tokens.iter().map(|r| format!("{} tokens", r)).collect();
                if let Some(r) = q.requests {
                    limits.push(format!("{r} requests"));
                }
                if let Some(c) = q.concurrent_streams {
                    limits.push(format!("{c} concurrent streams"));
                }
                let rule = q
                    .name
                    .as_ref()
                    .map(|name| format!("rule {name}: "))
                    .unwrap_or_default();
                let mut line = format!(
                    "{rule}each tenant × model {} may use {}",
                    describe_match(&q.matcher),
                    limits.join(", ")
                );
                if let Some(cap) = q.max_completion_tokens {
                    let _ = write!(
                        line,
                        "; completions capped at {cap} tokens ({:?} above)",
                        q.over_cap
                    );
                }
                if let Some(b) = q.burst {
                    let _ = write!(line, "; burst {}", Count(b));
                }
                if q.name.is_none() {
                    line.push_str(
                        "; unnamed, so a change to its match or limits starts its state afresh",
                    );
                }
                lines.push(line);
            }
        }
        Capability::Breaker => {
            if let Some(b) = &policy.breaker {
                lines.push(format!("all backends: {}", describe_breaker(b)));
            }
            for be in &policy.backends {
                if be.breaker != policy.breaker {
                    match &be.breaker {
                        Some(b) => {
                            lines.push(format!("backend {}: {}", be.name, describe_breaker(b)))
                        }
                        None => lines.push(format!("backend {}: off (enabled = false)", be.name)),
                    }
                }
            }
        }
        Capability::Outlier => {
            for be in &policy.backends {
                if let Some(o) = &be.outlier {
                    lines.push(format!("backend {}: {}", be.name, describe_outlier(o)));
                }
            }
        }
        Capability::Retry => {
            for be in &policy.backends {
                if let Some(r) = &be.retry {
                    let weighed = if r.typical_request_tokens > 0 {
                        format!(
                            ", counted in typical requests of {} tokens",
                            r.typical_request_tokens
                        )
                    } else {
                        String::new()
                    };
                    lines.push(format!(
                        "backend {}: up to {} retries on {}, back-off {}..{}, while retries stay under {} of requests (+{} per second, over {}){weighed}; never after the first streamed byte; a failure that reaches the client says x-should-retry: false",
                        be.name, r.max_retries, kinds(&r.retry_on), HumanDuration(r.backoff_base), HumanDuration(r.backoff_max), r.budget, r.min_retries_per_second, HumanDuration(r.ttl)
                    ));
                }
            }
        }
        Capability::Failover => lines.extend(describe_failover(policy)),
    }
    lines
}

fn describe_breaker(b: &BreakerConfig) -> String {
    let mode = match &b.mode {
        BreakerMode::Consecutive { failures } => format!("open after {failures} failures in a row"),
        BreakerMode::Rate {
            window,
            min_calls,
            failure_rate,
            slow_rate,
        } => {
            let window = match window {
                Window::Calls(n) => format!("the last {n} calls"),
                Window::Time(d) => format!("the last {}", HumanDuration(*d)),
            };
            format!(
                "open when over {window} (at least {min_calls} calls) {failure_rate} fail or {slow_rate} are slow"
            )
        }
        BreakerMode::Adaptive {
            k,
            window,
            max_reject,
        } => format!(
            "throttle adaptively: reject with probability (requests − {k}·accepts)/(requests + 1) over {}, at most {max_reject}",
            HumanDuration(*window)
        ),
    };
    let degrade = match &b.degrade.action {
        DegradeAction::FailFast => format!(
            "fail fast with 503 and retry-after {}",
            HumanDuration(b.degrade.retry_after)
        ),
        DegradeAction::FallbackModel { model, backend } => {
            format!("answer with model {model} on backend {backend}")
        }
        DegradeAction::Static { .. } => "answer with the static text".to_string(),
    };
    format!(
        "{mode}; failures are {}; slow is TTFT > {} or TPOT > {}; open {} growing ×{} to {} (±{}), then {} probes; at most {} in flight per backend × model{}; when turned away: {degrade}",
        kinds(&b.failure_on),
        HumanDuration(b.slow_ttft),
        HumanDuration(b.slow_tpot),
        HumanDuration(b.open_for),
        b.backoff,
        HumanDuration(b.max_open_for),
        b.jitter,
        b.half_open_probes,
        b.bulkhead.max_in_flight,
        b.bulkhead
            .max_in_flight_per_tenant
            .map(|t| format!(" and {t} per tenant"))
            .unwrap_or_default()
    )
}

fn kinds(kinds: &[FailureKind]) -> String {
    let names: Vec<&str> = kinds
        .iter()
        .map(|k| match k {
            FailureKind::Status5xx => "5xx",
            FailureKind::GatewayError => "gateway errors",
            FailureKind::Status429 => "429",
            FailureKind::Reset => "resets",
            FailureKind::ConnectFailure => "connect failures",
            FailureKind::Timeout => "timeouts",
        })
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

fn describe_match(m: &Match) -> String {
    if m.is_catch_all() {
        return "for any request".into();
    }
    let mut parts = Vec::new();
    let list = |v: &mut Vec<String>, what: &str, items: Vec<&str>| {
        if !items.is_empty() {
            v.push(format!("{what} {}", items.join(" or ")));
        }
    };
    list(
        &mut parts,
        "of tenant",
        m.tenants.iter().map(|p| p.as_str()).collect(),
    );
    list(
        &mut parts,
        "for model",
        m.models.iter().map(|p| p.as_str()).collect(),
    );
    list(
        &mut parts,
        "under path",
        m.path_prefix.iter().map(String::as_str).collect(),
    );
    list(
        &mut parts,
        "to host",
        m.authority.iter().map(String::as_str).collect(),
    );
    parts.join(" ")
}

/// What `[outlier]` does for one backend, in words: what picks, what ejects,
/// for how long, and what the client is spared.
fn describe_outlier(o: &sluice_core::config::OutlierConfig) -> String {
    let off = |on: bool, text: String| if on { text } else { String::new() };
    let detectors: Vec<String> = [
        off(
            o.consecutive_errors > 0,
            format!("{} failed attempts in a row", o.consecutive_errors),
        ),
        off(
            o.failure_rate.get() > 0.0,
            format!(
                "a failure share of {} (over {}, from {} attempts)",
                o.failure_rate,
                HumanDuration(o.interval),
                o.min_requests
            ),
        ),
        off(
            o.success_rate_stdev > 0.0,
            format!(
                "a success rate {}σ below its peers' mean (with {} endpoints of {} attempts)",
                o.success_rate_stdev, o.min_hosts, o.min_requests
            ),
        ),
        off(
            o.latency_factor > 0.0,
            format!(
                "time to first token or per output token over {}× its peers' median (over {}, from {} samples; never under {} / {})",
                o.latency_factor,
                HumanDuration(o.latency_window),
                o.min_samples,
                HumanDuration(o.ttft_floor),
                HumanDuration(o.tpot_floor)
            ),
        ),
        off(
            o.phi_threshold > 0.0,
            format!(
                "phi accrual above {} on a busy endpoint's gaps between successes",
                o.phi_threshold
            ),
        ),
    ]
    .into_iter()
    .filter(|d| !d.is_empty())
    .collect();
    let mut text = String::from(
        "picks each request's endpoint (power of two choices on load and time to first token) and names it in x-gateway-destination-endpoint with fallbacks; ",
    );
    if detectors.is_empty() {
        text.push_str("ejects no endpoint (every detector is off)");
    } else {
        text.push_str(&format!(
            "ejects an endpoint on {}, for {} × its recent ejections (max {}, ± {}), at most {} of endpoints and never the last; it returns after {} successful probes",
            detectors.join(", or "),
            HumanDuration(o.base_ejection_time),
            HumanDuration(o.max_ejection_time),
            o.jitter,
            o.max_ejection,
            o.probes
        ));
    }
    if o.cooldown_429.is_zero() {
        text.push_str("; 429s do not bench an endpoint");
    } else {
        text.push_str(&format!(
            "; an endpoint answering 429 gets no new request until its reset time (retry-after, x-ratelimit-reset-*, anthropic-ratelimit-*-reset; {} when it names none, at most {})",
            HumanDuration(o.cooldown_429),
            HumanDuration(o.max_cooldown)
        ));
    }
    if !o.first_token_timeout.is_zero() {
        text.push_str(&format!(
            "; a stream with no first token after {} is abandoned before the client sees a byte and tried elsewhere",
            HumanDuration(o.first_token_timeout)
        ));
    }
    text.push_str(&format!(
        "; a failed attempt is retried on up to {} other endpoints before anything reaches the client",
        o.retries
    ));
    text
}

/// Health under which a zone is drained (probe requests only), in percent:
/// the filter's fixed threshold, not a policy key.
const FAILOVER_DRAINED_BELOW: u32 =
    sluice_core::failover::DRAINED as u32 * 100 / sluice_core::failover::LEVELS as u32;

/// What `[failover]` does, in words: how it routes, how zones spill, drain
/// and fail back, then per backend (with its effective section) the zone
/// order it produces and what makes a zone unhealthy, with the numbers that
/// apply to that backend.
fn describe_failover(policy: &Policy) -> Vec<String> {
    let mut lines = vec![
        "sends each new request of a backend to one of its zones by naming that zone's endpoints in x-gateway-destination-endpoint (the cluster's override_host load balancing), with the next zone's endpoint as the first fallback, so the router's retries leave a sick zone within the same request; a zone decision applies from the next request; each answer says where it went in x-sluice-zone: <zone>; reason=<preferred|spill|probe|panic|retry>".to_string(),
    ];
    // The spill and fail-back numbers: once for the global section, and
    // again for each backend whose own differ.
    let global = policy.failover.as_ref().map(spill_and_failback);
    lines.extend(global.clone());
    for b in &policy.backends {
        let Some(f) = &b.failover else {
            let how = if policy.failover.is_some() {
                " (enabled = false in its [backend.failover])"
            } else {
                ""
            };
            lines.push(format!("failover off for backend {}{how}", b.name));
            continue;
        };
        let routable = routable_zones(b);
        if routable.len() < 2 {
            lines.push(format!(
                "backend {}: {}",
                b.name,
                nothing_to_do(b, &routable)
            ));
            continue;
        }
        lines.push(format!(
            "backend {}: zone order: {}",
            b.name,
            zone_order(policy, f, b)
        ));
        let own = spill_and_failback(f);
        if global.as_ref() != Some(&own) {
            lines.push(format!("backend {}: {own}", b.name));
        }
        lines.push(format!(
            "backend {}: {}",
            b.name,
            zone_health(f, b, &routable)
        ));
        for z in b.zones.iter().filter(|z| z.endpoints.is_empty()) {
            lines.push(format!(
                "backend {}: zone {} lists no endpoints, so failover never sends to it (list them, or pass `sluice render envoy --endpoints {}/{}=HOST:PORT`)",
                b.name, z.name, b.name, z.name
            ));
        }
    }
    lines
}

/// How zones of a backend under `f` spill, drain and fail back.
fn spill_and_failback(f: &FailoverConfig) -> String {
    let spill = match f.spill {
        Spill::Gradual => format!(
            "each zone, in order, takes min(what is left, its health / {}) of new requests (spill = \"gradual\", Envoy's priority load)",
            f.min_healthy
        ),
        Spill::All => format!(
            "the first zone in order whose health is at least {} takes every new request (spill = \"all\")",
            f.min_healthy
        ),
    };
    format!(
        "{spill}; a zone under {FAILOVER_DRAINED_BELOW}% health is drained: it gets one probe request per {} per proxy, with fallbacks to healthy zones, so a failed probe costs its client latency only; when every zone it may use is drained, panic: requests spread over all of them (sluice_failover.<backend>.panic = 1, logged); a zone's share drops as soon as its health does, and rises only after {} without a tick under {}, at most once per {}",
        HumanDuration(f.probe_interval),
        HumanDuration(f.failback_after),
        f.min_healthy,
        HumanDuration(f.failback_after),
    )
}

/// Why failover leaves `backend` alone: it has fewer than two zones it
/// could name endpoints of.
fn nothing_to_do(backend: &Backend, routable: &[&Zone]) -> String {
    let how = "nothing to fail over, requests go to its zone as without [failover]";
    match (backend.zones.as_slice(), routable) {
        ([only], _) => format!("one zone ({}), {how}", only.name),
        (_, []) => "no zone lists endpoints, so failover has none to name and Envoy's own balancing decides (list `endpoints`, or pass `sluice render envoy --endpoints`)".to_string(),
        (_, [only, ..]) => format!(
            "only zone {} lists endpoints, so failover has no other zone to name; the others are left to Envoy (list their `endpoints`, or pass `sluice render envoy --endpoints`)",
            only.name
        ),
    }
}

/// The order in which `backend`'s zones are preferred: the local zone,
/// then `order`, then the rest of the local region, then (with
/// `cross_region`) the other regions, each zone with its region.
fn zone_order(policy: &Policy, f: &FailoverConfig, backend: &Backend) -> String {
    let zones: Vec<&Zone> = routable_zones(backend);
    let listed = |z: &Zone| format!("{} ({})", z.name, z.region);
    let in_order: Vec<&Zone> = f
        .order
        .iter()
        .filter_map(|name| zones.iter().copied().find(|z| &z.name == name))
        .collect();
    match &f.local_zone {
        LocalZone::Auto => {
            let mut text = String::from(
                "the proxy's zone (node.locality.zone, which Istio sets, as does `sluice render envoy --node-zone`) when it is one of this backend's zones",
            );
            if !in_order.is_empty() {
                let names: Vec<&str> = in_order.iter().map(|z| z.name.as_str()).collect();
                let _ = write!(text, ", then {} (from `order`)", names.join(", "));
            }
            text.push_str(", then the other zones of the proxy's region");
            if f.cross_region {
                text.push_str(", then the other regions' zones");
            } else {
                text.push_str(", never another region's (cross_region = false; `order` included)");
            }
            let mut regions: Vec<(&str, Vec<&str>)> = Vec::new();
            for z in &zones {
                match regions.iter_mut().find(|(r, _)| *r == z.region) {
                    Some((_, names)) => names.push(&z.name),
                    None => regions.push((&z.region, vec![&z.name])),
                }
            }
            let regions: Vec<String> = regions
                .iter()
                .map(|(r, names)| format!("{r}: {}", names.join(", ")))
                .collect();
            let _ = write!(text, "; zones by region: {}", regions.join("; "));
            text
        }
        LocalZone::Named(local) => {
            // A zone name is a place: a backend without the local zone takes
            // its region from a backend that has it.
            let region = zones
                .iter()
                .copied()
                .chain(policy.backends.iter().flat_map(|b| &b.zones))
                .find(|z| &z.name == local)
                .map(|z| z.region.as_str());
            let same_region = |z: &Zone| Some(z.region.as_str()) == region;
            let mut placed: Vec<(&Zone, &str)> = Vec::new();
            let candidates = zones
                .iter()
                .filter(|z| &z.name == local)
                .map(|z| (*z, "local_zone"))
                .chain(
                    in_order
                        .iter()
                        .filter(|z| f.cross_region || same_region(z))
                        .map(|z| (*z, "order")),
                )
                .chain(
                    zones
                        .iter()
                        .filter(|z| same_region(z))
                        .map(|z| (*z, "local region")),
                )
                .chain(
                    zones
                        .iter()
                        .filter(|z| f.cross_region && !same_region(z))
                        .map(|z| (*z, "other region")),
                );
            for (z, why) in candidates {
                if !placed.iter().any(|(p, _)| p.name == z.name) {
                    placed.push((z, why));
                }
            }
            let never: Vec<String> = zones
                .iter()
                .filter(|z| !f.cross_region && !same_region(z))
                .map(|z| listed(z))
                .collect();
            let mut text = String::new();
            if !zones.iter().any(|z| &z.name == local) {
                let why = if backend.zones.iter().any(|z| &z.name == local) {
                    "lists no endpoints here"
                } else {
                    "is not one of this backend's"
                };
                let _ = write!(
                    text,
                    "(local zone {local}{} {why}) ",
                    region.map(|r| format!(" in {r}")).unwrap_or_default()
                );
            }
            let steps: Vec<String> = placed
                .iter()
                .map(|(z, why)| format!("{} [{why}]", listed(z)))
                .collect();
            text.push_str(&steps.join(", then "));
            if !never.is_empty() {
                let _ = write!(
                    text,
                    "; never {} (another region, cross_region = false)",
                    never.join(", ")
                );
            }
            text
        }
    }
}

/// What makes a zone of `backend` unhealthy, with its numbers.
fn zone_health(f: &FailoverConfig, backend: &Backend, routable: &[&Zone]) -> String {
    let quotas: Vec<String> = routable
        .iter()
        .filter_map(|z| {
            let mut limits = Vec::new();
            if let Some(r) = z.requests_per_minute {
                limits.push(format!("{r} requests/min"));
            }
            if let Some(t) = z.tokens_per_minute {
                limits.push(format!("{} tokens/min", Count(u64::from(t.get()))));
            }
            (!limits.is_empty()).then(|| format!("{}: {}", z.name, limits.join(", ")))
        })
        .collect();
    let provider = "what the provider reports (x-ratelimit-remaining-*/-limit-*, anthropic-ratelimit-*-remaining/-limit)";
    let usage = if quotas.is_empty() {
        format!("use is {provider}; no zone gives requests_per_minute or tokens_per_minute")
    } else {
        format!(
            "use is the larger of {provider} and this proxy's use of the zone's requests_per_minute / tokens_per_minute ({})",
            quotas.join("; ")
        )
    };
    let latency = match &backend.outlier {
        Some(o) if o.latency_factor > 0.0 => format!(
            "latency (0 when its time to first token is over {}× the best other zone's and over {}: [outlier]'s latency_factor and ttft_floor)",
            o.latency_factor,
            HumanDuration(o.ttft_floor)
        ),
        _ => "latency (not counted: [outlier]'s latency_factor is 0)".to_string(),
    };
    format!(
        "a zone's health is the share of its endpoints in rotation ([outlier]'s ejections and 429 benches) × (1 − the share of its recent attempts that failed or got 429) × quota (1 up to {} use, falling to 0 at 100%; {usage}) × {latency}",
        f.max_utilization
    )
}
