//! `sluice render istio`: the Istio resources that put `sluice.wasm` in
//! front of a policy's backends.
//!
//! Why an `EnvoyFilter` and not a `WasmPlugin`: sluice pauses a request's
//! headers while it reads the body (the model, the prompt's cost), which
//! Envoy ≥ 1.35 allows only with the filter option
//! `allow_on_headers_stop_iteration`; without it the body callbacks never
//! run. A `WasmPlugin` cannot set that option, nor add the upstream filter
//! that watches each attempt, nor the cluster's `override_host` load
//! balancing policy, and an `EnvoyFilter` can only ADD extension
//! configurations, not patch the one a `WasmPlugin` generates. So the one
//! `EnvoyFilter` rendered here does all of it:
//!
//! - two extension configurations (ECDS): `sluice` and `sluice.attempt`,
//!   each the Wasm filter with a remote code source (the image or URL and
//!   its `sha256`), which the Istio agent fetches and hands to Envoy as a
//!   local file, as it does for a `WasmPlugin`;
//! - the HTTP filter on the outbound listener of each LLM port, before the
//!   router, taking its configuration from ECDS;
//! - a cluster patch per backend port whose endpoints sluice picks:
//!   `override_host` and the attempt filter.
//!
//! Beside it, a `ServiceEntry` and a `DestinationRule` per policy cluster
//! name the backends' endpoints with their localities (`region/zone`), so
//! the mesh knows the topology sluice routes across. `istio/README.md`
//! explains each choice.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_core::config::Policy;
use sluice_policy::{ATTEMPT_ROOT_ID, Capability, MODULE};

use super::outlier::{MAX_RETRIES_IN_FLIGHT, override_host_policy};
use super::policy_text::Edits;
use super::{filter_policy_text, load_with_endpoints, split_host_port};

