//! `sluice render envoy`: a complete Envoy bootstrap from a policy.
//!
//! The output is a static bootstrap a local Envoy runs as is: the admin
//! interface, one listener whose HTTP connection manager carries Envoy's gzip
//! compressor (so sluice reads plain answers and clients still get gzip),
//! `sluice.wasm` (every enforced capability in one filter, given the policy
//! text as its configuration; always present, since it also resolves model
//! routes and strips internal headers a client sent) and the router, with
//! normalized paths and a buffer above the policy's `max_body`, a route per
//! backend, and one cluster per
//! Envoy cluster the policy names, its endpoints grouped by zone and region
//! into localities so Envoy's own locality handling sees the topology.
//!
//! The filter is given the policy as rendered: with the endpoints of
//! `--endpoints` ([`policy_text`]), so what it knows of a backend is what
//! Envoy routes to. Backends with `[outlier]` get endpoint picking by sluice
//! or, with `--native-outlier`, Envoy's own outlier detection ([`outlier`]);
//! backends with `[retry]` get sluice's retry budget or, with
//! `--native-retry`, Envoy's route retries and retry budget ([`retry`]).
//! `--node-zone` writes the proxy's locality into the bootstrap, and
//! `--native-failover` renders Envoy's own zone failover in place of
//! `[failover]` and `[outlier]` ([`failover`]).

mod failover;
mod istio;
mod outlier;
mod policy_text;
mod retry;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sluice_core::config::{Backend, OutlierConfig, Policy, RetryConfig};
use sluice_policy::{ATTEMPT_ROOT_ID, Capability, Diagnostics, MODULE, Source};

use failover::FailoverMode;
pub use istio::{IstioArgs, istio};
use outlier::OutlierMode;
use policy_text::{Edits, ZoneEndpoints};
use retry::RetryMode;

/// Request header naming the backend a request goes to; the route table
/// matches it. Filters set it (fallback model, explicit routes).
pub const BACKEND_HEADER: &str = "x-sluice-backend";

#[derive(clap::Args)]
pub struct EnvoyArgs {
    /// The policy file (TOML or JSON).
    policy: PathBuf,
    /// Directory holding the filters' .wasm files.
    #[arg(long)]
    wasm_dir: PathBuf,
    /// Address the listener binds (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:10000")]
    listen: String,
    /// Address of Envoy's admin interface.
    #[arg(long, default_value = "127.0.0.1:9901")]
    admin: String,
    /// Replace a zone's endpoints: `BACKEND/ZONE=HOST:PORT[,HOST:PORT...]`.
    #[arg(long = "endpoints", value_name = "BACKEND/ZONE=ADDRS")]
    endpoints: Vec<String>,
    /// What Envoy does when sluice's VM traps: FAIL_RELOAD (the default)
    /// starts a new VM on the next request, FAIL_OPEN skips sluice on that
    /// worker until a restart (unprotected), FAIL_CLOSED answers 503 until
    /// then. Measured in envoy/failure-policy.md.
    #[arg(long, default_value = "FAIL_RELOAD", value_parser = ["FAIL_OPEN", "FAIL_CLOSED", "FAIL_RELOAD"])]
    failure_policy: String,
    /// Add sluice.wasm to every cluster as an upstream filter, which sees
    /// each attempt (retries included). Added anyway where an enforced
    /// section learns from attempts: the clusters of backends with
    /// `[outlier]`, every cluster for `[retry]`.
    #[arg(long)]
    attempt_filter: bool,
    /// For side-by-side drills: enforce `[outlier]` with Envoy's own
    /// `outlier_detection` on the clusters (from `interval`,
    /// `consecutive_errors`, `failure_rate`, `min_requests`,
    /// `base_ejection_time`, `max_ejection_time`, `max_ejection`; Envoy has
    /// nothing for 429s and slowness) and a route retry policy (5xx, resets,
    /// connect failures and 429, two retries on hosts not tried yet), with
    /// least-request load balancing and no endpoint picking by sluice.
    /// sluice.wasm gets the policy without `[outlier]`, so it does not act on
    /// outliers too.
    #[arg(long)]
    native_outlier: bool,
    /// For side-by-side drills: enforce `[retry]` with Envoy alone: a route
    /// retry policy from the section (`retry_on` in Envoy's words,
    /// `max_retries` retries each on a host not tried yet, back-off,
    /// `retry-after`) and Envoy's retry budget on the clusters (retries in
    /// flight at most `budget` of the requests in flight, at least
    /// max(3, `min_retries_per_second`)). No budget over time, no
    /// `x-should-retry: false` for clients. sluice.wasm gets the policy
    /// without `[retry]`. Combines with --native-outlier.
    #[arg(long)]
    native_retry: bool,
    /// The zone this Envoy runs in: written as the bootstrap's
    /// `node.locality` (this zone, and its region from the policy), which
    /// `[failover] local_zone = "auto"` reads. Istio sets the locality of
    /// its sidecars itself; this is for a plain Envoy.
    #[arg(long, value_name = "ZONE")]
    node_zone: Option<String>,
    /// For side-by-side drills: enforce `[failover]` with Envoy alone: each
    /// zone of a cluster a priority in the policy's order (the --node-zone
    /// zone, else `local_zone`, else `order`, then the rest, same region
    /// first), Envoy's default overprovisioning, outlier detection that can
    /// eject a whole zone, an active health check of `/health`, and route
    /// retries that move to the next zone. It replaces `[outlier]` too:
    /// sluice.wasm gets the policy without either section. Nothing for
    /// provider quotas, latency, fail-back dwell or probes.
    #[arg(long, conflicts_with = "native_outlier")]
    native_failover: bool,
    /// Write to this file instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// Reads a policy file and applies the `--endpoints` overrides: the
/// policy, the file's text and the overrides. `None` when the policy is
/// invalid (already reported, file:line:col).
fn load_with_endpoints(
    path: &Path,
    endpoints: &[String],
) -> anyhow::Result<Option<(Policy, String, Vec<ZoneEndpoints>)>> {
    let (parsed, text) = crate::load(path)?;
    let mut policy = match parsed {
        Ok(p) => p,
        Err(d) => {
            crate::report(&d);
            return Ok(None);
        }
    };
    let overrides = endpoints
        .iter()
        .map(|spec| override_endpoints(&mut policy, spec))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some((policy, text, overrides)))
}

