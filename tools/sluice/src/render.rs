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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sluice_core::config::Policy;
use sluice_policy::{ATTEMPT_ROOT_ID, Capability, MODULE};

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
    /// each attempt (retries included). Added anyway when an enforced
    /// section learns from attempts.
    #[arg(long)]
    attempt_filter: bool,
    /// Write to this file instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn envoy(args: &EnvoyArgs) -> anyhow::Result<ExitCode> {
    let (parsed, text) = crate::load(&args.policy)?;
    let mut policy = match parsed {
        Ok(p) => p,
        Err(d) => {
            crate::report(&d);
            return Ok(ExitCode::from(1));
        }
    };
    for spec in &args.endpoints {
        override_endpoints(&mut policy, spec)?;
    }
    let not_enforced: Vec<Capability> = Capability::ALL
        .into_iter()
        .filter(|c| c.is_enabled_in(&policy) && !c.is_enforced())
        .collect();
    for cap in &not_enforced {
        eprintln!(
            "warning: [{}] is NOT ENFORCED YET: sluice.wasm does not implement it, so the rendered Envoy does not apply it",
            cap.section()
        );
    }
    let bootstrap = bootstrap(&policy, &text, args)?;
    let mut out = format!(
        "# Envoy bootstrap rendered by `sluice render envoy` from {}.\n",
        args.policy.display()
    );
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

/// Applies one `--endpoints BACKEND/ZONE=ADDRS` override.
fn override_endpoints(policy: &mut Policy, spec: &str) -> anyhow::Result<()> {
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
    Ok(())
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

fn bootstrap(policy: &Policy, policy_text: &str, args: &EnvoyArgs) -> anyhow::Result<Value> {
    let per_attempt = args.attempt_filter
        || Capability::ALL
            .into_iter()
            .any(|c| c.learns_from_attempts() && c.is_enforced() && c.is_enabled_in(policy));
    let attempt_filter = per_attempt.then(|| {
        let mut filter = wasm_filter(&args.wasm_dir, policy_text, &args.failure_policy);
        filter["name"] = json!(ATTEMPT_ROOT_ID);
        filter["typed_config"]["config"]["root_id"] = json!(ATTEMPT_ROOT_ID);
        filter
    });
    let mut http_filters = vec![
        compressor_filter(),
        wasm_filter(&args.wasm_dir, policy_text, &args.failure_policy),
    ];
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));

    Ok(json!({
        "node": { "id": "sluice", "cluster": "sluice",
                  "metadata": { "sluice_policy": policy.name.clone().unwrap_or_default() } },
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
                            "name": "llm", "domains": ["*"], "routes": routes(policy),
                        }]},
                        "http_filters": http_filters,
                    }
                }]}],
            }],
            "clusters": clusters(policy, attempt_filter.as_ref())?,
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
fn routes(policy: &Policy) -> Vec<Value> {
    let mut routes = Vec::new();
    for b in &policy.backends {
        routes.push(json!({
            "name": format!("backend-{}", b.name),
            "match": { "prefix": "/", "headers": [{ "name": BACKEND_HEADER, "string_match": { "exact": b.name } }] },
            "route": route_action(policy, &b.name),
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
            routes.push(json!({ "name": format!("route-{i}"), "match": m, "route": route_action(policy, &r.backend) }));
        }
    }
    routes.push(json!({ "name": "default", "match": { "prefix": "/" }, "route": route_action(policy, &policy.default_backend) }));
    routes
}

fn route_action(policy: &Policy, backend: &str) -> Value {
    let Some(b) = policy.backend(backend) else {
        return json!({ "cluster": backend });
    };
    let cluster = b
        .zones
        .first()
        .map_or(b.name.as_str(), |z| z.cluster.as_str());
    json!({ "cluster": cluster, "timeout": format!("{}s", b.timeout.as_secs()) })
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

/// One cluster per cluster name; each zone becomes a locality. With
/// `attempt_filter`, the cluster runs it as an upstream HTTP filter (once
/// per attempt; same `vm_id` as the listener's, so one shared state).
fn clusters(policy: &Policy, attempt_filter: Option<&Value>) -> anyhow::Result<Vec<Value>> {
    let mut by_name: BTreeMap<&str, Vec<&sluice_core::config::Zone>> = BTreeMap::new();
    for b in &policy.backends {
        for z in &b.zones {
            by_name.entry(z.cluster.as_str()).or_default().push(z);
        }
    }
    by_name
        .into_iter()
        .map(|(name, zones)| {
            let mut all_ips = true;
            let mut localities = Vec::new();
            for z in &zones {
                if z.endpoints.is_empty() {
                    eprintln!("warning: zone `{}` of cluster `{name}` has no endpoints: the cluster is rendered empty (pass --endpoints)", z.name);
                }
                let mut lb_endpoints = Vec::new();
                for ep in &z.endpoints {
                    let (host, _) = split_host_port(ep)?;
                    all_ips &= host.parse::<IpAddr>().is_ok();
                    lb_endpoints.push(json!({ "endpoint": { "address": socket_address(ep)? } }));
                }
                localities.push(json!({
                    "locality": { "region": z.region, "zone": z.name },
                    "lb_endpoints": lb_endpoints,
                }));
            }
            let mut cluster = json!({
                "name": name,
                "type": if all_ips { "STATIC" } else { "STRICT_DNS" },
                "connect_timeout": "5s",
                "lb_policy": "ROUND_ROBIN",
                "load_assignment": { "cluster_name": name, "endpoints": localities },
            });
            if let Some(filter) = attempt_filter {
                cluster["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http_protocol_options": {} },
                        "http_filters": [
                            filter,
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