const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(clap::Args)]
pub struct IstioArgs {
    /// The policy file (TOML or JSON).
    policy: PathBuf,
    /// The module as an OCI image (`oci://REGISTRY/REPO:TAG`, from
    /// `sluice package` and a push), fetched by the Istio agent.
    #[arg(long, value_name = "oci://REF", required_unless_present = "url")]
    image: Option<String>,
    /// The module at an `http://` or `https://` URL.
    #[arg(long, conflicts_with = "image")]
    url: Option<String>,
    /// The digest the agent checks (64 hex digits, `sha256:` allowed): for
    /// --url the module's SHA-256, for --image the image manifest's digest
    /// (Istio compares an OCI image's manifest digest; `sluice package`
    /// prints it as `wasm-manifest`). Required with --url.
    #[arg(long)]
    sha256: Option<String>,
    /// With --url: compute --sha256 from this module file.
    #[arg(long, value_name = "FILE", conflicts_with = "sha256")]
    wasm: Option<PathBuf>,
    /// The namespace of the resources (the root namespace, `istio-system`,
    /// applies the EnvoyFilter to every workload it selects in the mesh).
    #[arg(long, default_value = "istio-system")]
    namespace: String,
    /// The workloads whose sidecars get sluice: `KEY=VALUE` labels (all
    /// must match). Without it or --target-ref, every workload of the
    /// namespace.
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selector: Vec<String>,
    /// Or the workloads as policy attachment: `KIND/NAME` (for example
    /// `Service/chat-frontend` or `Gateway/llm-gateway`; group inferred).
    #[arg(
        long = "target-ref",
        value_name = "KIND/NAME",
        conflicts_with = "selector"
    )]
    target_ref: Vec<String>,
    /// The host suffix of the backends' ServiceEntries: a policy cluster
    /// `C` is the mesh host `C.SUFFIX`.
    #[arg(long, default_value = "llm.sluice.internal")]
    host_suffix: String,
    /// Replace a zone's endpoints: `BACKEND/ZONE=HOST:PORT[,HOST:PORT...]`.
    #[arg(long = "endpoints", value_name = "BACKEND/ZONE=ADDRS")]
    endpoints: Vec<String>,
    /// What Envoy does when sluice's VM traps (see `render envoy`):
    /// FAIL_RELOAD starts a new VM on the next request.
    #[arg(long, default_value = "FAIL_RELOAD", value_parser = ["FAIL_OPEN", "FAIL_CLOSED", "FAIL_RELOAD"])]
    failure_policy: String,
    /// How the policy reaches the module: `toml`, the file's text as
    /// written (comments kept, errors located by line), or `json`, the
    /// policy as structured JSON with units as strings and every number a
    /// double, as Istio turns a `pluginConfig` into a string.
    #[arg(long, default_value = "toml", value_parser = ["toml", "json"])]
    config_format: String,
    /// Write to this file instead of standard output.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn istio(args: &IstioArgs) -> anyhow::Result<ExitCode> {
    let Some((policy, text, overrides)) = load_with_endpoints(&args.policy, &args.endpoints)?
    else {
        return Ok(ExitCode::from(1));
    };
    let (policy, filter_text) = match filter_policy_text(
        &policy,
        &text,
        &args.policy,
        Edits {
            endpoints: &overrides,
            drop_outlier: false,
            drop_retry: false,
            drop_failover: false,
        },
    )? {
        Ok(rendered) => rendered,
        Err(d) => {
            crate::report(&d);
            return Ok(ExitCode::from(1));
        }
    };
    let config = match args.config_format.as_str() {
        "json" => struct_json(&filter_text, crate::format_of(&args.policy))?,
        _ => filter_text,
    };
    let module = Module::from_args(args)?;
    let target = Target::from_args(args)?;
    let name = format!(
        "sluice-{}",
        dns_label(policy.name.as_deref().unwrap_or("policy"))
    );
    let mut docs = vec![envoy_filter(
        &policy, &name, &module, &target, &config, args,
    )?];
    for cluster in clusters(&policy, &args.host_suffix)? {
        docs.push(cluster.service_entry(&args.namespace));
        docs.push(cluster.destination_rule(&args.namespace));
    }
    let mut out = format!(
        "# Istio resources rendered by `sluice render istio` from {}.\n# Apply with `kubectl apply -f`; see istio/README.md.\n",
        args.policy.display()
    );
    for doc in &docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).context("cannot print YAML")?);
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))?
        }
        None => print!("{out}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the module comes from.
struct Module {
    uri: String,
    sha256: Option<String>,
}

impl Module {
    fn from_args(args: &IstioArgs) -> anyhow::Result<Module> {
        let uri = match (&args.image, &args.url) {
            (Some(image), None) => {
                if !image.starts_with("oci://") || image.len() <= "oci://".len() {
                    bail!("--image `{image}`: expected oci://REGISTRY/REPOSITORY:TAG");
                }
                image.clone()
            }
            (None, Some(url)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("--url `{url}`: expected an http:// or https:// URL");
                }
                url.clone()
            }
            _ => bail!("give the module as --image oci://REF or --url URL"),
        };
        if args.image.is_some() && args.wasm.is_some() {
            bail!(
                "--wasm computes a module's digest, for --url; an oci:// image is checked by its manifest digest: give --sha256 (`sluice package` prints it as wasm-manifest)"
            );
        }
        let sha256 = match (&args.sha256, &args.wasm) {
            (Some(hex), _) => {
                let hex = hex.trim().to_ascii_lowercase();
                let hex = hex.strip_prefix("sha256:").unwrap_or(&hex).to_string();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    bail!("--sha256 `{hex}`: expected 64 hex digits (the module's SHA-256)");
                }
                Some(hex)
            }
            (None, Some(path)) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if !bytes.starts_with(b"\0asm") {
                    bail!("{} is not a WebAssembly module", path.display());
                }
                Some(hex(&Sha256::digest(&bytes)))
            }
            (None, None) => None,
        };
        if sha256.is_none() && args.url.is_some() {
            bail!(
                "--url needs the module's digest: --sha256 HEX or --wasm FILE (Envoy refuses a remote module without one)"
            );
        }
        Ok(Module { uri, sha256 })
    }

    /// Envoy's remote code source. The agent downloads it (an OCI image
    /// or a URL) and rewrites it to a local file before Envoy sees it.
    fn code(&self) -> Value {
        let mut remote = json!({ "http_uri": { "uri": self.uri, "timeout": "30s" } });
        if let Some(sha) = &self.sha256 {
            remote["sha256"] = json!(sha);
        }
        json!({ "remote": remote })
    }
}