pub fn envoy(args: &EnvoyArgs) -> anyhow::Result<ExitCode> {
    let Some((policy, text, overrides)) = load_with_endpoints(&args.policy, &args.endpoints)?
    else {
        return Ok(ExitCode::from(1));
    };
    let outlier_mode = if args.native_outlier {
        OutlierMode::Native
    } else if Capability::Outlier.is_enforced() {
        OutlierMode::Sluice
    } else {
        OutlierMode::Off
    };
    let retry_mode = if args.native_retry {
        RetryMode::Native
    } else if Capability::Retry.is_enforced() {
        RetryMode::Sluice
    } else {
        RetryMode::Off
    };
    let has_outlier = Capability::Outlier.is_enabled_in(&policy);
    if args.native_outlier && !has_outlier {
        eprintln!(
            "warning: --native-outlier: the policy enables no [outlier], so there is nothing to render for it"
        );
    }
    let has_retry = Capability::Retry.is_enabled_in(&policy);
    if args.native_retry && !has_retry {
        eprintln!(
            "warning: --native-retry: the policy enables no [retry], so there is nothing to render for it"
        );
    }
    let has_failover = Capability::Failover.is_enabled_in(&policy);
    if args.native_failover && !has_failover {
        eprintln!(
            "warning: --native-failover: the policy enables no [failover], so there is nothing to render for it"
        );
    }
    // Native failover replaces outlier detection too: Envoy's own ejects
    // the endpoints its priorities spill around.
    let native_failover = args.native_failover && has_failover;
    let (outlier_mode, failover_mode) = if native_failover {
        (OutlierMode::Off, FailoverMode::Native)
    } else {
        (outlier_mode, FailoverMode::Sluice)
    };
    let (filter_policy, filter_text) = match filter_policy_text(
        &policy,
        &text,
        &args.policy,
        Edits {
            endpoints: &overrides,
            // Only when there is something to drop: otherwise the text stays
            // the file's, byte for byte.
            drop_outlier: (args.native_outlier || native_failover) && has_outlier,
            drop_retry: args.native_retry && has_retry,
            drop_failover: native_failover,
        },
    )? {
        Ok(rendered) => rendered,
        Err(d) => {
            crate::report(&d);
            return Ok(ExitCode::from(1));
        }
    };
    // What sluice.wasm is given decides what it enforces.
    let not_enforced: Vec<Capability> = Capability::ALL
        .into_iter()
        .filter(|c| c.is_enabled_in(&filter_policy) && !c.is_enforced())
        .collect();
    for cap in &not_enforced {
        eprintln!(
            "warning: [{}] is NOT ENFORCED YET: sluice.wasm does not implement it, so the rendered Envoy does not apply it",
            cap.section()
        );
    }
    let modes = Modes {
        outlier: outlier_mode,
        retry: retry_mode,
        failover: failover_mode,
    };
    let bootstrap = bootstrap(&policy, &filter_policy, &filter_text, args, modes)?;
    let mut out = format!(
        "# Envoy bootstrap rendered by `sluice render envoy` from {}.\n",
        args.policy.display()
    );
    if args.native_outlier && has_outlier {
        out.push_str("# [outlier]: Envoy's own outlier_detection and route retries (--native-outlier); sluice.wasm is given the policy without it\n");
    }
    if args.native_retry && has_retry {
        out.push_str("# [retry]: Envoy's own route retry policy and cluster retry_budget (--native-retry); sluice.wasm is given the policy without it\n");
    }
    if native_failover {
        out.push_str("# [failover]: Envoy's own zone failover (--native-failover): locality priorities in failover order, outlier detection, /health checks, route retries across priorities; it replaces [outlier] too, so sluice.wasm is given the policy without [failover] and without [outlier]\n");
    }
    if let Some(zone) = &args.node_zone {
        out.push_str(&format!("# node.locality: zone `{zone}` (--node-zone)\n"));
    }
    for cap in &not_enforced {
        out.push_str(&format!(
            "# NOT ENFORCED YET: [{}] (sluice.wasm does not implement it)\n",
            cap.section()
        ));
    }
    out.push_str(&serde_yaml::to_string(&bootstrap).context("cannot print YAML")?);
    match &args.output {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => print!("{out}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The policy text for sluice.wasm (`edits` applied to the file's `text`)
/// and the policy it compiles to, which is `policy` with the same edits.
///
/// `Ok(Err(_))`: the edited text does not validate (an `--endpoints`
/// address the policy language refuses), located in the edited text.
fn filter_policy_text(
    policy: &Policy,
    text: &str,
    path: &Path,
    edits: Edits<'_>,
) -> anyhow::Result<Result<(Policy, String), Diagnostics>> {
    let mut expected = policy.clone();
    if edits.drop_outlier {
        expected.outlier = None;
        for b in &mut expected.backends {
            b.outlier = None;
        }
    }
    if edits.drop_retry {
        expected.retry = None;
        for b in &mut expected.backends {
            b.retry = None;
        }
    }
    if edits.drop_failover {
        expected.failover = None;
        for b in &mut expected.backends {
            b.failover = None;
        }
    }
    if edits.is_empty() {
        return Ok(Ok((expected, text.to_string())));
    }
    let format = crate::format_of(path);
    let edited = policy_text::edit(text, format, edits)
        .with_context(|| format!("cannot edit the policy text of {}", path.display()))?;
    let name = format!("{} (as rendered for sluice.wasm)", path.display());
    let compiled = match sluice_policy::parse(Source::new(name, edited.as_str(), format)) {
        Ok(p) => p,
        Err(d) => return Ok(Err(d)),
    };
    // The filter must enforce exactly what the render used: a difference
    // here is a bug of the editor, never something to ship.
    if compiled != expected {
        bail!(
            "the policy text edited for sluice.wasm does not compile to the rendered policy (a bug of `sluice render`)"
        );
    }
    Ok(Ok((compiled, edited)))
}

/// Applies one `--endpoints BACKEND/ZONE=ADDRS` override to `policy`; the
/// same edit for the policy text.
fn override_endpoints(policy: &mut Policy, spec: &str) -> anyhow::Result<ZoneEndpoints> {
    let Some((target, addrs)) = spec.split_once('=') else {
        bail!("--endpoints `{spec}`: expected BACKEND/ZONE=HOST:PORT[,HOST:PORT...]");
    };
    let Some((backend, zone)) = target.split_once('/') else {
        bail!("--endpoints `{spec}`: expected BACKEND/ZONE before `=`");
    };
    let Some(b) = policy.backends.iter_mut().find(|b| b.name == backend) else {
        bail!("--endpoints `{spec}`: the policy has no backend `{backend}`");
    };
    let Some(z) = b.zones.iter_mut().find(|z| z.name == zone) else {
        bail!("--endpoints `{spec}`: backend `{backend}` has no zone `{zone}`");
    };
    z.endpoints = addrs
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    for ep in &z.endpoints {
        split_host_port(ep).with_context(|| format!("--endpoints `{spec}`"))?;
    }
    Ok(ZoneEndpoints {
        backend: backend.to_string(),
        zone: zone.to_string(),
        endpoints: z.endpoints.clone(),
    })
}

fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("`{addr}` is not HOST:PORT")
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("`{addr}` has no valid port"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    ))
}

fn socket_address(addr: &str) -> anyhow::Result<Value> {
    let (host, port) = split_host_port(addr)?;
    Ok(json!({ "socket_address": { "address": host, "port_value": port } }))
}

/// Who enforces the sections Envoy can also enforce by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Modes {
    outlier: OutlierMode,
    retry: RetryMode,
    failover: FailoverMode,
}

/// The bootstrap: `policy` drives the listener, routes and clusters;
/// `filter_policy` is what sluice.wasm is given as `filter_text` (the same
/// policy, without `[outlier]` under `--native-outlier`, without `[retry]`
/// under `--native-retry`, without `[failover]` and `[outlier]` under
/// `--native-failover`).
fn bootstrap(
    policy: &Policy,
    filter_policy: &Policy,
    filter_text: &str,
    args: &EnvoyArgs,
    modes: Modes,
) -> anyhow::Result<Value> {
    // Outlier detection needs the attempts of its own backends' clusters
    // only (see `clusters`); other enforced sections that learn from
    // attempts, on every cluster.
    let every_cluster = args.attempt_filter
        || Capability::ALL.into_iter().any(|c| {
            c != Capability::Outlier
                && c.learns_from_attempts()
                && c.is_enforced()
                && c.is_enabled_in(filter_policy)
        });
    let mut attempt_filter = wasm_filter(&args.wasm_dir, filter_text, &args.failure_policy);
    attempt_filter["name"] = json!(ATTEMPT_ROOT_ID);
    attempt_filter["typed_config"]["config"]["root_id"] = json!(ATTEMPT_ROOT_ID);
    let mut http_filters = vec![
        compressor_filter(),
        wasm_filter(&args.wasm_dir, filter_text, &args.failure_policy),
    ];
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));

    let mut node = json!({ "id": "sluice", "cluster": "sluice",
                           "metadata": { "sluice_policy": policy.name.clone().unwrap_or_default() } });
    if let Some(zone) = &args.node_zone {
        node["locality"] = failover::node_locality(policy, zone)?;
    }
    // Zones in the order failover prefers them, for native failover's priorities.
    let zone_order = match (&policy.failover, modes.failover) {
        (Some(f), FailoverMode::Native) => {
            Some(failover::zone_order(policy, f, args.node_zone.as_deref()))
        }
        _ => None,
    };

    Ok(json!({
        "node": node,
        "admin": { "address": socket_address(&args.admin)? },
        "static_resources": {
            "listeners": [{
                "name": "sluice",
                "address": socket_address(&args.listen)?,
                "per_connection_buffer_limit_bytes": buffer_limit(policy),
                "filter_chains": [{ "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "sluice",
                        "codec_type": "AUTO",
                        // sluice.wasm tells the API from the path (and meters
                        // only the inference paths), the route table matches
                        // path prefixes, and the upstream serves a path its own
                        // way: all three must see one spelling of a path, or
                        // `/v1/chat/%63ompletions`, `//v1/chat/completions` and
                        // `/v1/x/../chat/completions` would reach an upstream that
                        // serves them as chat without being metered. Envoy
                        // normalizes before any filter runs (RFC 3986: dot
                        // segments, percent-decoding of unreserved characters),
                        // and merges slashes.
                        "normalize_path": true,
                        "merge_slashes": true,
                        // An encoded slash (`%2F`, `%5C`) is not normalized by
                        // the above, and many upstream frameworks decode it before
                        // routing (`/v1/chat%2Fcompletions` is chat to them, not
                        // to sluice). Rejecting it (400) keeps metering sound with
                        // one answer and nothing sent upstream; no SDK encodes a
                        // slash. UNESCAPE_AND_REDIRECT would also be sound, but
                        // asks the client to send the body again and leaves a
                        // client that does not follow redirects (httpx's default)
                        // with a 3xx in place of an answer.
                        "path_with_escaped_slashes_action": "REJECT_REQUEST",
                        "route_config": { "name": "sluice", "virtual_hosts": [{
                            "name": "llm", "domains": ["*"], "routes": routes(policy, modes),
                            // With retries on, every answer says how many
                            // attempts it took (`x-envoy-attempt-count`).
                            "include_attempt_count_in_response":
                                Capability::Retry.is_enabled_in(policy),
                        }]},
                        "http_filters": http_filters,
                    }
                }]}],
            }],
            "clusters": clusters(policy, modes, &attempt_filter, every_cluster, zone_order.as_deref())?,
        },
    }))
}

/// What sluice.wasm buffers of a request body when the policy has no
/// `[tokens] max_body` (filter-common's `DEFAULT_MAX_BODY`).
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// Envoy's own default `per_connection_buffer_limit_bytes`.
const ENVOY_DEFAULT_BUFFER_LIMIT: u64 = 1024 * 1024;

/// Room above `max_body` for the data Envoy hands the filter in one body
/// callback (a socket read or an HTTP/2 frame, at most tens of KiB).
const BUFFER_SLACK: u64 = 256 * 1024;

/// The listener's `per_connection_buffer_limit_bytes`: above the body size
/// sluice.wasm buffers, with slack, never below Envoy's default.
///
/// sluice.wasm holds a request's body until its end (or until it crosses
/// `max_body`, when it answers its own 413 in the client's API shape).
/// Envoy answers a held body that outgrows this buffer with a plain-text
/// 413 before the filter can judge it: a chunked body (no content-length)
/// over `max_body` got that answer, which no SDK parses, and a body the
/// policy allows between 1 MiB and `max_body` was refused outright.
fn buffer_limit(policy: &Policy) -> u64 {
    let max_body = policy
        .tokens
        .as_ref()
        .map_or(DEFAULT_MAX_BODY, |t| t.max_body.0);
    max_body
        .saturating_add(BUFFER_SLACK)
        .max(ENVOY_DEFAULT_BUFFER_LIMIT)
}

/// Routes: a backend named by [`BACKEND_HEADER`] first (filters set it),
/// then the policy's explicit routes on what Envoy can match by itself
/// (path prefix, authority), then the default backend.
fn routes(policy: &Policy, modes: Modes) -> Vec<Value> {
    let mut routes = Vec::new();
    for b in &policy.backends {
        routes.push(json!({
            "name": format!("backend-{}", b.name),
            "match": { "prefix": "/", "headers": [{ "name": BACKEND_HEADER, "string_match": { "exact": b.name } }] },
            "route": route_action(policy, &b.name, modes),
        }));
    }
    for (i, r) in policy.routes.iter().enumerate() {
        // Model and tenant matches need the request body or identity, which a
        // sluice filter resolves into BACKEND_HEADER; Envoy matches the rest.
        if !r.matcher.models.is_empty() || !r.matcher.tenants.is_empty() {
            continue;
        }
        let prefixes = if r.matcher.path_prefix.is_empty() {
            vec!["/".to_string()]
        } else {
            r.matcher.path_prefix.clone()
        };
        for prefix in prefixes {
            let mut m = json!({ "prefix": prefix });
            if !r.matcher.authority.is_empty() {
                let pattern = r
                    .matcher
                    .authority
                    .iter()
                    .map(|a| regex_escape(a))
                    .collect::<Vec<_>>()
                    .join("|");
                m["headers"] = json!([{ "name": ":authority", "string_match": { "safe_regex": { "regex": format!("^({pattern})$") } } }]);
            }
            routes.push(json!({ "name": format!("route-{i}"), "match": m, "route": route_action(policy, &r.backend, modes) }));
        }
    }
    routes.push(json!({ "name": "default", "match": { "prefix": "/" }, "route": route_action(policy, &policy.default_backend, modes) }));
    routes
}