/// Which workloads' sidecars the EnvoyFilter applies to.
enum Target {
    All,
    Labels(BTreeMap<String, String>),
    Refs(Vec<(String, String)>),
}

impl Target {
    fn from_args(args: &IstioArgs) -> anyhow::Result<Target> {
        if !args.selector.is_empty() {
            let mut labels = BTreeMap::new();
            for s in &args.selector {
                let Some((k, v)) = s.split_once('=') else {
                    bail!("--selector `{s}`: expected KEY=VALUE");
                };
                if k.is_empty() {
                    bail!("--selector `{s}`: the label key is empty");
                }
                labels.insert(k.to_string(), v.to_string());
            }
            return Ok(Target::Labels(labels));
        }
        if !args.target_ref.is_empty() {
            let refs = args
                .target_ref
                .iter()
                .map(|r| match r.split_once('/') {
                    Some((kind, name)) if !kind.is_empty() && !name.is_empty() => {
                        Ok((kind.to_string(), name.to_string()))
                    }
                    _ => bail!("--target-ref `{r}`: expected KIND/NAME, e.g. Service/chat"),
                })
                .collect::<anyhow::Result<_>>()?;
            return Ok(Target::Refs(refs));
        }
        Ok(Target::All)
    }

    fn apply(&self, spec: &mut Value) {
        match self {
            Target::All => {}
            Target::Labels(labels) => spec["workloadSelector"] = json!({ "labels": labels }),
            Target::Refs(refs) => {
                spec["targetRefs"] = refs
                    .iter()
                    .map(|(kind, name)| {
                        let group = match kind.as_str() {
                            "Gateway" => "gateway.networking.k8s.io",
                            _ => "",
                        };
                        json!({ "group": group, "kind": kind, "name": name })
                    })
                    .collect()
            }
        }
    }
}

/// A policy cluster as the mesh sees it: one host, its endpoints by zone.
struct MeshCluster {
    name: String,
    host: String,
    port: u16,
    /// (host, port, region, zone) of each endpoint.
    endpoints: Vec<(String, u16, String, String)>,
    /// Whether sluice picks its endpoints (`[outlier]` on a backend of it).
    picked: bool,
    /// Whether any backend of it has `[failover]` (sluice moves traffic
    /// across zones; the mesh's own locality failover stays off).
    failover: bool,
    tls: bool,
}

const PORT_NAME: &str = "http-llm";

impl MeshCluster {
    fn resource_name(&self) -> String {
        format!("sluice-{}", dns_label(&self.name))
    }

    fn service_entry(&self, namespace: &str) -> Value {
        let all_ips = self
            .endpoints
            .iter()
            .all(|(h, ..)| h.parse::<IpAddr>().is_ok());
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|(host, port, region, zone)| {
                json!({
                    "address": host,
                    "ports": { PORT_NAME: port },
                    "locality": format!("{region}/{zone}"),
                    "labels": { "sluice.io/zone": dns_label(zone) },
                })
            })
            .collect();
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": { "name": self.resource_name(), "namespace": namespace },
            "spec": {
                "hosts": [self.host],
                "location": "MESH_EXTERNAL",
                "resolution": if all_ips { "STATIC" } else { "DNS" },
                "ports": [{ "number": self.port, "name": PORT_NAME, "protocol": "HTTP" }],
                "endpoints": endpoints,
            }
        })
    }

    fn destination_rule(&self, namespace: &str) -> Value {
        let mut load_balancer = json!({ "simple": "LEAST_REQUEST" });
        if self.failover || self.picked {
            // sluice moves traffic across zones; the mesh's locality
            // failover would move it again, on its own signals. And Envoy
            // refuses a cluster whose `override_host` policy comes with
            // the locality-weighted settings Istio may add.
            load_balancer["localityLbSetting"] = json!({ "enabled": false });
        }
        let mut policy = json!({
            "loadBalancer": load_balancer,
            // Retries sluice asks for are bounded by its budget, not by
            // the mesh's 3 in flight per cluster.
            "connectionPool": { "http": { "maxRetries": MAX_RETRIES_IN_FLIGHT } },
        });
        if self.tls {
            policy["tls"] = json!({ "mode": "SIMPLE" });
        }
        json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": { "name": self.resource_name(), "namespace": namespace },
            "spec": { "host": self.host, "trafficPolicy": policy }
        })
    }
}