/// The route to a backend's first cluster, with its timeout, and its retry
/// policy: Envoy's own for `[retry]` under `--native-retry` (with the
/// first-token timeout of a native `[outlier]` as its per-try timeout),
/// else the one native outlier detection goes with, else the route's part
/// of sluice's `[retry]`. Under native failover (a backend with `[outlier]`
/// on, which failover needs), that policy's retries also move across
/// zones, or native failover's own when there is none.
fn route_action(policy: &Policy, backend: &str, modes: Modes) -> Value {
    let Some(b) = policy.backend(backend) else {
        return json!({ "cluster": backend });
    };
    let cluster = b
        .zones
        .first()
        .map_or(b.name.as_str(), |z| z.cluster.as_str());
    let mut action = json!({ "cluster": cluster, "timeout": format!("{}s", b.timeout.as_secs()) });
    let native_outlier = b
        .outlier
        .as_ref()
        .filter(|_| modes.outlier == OutlierMode::Native);
    match (modes.retry, &b.retry, native_outlier) {
        (RetryMode::Native, Some(r), o) => {
            action["retry_policy"] =
                retry::native_retry_policy(r, o.map(|o| o.first_token_timeout));
        }
        (_, _, Some(o)) => action["retry_policy"] = outlier::native_retry_policy(o),
        (RetryMode::Sluice, Some(r), None) => action["retry_policy"] = retry::route_policy(r),
        _ => {}
    }
    if modes.failover == FailoverMode::Native && policy.failover.is_some() && b.outlier.is_some() {
        match action.get_mut("retry_policy") {
            Some(retry) => failover::spread_over_zones(retry),
            None => action["retry_policy"] = failover::native_retry_policy(),
        }
    }
    action
}

fn regex_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// The backends whose zones a cluster serves, in policy order.
type ClusterBackends<'p> = Vec<(&'p Backend, &'p sluice_core::config::Zone)>;

/// One cluster per cluster name; each zone becomes a locality. A cluster
/// runs `attempt_filter` as an upstream HTTP filter (once per attempt; same
/// `vm_id` as the listener's, so one shared state) when `every_cluster`, or
/// when sluice picks its endpoints. With `zone_order` (native failover), the
/// clusters of backends with `[outlier]` on get their localities as
/// priorities in that order, health checks and Envoy's outlier detection.
fn clusters(
    policy: &Policy,
    modes: Modes,
    attempt_filter: &Value,
    every_cluster: bool,
    zone_order: Option<&[String]>,
) -> anyhow::Result<Vec<Value>> {
    let mut by_name: BTreeMap<&str, ClusterBackends<'_>> = BTreeMap::new();
    for b in &policy.backends {
        for z in &b.zones {
            by_name.entry(z.cluster.as_str()).or_default().push((b, z));
        }
    }
    by_name
        .into_iter()
        .map(|(name, members)| {
            let outlier = cluster_outlier(name, &members);
            let retry = cluster_retry(name, &members);
            // Native failover covers the clusters of backends it applies to.
            let failover_order = zone_order.filter(|_| outlier.is_some());
            let priorities = failover_order.map(|order| {
                let zones: Vec<&str> = members.iter().map(|(_, z)| z.name.as_str()).collect();
                failover::priorities(&zones, order)
            });
            let mut all_ips = true;
            let mut localities = Vec::new();
            for (i, (_, z)) in members.iter().enumerate() {
                let priority = priorities.as_ref().map(|p| p[i].1);
                if priority == Some(None) {
                    eprintln!("warning: --native-failover: zone `{}` of cluster `{name}` is outside the local region and [failover] cross_region is false: left out of the cluster", z.name);
                    continue;
                }
                if z.endpoints.is_empty() {
                    eprintln!("warning: zone `{}` of cluster `{name}` has no endpoints: the cluster is rendered empty (pass --endpoints)", z.name);
                }
                let mut lb_endpoints = Vec::new();
                for ep in &z.endpoints {
                    let (host, _) = split_host_port(ep)?;
                    all_ips &= host.parse::<IpAddr>().is_ok();
                    lb_endpoints.push(json!({ "endpoint": { "address": socket_address(ep)? } }));
                }
                let mut locality = json!({
                    "locality": { "region": z.region, "zone": z.name },
                    "lb_endpoints": lb_endpoints,
                });
                if let Some(Some(p)) = priority {
                    locality["priority"] = json!(p);
                }
                localities.push(locality);
            }
            let mut cluster = json!({
                "name": name,
                "type": if all_ips { "STATIC" } else { "STRICT_DNS" },
                "connect_timeout": "5s",
                "lb_policy": "ROUND_ROBIN",
                "load_assignment": { "cluster_name": name, "endpoints": localities },
            });
            if failover_order.is_some() {
                cluster["lb_policy"] = json!("LEAST_REQUEST");
                cluster["load_assignment"]["policy"] =
                    json!({ "overprovisioning_factor": failover::OVERPROVISIONING_FACTOR });
                cluster["outlier_detection"] = failover::native_outlier_detection();
                cluster["health_checks"] = failover::health_checks();
                cluster["common_lb_config"] = failover::common_lb_config();
                // Retries move across zones, under the same limit as the
                // other renders' (Envoy's default is 3 in flight).
                cluster["circuit_breakers"] = outlier::retry_circuit_breaker();
            }
            let mut with_attempts = every_cluster;
            match (modes.outlier, outlier) {
                (OutlierMode::Sluice, Some(_)) => {
                    if !all_ips {
                        eprintln!("warning: cluster `{name}` has host names: sluice names endpoints by address for `override_host`, so its requests fall back to least request");
                    }
                    // `load_balancing_policy` replaces `lb_policy`.
                    if let Some(c) = cluster.as_object_mut() {
                        c.remove("lb_policy");
                    }
                    cluster["load_balancing_policy"] = outlier::override_host_policy();
                    cluster["circuit_breakers"] = outlier::retry_circuit_breaker();
                    with_attempts = true;
                }
                (OutlierMode::Native, Some(o)) => {
                    cluster["lb_policy"] = json!("LEAST_REQUEST");
                    cluster["outlier_detection"] = outlier::native_outlier_detection(o);
                    // Side by side, both retry under the same limit.
                    cluster["circuit_breakers"] = outlier::retry_circuit_breaker();
                }
                _ => {}
            }
            match (modes.retry, retry) {
                // Retries across requests are the budget's to bound, not
                // Envoy's default of 3 in flight per cluster.
                (RetryMode::Sluice, Some(_)) => {
                    cluster["circuit_breakers"] = outlier::retry_circuit_breaker();
                }
                // Envoy's own budget, which replaces its `max_retries`.
                (RetryMode::Native, Some(r)) => {
                    cluster["circuit_breakers"] = retry::native_circuit_breaker(r);
                }
                _ => {}
            }
            if with_attempts {
                cluster["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http_protocol_options": {} },
                        "http_filters": [
                            attempt_filter,
                            {
                                "name": "envoy.filters.http.upstream_codec",
                                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec" }
                            }
                        ],
                    }
                });
            }
            Ok(cluster)
        })
        .collect()
}

/// The `[outlier]` settings of a cluster: those of the first backend (in
/// policy order) that enables the section for one of its zones. Envoy has
/// one setting per cluster; backends sharing a cluster with different
/// settings are warned about.
fn cluster_outlier<'p>(name: &str, members: &ClusterBackends<'p>) -> Option<&'p OutlierConfig> {
    let mut configs = members.iter().filter_map(|(b, _)| b.outlier.as_ref());
    let first = configs.next()?;
    if configs.any(|other| other != first) {
        eprintln!(
            "warning: backends sharing cluster `{name}` set [outlier] differently: the cluster follows the first of them"
        );
    }
    Some(first)
}

/// The `[retry]` settings of a cluster, chosen like [`cluster_outlier`]'s.
fn cluster_retry<'p>(name: &str, members: &ClusterBackends<'p>) -> Option<&'p RetryConfig> {
    let mut configs = members.iter().filter_map(|(b, _)| b.retry.as_ref());
    let first = configs.next()?;
    if configs.any(|other| other != first) {
        eprintln!(
            "warning: backends sharing cluster `{name}` set [retry] differently: the cluster's retry budget follows the first of them"
        );
    }
    Some(first)
}

/// Envoy's gzip compressor, for responses, placed before sluice.wasm.
///
/// sluice reads a response's usage to settle what it reserved, which it
/// cannot do in a compressed answer, so it asks the upstream for none on
/// the requests it meters. Responses pass the filters in reverse order:
/// sluice reads the plain answer from the upstream, then this filter
/// compresses it for a client that sent `accept-encoding: gzip`, streams
/// included (it flushes every data frame). `remove_accept_encoding_header`
/// makes the upstream answer plain for every path, not only the metered
/// ones, since compressing is this filter's job here.
fn compressor_filter() -> Value {
    json!({
        "name": "envoy.filters.http.compressor",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
            "response_direction_config": {
                "common_config": {
                    "content_type": ["application/json", "text/event-stream", "text/plain"],
                },
                "remove_accept_encoding_header": true,
            },
            "compressor_library": {
                "name": "gzip",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip",
                },
            },
        }
    })
}