fn clusters(policy: &Policy, suffix: &str) -> anyhow::Result<Vec<MeshCluster>> {
    let mut by_name: BTreeMap<&str, MeshCluster> = BTreeMap::new();
    for b in &policy.backends {
        for z in &b.zones {
            let c = by_name.entry(&z.cluster).or_insert_with(|| MeshCluster {
                name: z.cluster.clone(),
                host: format!("{}.{suffix}", dns_label(&z.cluster)),
                port: 0,
                endpoints: Vec::new(),
                picked: false,
                failover: false,
                tls: false,
            });
            c.picked |= b.outlier.is_some() && Capability::Outlier.is_enforced();
            c.failover |= b.failover.is_some();
            for ep in &z.endpoints {
                let (host, port) = split_host_port(ep)?;
                if c.port == 0 {
                    c.port = port;
                }
                c.tls |= port == 443;
                c.endpoints
                    .push((host, port, z.region.clone(), z.name.clone()));
            }
        }
    }
    let mut out = Vec::new();
    for (name, c) in by_name {
        if c.endpoints.is_empty() {
            eprintln!(
                "warning: cluster `{name}` lists no endpoints: no ServiceEntry is rendered for it (pass --endpoints, or define its service in the mesh as `{}`)",
                c.host
            );
            continue;
        }
        out.push(c);
    }
    Ok(out)
}