/// The `sluice.wasm` filter, configured with the policy text so the filter
/// validates exactly what `sluice validate` did.
fn wasm_filter(wasm_dir: &Path, policy_text: &str, failure_policy: &str) -> Value {
    let filename = wasm_dir.join(format!("{MODULE}.wasm"));
    json!({
        "name": MODULE,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": MODULE,
                "root_id": MODULE,
                "failure_policy": failure_policy,
                // Filters hold a request's headers while they read its body
                // (what a request costs, which model it names). Without this
                // (Envoy >= 1.35) a paused header phase is turned into
                // StopAllIteration and the body callbacks never run.
                "allow_on_headers_stop_iteration": true,
                "vm_config": {
                    "vm_id": MODULE,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": filename.display().to_string() } },
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": policy_text,
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `primary` (four endpoints, `[outlier]` on) and `small` (its own
    /// cluster, `[outlier]` off for it).
    const WITH_OUTLIER: &str = r#"
[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]

[[backend]]
name = "small"
models = ["small"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:5"]
  [backend.outlier]
  enabled = false

[outlier]
consecutive_errors = 3
interval = "5s"
"#;

    fn args(native_outlier: bool, native_retry: bool) -> EnvoyArgs {
        EnvoyArgs {
            policy: PathBuf::from("p.toml"),
            wasm_dir: PathBuf::from("/wasm"),
            listen: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
            endpoints: Vec::new(),
            failure_policy: "FAIL_RELOAD".into(),
            attempt_filter: false,
            native_outlier,
            native_retry,
            node_zone: None,
            native_failover: false,
            output: None,
        }
    }

    /// The bootstrap of `text` as `envoy` renders it, in `mode` (sluice's
    /// `[retry]`).
    fn render(text: &str, mode: OutlierMode) -> Value {
        render_in(
            text,
            Modes {
                outlier: mode,
                retry: RetryMode::Sluice,
                failover: FailoverMode::Sluice,
            },
        )
    }

    /// The bootstrap of `text` as `envoy` renders it, in `modes`.
    fn render_in(text: &str, modes: Modes) -> Value {
        render_at(text, modes, None)
    }

    /// [`render_in`] for an Envoy in `node_zone` (`--node-zone`).
    fn render_at(text: &str, modes: Modes, node_zone: Option<&str>) -> Value {
        let policy = sluice_policy::parse_toml("p.toml", text).unwrap();
        let native_outlier = modes.outlier == OutlierMode::Native;
        let native_retry = modes.retry == RetryMode::Native;
        let native_failover = modes.failover == FailoverMode::Native;
        let edits = Edits {
            endpoints: &[],
            drop_outlier: (native_outlier || native_failover)
                && Capability::Outlier.is_enabled_in(&policy),
            drop_retry: native_retry && Capability::Retry.is_enabled_in(&policy),
            drop_failover: native_failover,
        };
        let (filter_policy, filter_text) =
            filter_policy_text(&policy, text, Path::new("p.toml"), edits)
                .unwrap()
                .unwrap();
        let mut args = args(native_outlier, native_retry);
        args.native_failover = native_failover;
        args.node_zone = node_zone.map(str::to_string);
        bootstrap(&policy, &filter_policy, &filter_text, &args, modes).unwrap()
    }

    fn cluster<'v>(b: &'v Value, name: &str) -> &'v Value {
        b["static_resources"]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
    }

    fn upstream_filters(cluster: &Value) -> Option<Vec<&str>> {
        let options = cluster.get("typed_extension_protocol_options")?;
        Some(
            options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect(),
        )
    }

    fn route<'v>(b: &'v Value, name: &str) -> &'v Value {
        b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
    }

    fn filter_text(b: &Value) -> &str {
        b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap()
    }

    #[test]
    fn sluice_picks_the_endpoints_of_outlier_backends() {
        let b = render(WITH_OUTLIER, OutlierMode::Sluice);
        let primary = cluster(&b, "primary");
        assert!(primary.get("lb_policy").is_none());
        let lb = &primary["load_balancing_policy"]["policies"][0]["typed_extension_config"];
        assert_eq!(lb["name"], "envoy.load_balancing_policies.override_host");
        assert_eq!(
            lb["typed_config"]["override_host_sources"],
            json!([{ "header": "x-gateway-destination-endpoint" }])
        );
        assert_eq!(
            lb["typed_config"]["fallback_policy"]["policies"][0]["typed_extension_config"]["name"],
            "envoy.load_balancing_policies.least_request"
        );
        assert_eq!(
            upstream_filters(primary).unwrap(),
            [ATTEMPT_ROOT_ID, "envoy.filters.http.upstream_codec"]
        );
        assert!(primary.get("outlier_detection").is_none());
        // Retries in flight are not capped at Envoy's default 3.
        assert_eq!(
            primary["circuit_breakers"],
            json!({ "thresholds": [{ "priority": "DEFAULT", "max_retries": 1024 }] })
        );
        // The attempt instance gets the same policy text as the listener's.
        let attempt = &primary["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            ["http_filters"][0];
        assert_eq!(
            attempt["typed_config"]["config"]["configuration"]["value"].as_str(),
            Some(filter_text(&b))
        );
        // sluice sets the router's retries per request: no route policy.
        assert!(
            route(&b, "backend-primary")["route"]
                .get("retry_policy")
                .is_none()
        );
        // A backend that switches the section off keeps the plain cluster.
        let small = cluster(&b, "small");
        assert_eq!(small["lb_policy"], "ROUND_ROBIN");
        assert!(small.get("load_balancing_policy").is_none());
        assert!(small.get("circuit_breakers").is_none());
        assert!(upstream_filters(small).is_none());
        assert_eq!(filter_text(&b), WITH_OUTLIER);
    }

    #[test]
    fn native_outlier_renders_what_envoy_alone_would_do() {
        let b = render(WITH_OUTLIER, OutlierMode::Native);
        let primary = cluster(&b, "primary");
        assert_eq!(primary["lb_policy"], "LEAST_REQUEST");
        assert!(primary.get("load_balancing_policy").is_none());
        assert!(upstream_filters(primary).is_none());
        assert_eq!(
            primary["circuit_breakers"]["thresholds"][0]["max_retries"],
            1024
        );
        let detection = &primary["outlier_detection"];
        assert_eq!(detection["consecutive_5xx"], 3);
        assert_eq!(detection["interval"], "5s");
        assert_eq!(detection["enforcing_failure_percentage"], 100);
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(
            retry["retry_on"],
            "5xx,reset,connect-failure,retriable-status-codes"
        );
        assert_eq!(retry["retriable_status_codes"], json!([429]));
        assert_eq!(retry["num_retries"], 2);
        assert_eq!(
            retry["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        // No first-token timeout in the policy language yet: no per-try
        // timeout.
        assert!(retry.get("per_try_timeout").is_none());
        // The default route goes to primary too.
        assert_eq!(route(&b, "default")["route"]["retry_policy"], *retry);
        assert!(
            route(&b, "backend-small")["route"]
                .get("retry_policy")
                .is_none()
        );
        let small = cluster(&b, "small");
        assert_eq!(small["lb_policy"], "ROUND_ROBIN");
        assert!(small.get("outlier_detection").is_none());
        // sluice.wasm does not act on outliers.
        let given = sluice_policy::parse_toml("given.toml", filter_text(&b)).unwrap();
        assert!(given.outlier.is_none());
        assert!(given.backends.iter().all(|b| b.outlier.is_none()));
        assert!(!filter_text(&b).contains("[outlier]"));
    }

    #[test]
    fn an_outlier_section_not_enforced_changes_nothing() {
        let without = WITH_OUTLIER.split("[outlier]").next().unwrap();
        let plain = render(without, OutlierMode::Off);
        let off = render(WITH_OUTLIER, OutlierMode::Off);
        // Same bootstrap but for the policy text.
        let strip = |mut b: Value| {
            for f in b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"]["http_filters"]
                .as_array_mut()
                .unwrap()
            {
                if let Some(c) = f["typed_config"].get_mut("config") {
                    c["configuration"]["value"] = json!("");
                }
            }
            b
        };
        assert_eq!(strip(plain), strip(off));
    }

    #[test]
    fn policies_without_outlier_render_the_same_in_every_mode() {
        let without = WITH_OUTLIER.split("[outlier]").next().unwrap();
        let off = render(without, OutlierMode::Off);
        assert_eq!(render(without, OutlierMode::Sluice), off);
        assert_eq!(render(without, OutlierMode::Native), off);
        for name in ["primary", "small"] {
            let c = cluster(&off, name);
            assert_eq!(c["lb_policy"], "ROUND_ROBIN");
            assert!(c.get("load_balancing_policy").is_none());
            assert!(c.get("outlier_detection").is_none());
            assert!(upstream_filters(c).is_none());
        }
        assert_eq!(filter_text(&off), without);
    }

    #[test]
    fn a_cluster_shared_with_an_outlier_backend_follows_it() {
        let text = r#"
[[backend]]
name = "a"
models = ["a"]
  [[backend.zone]]
  name = "z"
  cluster = "pool"
  endpoints = ["127.0.0.1:1"]
  [backend.outlier]
  enabled = false

[[backend]]
name = "b"
models = ["b"]
  [[backend.zone]]
  name = "z"
  cluster = "pool"
  endpoints = ["127.0.0.1:2"]

[outlier]
"#;
        let b = render(text, OutlierMode::Sluice);
        assert!(cluster(&b, "pool").get("load_balancing_policy").is_some());
        let b = render(text, OutlierMode::Native);
        assert!(cluster(&b, "pool").get("outlier_detection").is_some());
    }

    /// `primary` (two zones of two endpoints, `[retry]` with 429 and a
    /// larger budget) and `small` (its own cluster, `[retry]` off for it).
    const WITH_RETRY: &str = r#"
[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:1", "127.0.0.1:2"]
  [[backend.zone]]
  name = "zone-b"
  endpoints = ["127.0.0.1:3", "127.0.0.1:4"]

[[backend]]
name = "small"
models = ["small"]
  [[backend.zone]]
  name = "zone-a"
  endpoints = ["127.0.0.1:5"]
  [backend.retry]
  enabled = false

[retry]
budget = "25%"
min_retries_per_second = 5
max_retries = 2
retry_on = ["gateway-error", "reset", "connect-failure", "429"]
backoff_base = "50ms"
"#;

    const NATIVE_RETRY: Modes = Modes {
        outlier: OutlierMode::Sluice,
        retry: RetryMode::Native,
        failover: FailoverMode::Sluice,
    };

    #[test]
    fn sluice_retry_keeps_the_routes_part_and_budgets_in_the_filter() {
        let b = render(WITH_RETRY, OutlierMode::Sluice);
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(retry["num_retries"], 0);
        assert_eq!(retry["retry_on"], "5xx");
        assert_eq!(
            retry["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        assert_eq!(retry["retry_back_off"]["base_interval"], "0.05s");
        assert!(retry.get("rate_limited_retry_back_off").is_some());
        let primary = cluster(&b, "primary");
        assert_eq!(
            primary["circuit_breakers"],
            json!({ "thresholds": [{ "priority": "DEFAULT", "max_retries": 1024 }] })
        );
        // Every cluster sees its attempts: deposits and charges.
        for name in ["primary", "small"] {
            assert_eq!(
                upstream_filters(cluster(&b, name)).unwrap(),
                [ATTEMPT_ROOT_ID, "envoy.filters.http.upstream_codec"]
            );
        }
        assert!(cluster(&b, "small").get("circuit_breakers").is_none());
        assert!(
            route(&b, "backend-small")["route"]
                .get("retry_policy")
                .is_none()
        );
        assert_eq!(filter_text(&b), WITH_RETRY);
    }

    #[test]
    fn native_retry_renders_what_envoy_alone_would_do() {
        let b = render_in(WITH_RETRY, NATIVE_RETRY);
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(
            retry["retry_on"],
            "gateway-error,reset,connect-failure,retriable-status-codes"
        );
        assert_eq!(retry["retriable_status_codes"], json!([429]));
        assert_eq!(retry["num_retries"], 2);
        assert_eq!(
            retry["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        assert_eq!(
            retry["retry_back_off"],
            json!({ "base_interval": "0.05s", "max_interval": "0.5s" })
        );
        assert_eq!(
            retry["rate_limited_retry_back_off"]["reset_headers"][0]["name"],
            "retry-after"
        );
        assert!(retry.get("per_try_timeout").is_none());
        assert_eq!(route(&b, "default")["route"]["retry_policy"], *retry);
        let primary = cluster(&b, "primary");
        assert_eq!(
            primary["circuit_breakers"],
            json!({ "thresholds": [{
                "priority": "DEFAULT",
                "retry_budget": {
                    "budget_percent": { "value": 25.0 },
                    "min_retry_concurrency": 5,
                },
            }]})
        );
        // Nothing left for sluice to learn from attempts.
        assert_eq!(primary["lb_policy"], "ROUND_ROBIN");
        assert!(upstream_filters(primary).is_none());
        // A backend that switches the section off gets none of it.
        let small = cluster(&b, "small");
        assert!(small.get("circuit_breakers").is_none());
        assert!(upstream_filters(small).is_none());
        assert!(
            route(&b, "backend-small")["route"]
                .get("retry_policy")
                .is_none()
        );
        // sluice.wasm does not budget retries too.
        let given = sluice_policy::parse_toml("given.toml", filter_text(&b)).unwrap();
        assert!(given.retry.is_none());
        assert!(given.backends.iter().all(|b| b.retry.is_none()));
        assert!(!filter_text(&b).contains("retry"));
    }

    #[test]
    fn native_retry_combines_with_native_outlier() {
        let text = format!(
            "{WITH_RETRY}\n[outlier]\nconsecutive_errors = 3\nfirst_token_timeout = \"2s\"\n"
        );
        let b = render_in(
            &text,
            Modes {
                outlier: OutlierMode::Native,
                retry: RetryMode::Native,
                failover: FailoverMode::Sluice,
            },
        );
        // The route retries as [retry] says, with the outlier section's
        // first-token timeout per try.
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(retry["num_retries"], 2);
        assert_eq!(
            retry["retry_on"],
            "gateway-error,reset,connect-failure,retriable-status-codes"
        );
        assert_eq!(retry["per_try_timeout"], "2s");
        assert!(retry.get("retry_back_off").is_some());
        let primary = cluster(&b, "primary");
        assert_eq!(primary["lb_policy"], "LEAST_REQUEST");
        assert_eq!(primary["outlier_detection"]["consecutive_5xx"], 3);
        assert_eq!(
            primary["circuit_breakers"]["thresholds"][0]["retry_budget"]["min_retry_concurrency"],
            5
        );
        assert!(
            primary["circuit_breakers"]["thresholds"][0]
                .get("max_retries")
                .is_none()
        );
        assert!(upstream_filters(primary).is_none());
        // `small` has [outlier] but no [retry]: native outlier's retries.
        let small_retry = &route(&b, "backend-small")["route"]["retry_policy"];
        assert_eq!(small_retry["num_retries"], 2);
        assert_eq!(small_retry["per_try_timeout"], "2s");
        assert_eq!(
            cluster(&b, "small")["circuit_breakers"]["thresholds"][0]["max_retries"],
            1024
        );
        let given = sluice_policy::parse_toml("given.toml", filter_text(&b)).unwrap();
        assert!(given.retry.is_none() && given.outlier.is_none());
        assert!(
            given
                .backends
                .iter()
                .all(|b| b.retry.is_none() && b.outlier.is_none())
        );
    }

    #[test]
    fn native_retry_with_sluices_outlier_keeps_the_endpoint_picking() {
        let text = format!("{WITH_RETRY}\n[outlier]\n");
        let b = render_in(&text, NATIVE_RETRY);
        let primary = cluster(&b, "primary");
        assert!(primary.get("load_balancing_policy").is_some());
        assert_eq!(
            upstream_filters(primary).unwrap(),
            [ATTEMPT_ROOT_ID, "envoy.filters.http.upstream_codec"]
        );
        assert!(
            primary["circuit_breakers"]["thresholds"][0]
                .get("retry_budget")
                .is_some()
        );
        assert_eq!(
            route(&b, "backend-primary")["route"]["retry_policy"]["num_retries"],
            2
        );
        let given = sluice_policy::parse_toml("given.toml", filter_text(&b)).unwrap();
        assert!(given.retry.is_none() && given.outlier.is_some());
    }

    #[test]
    fn native_retry_without_a_retry_section_changes_nothing() {
        let without = WITH_RETRY.split("[retry]").next().unwrap();
        let sluice = render(without, OutlierMode::Sluice);
        assert_eq!(render_in(without, NATIVE_RETRY), sluice);
        assert!(
            route(&sluice, "backend-primary")["route"]
                .get("retry_policy")
                .is_none()
        );
        assert!(
            cluster(&sluice, "primary")
                .get("circuit_breakers")
                .is_none()
        );
    }

    /// `primary` over three zones in two regions with `[outlier]` and
    /// `[retry]`, `small` with `[outlier]` off (so `[failover]` does not
    /// apply to it), and `[failover]` preferring zone-b after the local zone.
    const WITH_FAILOVER: &str = r#"
[[backend]]
name = "primary"
models = ["big"]
  [[backend.zone]]
  name = "zone-a"
  region = "region-1"
  endpoints = ["127.0.0.1:1", "127.0.0.1:2"]
  [[backend.zone]]
  name = "zone-c"
  region = "region-2"
  endpoints = ["127.0.0.1:5"]
  [[backend.zone]]
  name = "zone-b"
  region = "region-1"
  endpoints = ["127.0.0.1:3", "127.0.0.1:4"]

[[backend]]
name = "small"
models = ["small"]
  [[backend.zone]]
  name = "zone-a"
  region = "region-1"
  endpoints = ["127.0.0.1:6"]
  [backend.outlier]
  enabled = false

[outlier]
consecutive_errors = 3

[failover]
local_zone = "auto"
failback_after = "20s"
"#;

    const NATIVE_FAILOVER: Modes = Modes {
        outlier: OutlierMode::Off,
        retry: RetryMode::Sluice,
        failover: FailoverMode::Native,
    };

    fn localities(c: &Value) -> Vec<(String, Option<u64>)> {
        c["load_assignment"]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["locality"]["zone"].as_str().unwrap().to_string(),
                    l["priority"].as_u64(),
                )
            })
            .collect()
    }

    fn pairs(v: &[(&str, Option<u64>)]) -> Vec<(String, Option<u64>)> {
        v.iter().map(|(z, p)| (z.to_string(), *p)).collect()
    }

    #[test]
    fn native_failover_renders_priorities_health_and_retries_across_zones() {
        let b = render_at(WITH_FAILOVER, NATIVE_FAILOVER, Some("zone-b"));
        assert_eq!(
            b["node"]["locality"],
            json!({ "region": "region-1", "zone": "zone-b" })
        );
        let primary = cluster(&b, "primary");
        // The node's zone first, then its region, then the other region.
        assert_eq!(
            localities(primary),
            pairs(&[
                ("zone-a", Some(1)),
                ("zone-c", Some(2)),
                ("zone-b", Some(0))
            ])
        );
        assert_eq!(
            primary["load_assignment"]["policy"]["overprovisioning_factor"],
            140
        );
        assert_eq!(primary["lb_policy"], "LEAST_REQUEST");
        assert!(primary.get("load_balancing_policy").is_none());
        let detection = &primary["outlier_detection"];
        assert_eq!(detection["consecutive_5xx"], 5);
        assert_eq!(detection["interval"], "1s");
        assert_eq!(detection["base_ejection_time"], "30s");
        assert_eq!(detection["max_ejection_percent"], 100);
        assert_eq!(
            primary["health_checks"][0]["http_health_check"]["path"],
            "/health"
        );
        assert_eq!(primary["health_checks"][0]["interval"], "1s");
        assert_eq!(primary["common_lb_config"]["update_merge_window"], "0s");
        assert_eq!(
            primary["circuit_breakers"]["thresholds"][0]["max_retries"],
            1024
        );
        // sluice picks no endpoint: no per-attempt instance.
        assert!(upstream_filters(primary).is_none());
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(
            retry["retry_on"],
            "5xx,reset,connect-failure,retriable-status-codes"
        );
        assert_eq!(retry["retriable_status_codes"], json!([429]));
        assert_eq!(retry["num_retries"], 2);
        assert_eq!(
            retry["retry_priority"],
            json!({
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    "update_frequency": 2,
                },
            })
        );
        assert_eq!(
            retry["retry_host_predicate"][0]["name"],
            "envoy.retry_host_predicates.previous_hosts"
        );
        assert!(retry.get("per_try_timeout").is_none());
        assert_eq!(route(&b, "default")["route"]["retry_policy"], *retry);
        // `small` has [outlier] off: no failover, as with sluice.
        let small = cluster(&b, "small");
        assert_eq!(small["lb_policy"], "ROUND_ROBIN");
        assert_eq!(localities(small), pairs(&[("zone-a", None)]));
        assert!(small.get("health_checks").is_none());
        assert!(small.get("outlier_detection").is_none());
        assert!(
            route(&b, "backend-small")["route"]
                .get("retry_policy")
                .is_none()
        );
        // sluice.wasm enforces neither section.
        let given = sluice_policy::parse_toml("given.toml", filter_text(&b)).unwrap();
        assert!(given.failover.is_none() && given.outlier.is_none());
        assert!(given.backends.iter().all(|b| b.outlier.is_none()));
        assert!(!filter_text(&b).contains("[failover]"));
    }

    #[test]
    fn native_failover_follows_the_policys_order_without_a_node_zone() {
        let text = WITH_FAILOVER.replace(
            r#"local_zone = "auto""#,
            r#"local_zone = "zone-c"
order = ["zone-b"]"#,
        );
        let b = render_at(&text, NATIVE_FAILOVER, None);
        assert!(b["node"].get("locality").is_none());
        assert_eq!(
            localities(cluster(&b, "primary")),
            pairs(&[
                ("zone-a", Some(2)),
                ("zone-c", Some(0)),
                ("zone-b", Some(1))
            ])
        );
        // Staying in the region: the other region's zone is left out.
        let text = WITH_FAILOVER.replace(
            r#"local_zone = "auto""#,
            "local_zone = \"auto\"\ncross_region = false",
        );
        let b = render_at(&text, NATIVE_FAILOVER, Some("zone-a"));
        assert_eq!(
            localities(cluster(&b, "primary")),
            pairs(&[("zone-a", Some(0)), ("zone-b", Some(1))])
        );
    }

    #[test]
    fn native_failover_spreads_the_retry_sections_policy_over_the_zones() {
        let text =
            format!("{WITH_FAILOVER}\n[retry]\nmax_retries = 1\nretry_on = [\"gateway-error\"]\n");
        // sluice's [retry]: its route part, with the retry priority.
        let b = render_at(&text, NATIVE_FAILOVER, Some("zone-a"));
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(retry["num_retries"], 0);
        assert_eq!(
            retry["retry_priority"]["name"],
            "envoy.retry_priorities.previous_priorities"
        );
        // Envoy's [retry] (--native-retry): its conditions, with the priority.
        let b = render_at(
            &text,
            Modes {
                retry: RetryMode::Native,
                ..NATIVE_FAILOVER
            },
            Some("zone-a"),
        );
        let retry = &route(&b, "backend-primary")["route"]["retry_policy"];
        assert_eq!(retry["num_retries"], 1);
        assert_eq!(retry["retry_on"], "gateway-error");
        assert_eq!(
            retry["retry_priority"]["typed_config"]["update_frequency"],
            2
        );
    }

    #[test]
    fn the_node_zone_sets_the_locality_and_nothing_else() {
        let plain = render(WITH_FAILOVER, OutlierMode::Sluice);
        let mut located = render_at(
            WITH_FAILOVER,
            Modes {
                outlier: OutlierMode::Sluice,
                retry: RetryMode::Sluice,
                failover: FailoverMode::Sluice,
            },
            Some("zone-c"),
        );
        assert_eq!(
            located["node"]["locality"],
            json!({ "region": "region-2", "zone": "zone-c" })
        );
        located["node"].as_object_mut().unwrap().remove("locality");
        assert_eq!(located, plain);
        // The filter keeps [failover] and [outlier]; no priorities.
        assert!(filter_text(&plain).contains("[failover]"));
        assert!(
            localities(cluster(&plain, "primary"))
                .iter()
                .all(|(_, p)| p.is_none())
        );
    }

    #[test]
    fn an_unknown_node_zone_is_an_error() {
        let policy = sluice_policy::parse_toml("p.toml", WITH_FAILOVER).unwrap();
        let mut args = args(false, false);
        args.node_zone = Some("zone-q".into());
        let modes = Modes {
            outlier: OutlierMode::Sluice,
            retry: RetryMode::Sluice,
            failover: FailoverMode::Sluice,
        };
        let err = bootstrap(&policy, &policy, WITH_FAILOVER, &args, modes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--node-zone `zone-q`"), "{err}");
    }
}