/// The one EnvoyFilter: two ECDS filters, the listener insertion per port,
/// the cluster patches.
fn envoy_filter(
    policy: &Policy,
    name: &str,
    module: &Module,
    target: &Target,
    config: &str,
    args: &IstioArgs,
) -> anyhow::Result<Value> {
    let wasm = |root_id: &str| {
        json!({
            "name": root_id,
            "typed_config": {
                "@type": WASM_TYPE,
                "config": {
                    "name": root_id,
                    "root_id": root_id,
                    "failure_policy": args.failure_policy,
                    // See the module doc: why a WasmPlugin cannot carry sluice.
                    "allow_on_headers_stop_iteration": true,
                    "vm_config": {
                        "vm_id": MODULE,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": module.code(),
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": config,
                    },
                }
            }
        })
    };
    let discovery = |filter: &str| {
        json!({
            "name": filter,
            "config_discovery": {
                // No request passes before the module is there: a sidecar
                // without sluice would be an unprotected one.
                "config_source": { "ads": {}, "initial_fetch_timeout": "0s" },
                "type_urls": [WASM_TYPE],
            }
        })
    };
    let mut patches = vec![json!({
        "applyTo": "EXTENSION_CONFIG",
        "patch": { "operation": "ADD", "value": wasm(MODULE) },
    })];
    let clusters = clusters(policy, &args.host_suffix)?;
    // Sections that learn from attempts on every cluster ([retry]), and
    // [outlier] on the clusters whose endpoints it picks.
    let every_cluster = Capability::ALL.into_iter().any(|c| {
        c != Capability::Outlier
            && c.learns_from_attempts()
            && c.is_enforced()
            && c.is_enabled_in(policy)
    });
    let attempts: Vec<&MeshCluster> = clusters
        .iter()
        .filter(|c| every_cluster || c.picked)
        .collect();
    if !attempts.is_empty() {
        patches.push(json!({
            "applyTo": "EXTENSION_CONFIG",
            "patch": { "operation": "ADD", "value": wasm(ATTEMPT_ROOT_ID) },
        }));
    }
    let ports: BTreeSet<u16> = clusters.iter().map(|c| c.port).collect();
    if ports.is_empty() {
        bail!(
            "the policy lists no endpoints, so there is no LLM port to put sluice on: pass --endpoints BACKEND/ZONE=ADDRS"
        );
    }
    for port in &ports {
        patches.push(json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "SIDECAR_OUTBOUND",
                "listener": {
                    "portNumber": port,
                    "filterChain": { "filter": {
                        "name": "envoy.filters.network.http_connection_manager",
                        "subFilter": { "name": "envoy.filters.http.router" },
                    }},
                },
            },
            "patch": { "operation": "INSERT_BEFORE", "value": discovery(MODULE) },
        }));
    }
    for c in attempts {
        let mut value = json!({
            "typed_extension_protocol_options": { PROTOCOL_OPTIONS: {
                "@type": format!("type.googleapis.com/{PROTOCOL_OPTIONS}"),
                // The whole options message: a MERGE replaces the mesh's.
                "explicit_http_config": { "http_protocol_options": {} },
                "http_filters": [
                    discovery(ATTEMPT_ROOT_ID),
                    {
                        "name": "envoy.filters.http.upstream_codec",
                        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec" },
                    },
                ],
            }},
        });
        if c.picked {
            value["load_balancing_policy"] = override_host_policy();
        }
        patches.push(json!({
            "applyTo": "CLUSTER",
            "match": {
                "context": "SIDECAR_OUTBOUND",
                "cluster": { "service": c.host, "portNumber": c.port },
            },
            "patch": { "operation": "MERGE", "value": value },
        }));
    }
    let mut spec = json!({
        // Applied after EnvoyFilters of default priority 0, which may add
        // the filters this one is inserted next to.
        "priority": 10,
        "configPatches": patches,
    });
    target.apply(&mut spec);
    Ok(json!({
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {
            "name": name,
            "namespace": args.namespace,
            "labels": { "app.kubernetes.io/managed-by": "sluice" },
        },
        "spec": spec,
    }))
}

/// The policy as Istio carries a `pluginConfig`: a Struct printed as JSON,
/// where every number is a double (`2` reads back as `2.0`).
pub fn struct_json(text: &str, format: sluice_policy::Format) -> anyhow::Result<String> {
    let value: Value = match format {
        sluice_policy::Format::Toml => {
            let doc: toml::Value = toml::from_str(text).context("the policy is not TOML")?;
            serde_json::to_value(doc).context("cannot convert the policy to JSON")?
        }
        sluice_policy::Format::Json => {
            serde_json::from_str(text).context("the policy is not JSON")?
        }
    };
    serde_json::to_string(&as_doubles(value)).context("cannot print JSON")
}

fn as_doubles(v: Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |f| json!(f)),
        Value::Array(a) => Value::Array(a.into_iter().map(as_doubles).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, as_doubles(v))).collect()),
        other => other,
    }
}

/// A name as a Kubernetes DNS label: lower case, `-` for anything else.
fn dns_label(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(53);
    let out = out.trim_matches('-');
    if out.is_empty() {
        "policy".to_string()
    } else {
        out.to_string()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::dns_label;

    #[test]
    fn names_become_dns_labels_that_never_end_in_a_dash() {
        assert_eq!(dns_label("LLM Gateway_1"), "llm-gateway-1");
        assert_eq!(dns_label("--x--"), "x");
        assert_eq!(dns_label("é"), "policy");
        // Cut at 53 (room for `sluice-`), and not left ending in `-`.
        let long = format!("{}-{}", "a".repeat(52), "b".repeat(10));
        assert_eq!(dns_label(&long), "a".repeat(52));
        assert!(dns_label(&"ab-".repeat(40)).len() <= 53);
        assert!(!dns_label(&"ab-".repeat(40)).ends_with('-'));
    }
}
