//! Conformance probe: a proxy-wasm filter that writes down what its host shows it.
//!
//! sluice's filters are tested in two hosts: the wasmtime harness in
//! `host-tests` (fast, deterministic) and a real Envoy 1.40 (slow, the truth).
//! The harness is only worth its speed if a filter cannot tell the two apart.
//! This probe makes the difference measurable: it runs the same module in both
//! hosts and records, for one request, every fact a sluice filter depends on
//! (header map contents and order, property encodings, shared-data CAS
//! semantics, metric rules, local-reply shape, tick cadence, pause/resume,
//! callback order). The lab diffs the two documents field by field.
//!
//! # Output
//!
//! A JSON document `{"probe": "sluice-probe", "version": 1, "observations": {..}}`
//! where `observations` is a flat map from a dotted name (`"property.request.time"`,
//! `"shared_data.set_stale_cas"`) to a JSON value. It is delivered:
//! - as the response body (the probe buffers the upstream body and replaces it;
//!   the original body is kept under `"response.upstream_body"`), and
//! - as an `info` log line starting with `probe-observations: `.
//!
//! # Request controls (request headers)
//!
//! - `x-probe-id: <id>`: names the shared-data keys of this request (defaults to
//!   the context id); use a fresh one per request.
//! - `x-probe-local-reply: <status>`: answer with a local reply of that status.
//! - `x-probe-pause: tick`: pause in `on_http_request_headers`; the root context
//!   resumes the request from its next `on_tick` via `set_effective_context`.
//! - `x-probe-callout: <cluster>`: `dispatch_http_call` to that cluster and
//!   resume when the answer arrives.
//! - `x-probe-trap: <point>`: panic (with `panic = "abort"`, a trap that fails
//!   the VM) at `request-headers`, `response-headers` or `response-body`, in
//!   either mode, to measure what the host's `failure_policy` does with a VM
//!   that traps at run time. The panic hook logs the message at `critical`
//!   first.
//! - `x-probe-vm: ?` (passthrough mode): answer with the response header
//!   `x-probe-vm: <instance>`, an id taken when the VM was configured, so a
//!   test can tell the VMs of two workers apart, and a reloaded VM from the
//!   one that failed.
//!
//! The plugin configuration is optional JSON: `{"tick_ms": 100}` (default 100).
//!
//! # Passthrough mode
//!
//! With `{"mode": "passthrough"}` the probe records nothing and stays cheap, for
//! scenario tests and benchmarks of the harness itself: it counts requests
//! (`probe.passthrough.requests`) and 5xx responses
//! (`probe.passthrough.responses_5xx`), appends its `plugin_name` to the
//! `x-probe-chain` request and response headers (so a test can see the order
//! a chain runs in), and, when configured with `retry_on` / `max_retries` /
//! `retriable_status_codes`, sets Envoy's retry headers the way a sluice
//! filter would.
// Not product code: the conformance probe reports what the SDK's own calls see, panics included.
#![allow(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, Status};
use serde_json::{Value, json};

mod raw;

/// Properties recorded on the request path, with the way to decode them.
const REQUEST_PROPERTIES: &[(&str, Encoding)] = &[
    ("request.path", Encoding::String),
    ("request.url_path", Encoding::String),
    ("request.host", Encoding::String),
    ("request.scheme", Encoding::String),
    ("request.method", Encoding::String),
    ("request.query", Encoding::String),
    ("request.id", Encoding::String),
    ("request.useragent", Encoding::String),
    ("request.protocol", Encoding::String),
    ("request.time", Encoding::I64),
    ("request.headers", Encoding::Pairs),
    ("source.address", Encoding::String),
    ("source.port", Encoding::I64),
    ("destination.address", Encoding::String),
    ("destination.port", Encoding::I64),
    ("node.id", Encoding::String),
    ("node.cluster", Encoding::String),
    ("node.metadata", Encoding::Pairs),
    ("node.locality", Encoding::Hex),
    ("node.locality.region", Encoding::String),
    ("node.locality.zone", Encoding::String),
    ("plugin_name", Encoding::String),
    ("plugin_root_id", Encoding::String),
    ("plugin_vm_id", Encoding::String),
    ("xds.cluster_name", Encoding::String),
    ("xds.route_name", Encoding::String),
    ("route_name", Encoding::String),
    ("listener_direction", Encoding::I64),
    ("upstream.address", Encoding::String),
    ("response.code", Encoding::I64),
    ("no_such_property", Encoding::Hex),
];

/// Properties recorded on the response path (after host selection).
const RESPONSE_PROPERTIES: &[(&str, Encoding)] = &[
    ("upstream.address", Encoding::String),
    ("upstream.port", Encoding::I64),
    ("upstream.request_attempt_count", Encoding::U64),
    ("upstream.locality", Encoding::Hex),
    ("xds.cluster_name", Encoding::String),
    ("cluster_name", Encoding::String),
    ("response.code", Encoding::I64),
    ("response.code_details", Encoding::String),
    ("response.flags", Encoding::I64),
    ("response.headers", Encoding::Pairs),
];

/// Properties recorded in `on_log`, reported by the next request of this VM.
const LOG_PROPERTIES: &[(&str, Encoding)] = &[
    ("response.code", Encoding::I64),
    ("response.code_details", Encoding::String),
    ("response.flags", Encoding::I64),
    ("request.duration", Encoding::I64),
    ("upstream.request_attempt_count", Encoding::U64),
];

/// Where a request asked the probe to trap (`x-probe-trap`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TrapPoint {
    RequestHeaders,
    ResponseHeaders,
    ResponseBody,
}

impl TrapPoint {
    const HEADER: &'static str = "x-probe-trap";

    fn parse(value: &str) -> Option<Self> {
        match value {
            "request-headers" => Some(Self::RequestHeaders),
            "response-headers" => Some(Self::ResponseHeaders),
            "response-body" => Some(Self::ResponseBody),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::RequestHeaders => "request-headers",
            Self::ResponseHeaders => "response-headers",
            Self::ResponseBody => "response-body",
        }
    }

    /// Traps the VM here if `armed` names this point.
    fn fire_if(armed: Option<Self>, here: Self) {
        if armed == Some(here) {
            trap(here);
        }
    }
}

/// Fails the VM on purpose: the release profile has `panic = "abort"`, so a
/// panic is a Wasm trap (`unreachable`) after the SDK's panic hook has logged
/// the message at `critical`.
// Not product code: trapping is this control's whole job (`failure_policy`
// tests in the Envoy lab), and only a request that asks for it gets here.
#[allow(clippy::panic)]
fn trap(point: TrapPoint) -> ! {
    panic!("sluice-probe: trap requested at {}", point.name());
}

/// How to show a property's bytes besides their hex form.
#[derive(Clone, Copy)]
enum Encoding {
    String,
    I64,
    U64,
    Pairs,
    Hex,
}

thread_local! {
    /// Per-VM state shared between the root context and the HTTP contexts
    /// (one VM runs on one thread; the SDK dispatches on it).
    static VM: RefCell<VmState> = RefCell::new(VmState::default());
}

#[derive(Default)]
struct VmState {
    passthrough: Option<Passthrough>,
    tick_period_ms: u64,
    /// Virtual or real time of each `on_tick`, nanoseconds since the epoch (last 16).
    ticks_ns: Vec<u64>,
    /// HTTP contexts paused until the next tick.
    paused: Vec<u32>,
    /// Callbacks and properties seen at the end of the last finished stream.
    last_stream_end: Option<Value>,
    counter_id: Option<u32>,
    histogram_id: Option<u32>,
    gauge_id: Option<u32>,
}

/// Settings of passthrough mode.
#[derive(Clone, Default)]
struct Passthrough {
    retry_on: Option<String>,
    max_retries: Option<u64>,
    retriable_status_codes: Option<String>,
    requests_metric: Option<u32>,
    errors_metric: Option<u32>,
    plugin_name: String,
    /// Names this VM instance (`x-probe-vm`): its configuration time, in
    /// nanoseconds since the epoch, as hex.
    instance: String,
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
}}

#[derive(Default)]
struct ProbeRoot {
    vm_start_config_len: usize,
}

impl Context for ProbeRoot {}

impl RootContext for ProbeRoot {
    fn on_vm_start(&mut self, vm_configuration_size: usize) -> bool {
        self.vm_start_config_len = vm_configuration_size;
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .unwrap_or(Value::Null);
        if config.get("mode").and_then(Value::as_str) == Some("passthrough") {
            let text = |key: &str| config.get(key).and_then(Value::as_str).map(str::to_owned);
            let passthrough = Passthrough {
                retry_on: text("retry_on"),
                max_retries: config.get("max_retries").and_then(Value::as_u64),
                retriable_status_codes: text("retriable_status_codes"),
                requests_metric: proxy_wasm::hostcalls::define_metric(
                    MetricType::Counter,
                    "probe.passthrough.requests",
                )
                .ok(),
                errors_metric: proxy_wasm::hostcalls::define_metric(
                    MetricType::Counter,
                    "probe.passthrough.responses_5xx",
                )
                .ok(),
                plugin_name: self
                    .get_property(vec!["plugin_name"])
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
                instance: format!("{:x}", now_ns(self)),
            };
            VM.with_borrow_mut(|vm| vm.passthrough = Some(passthrough));
            return true;
        }
        let tick_ms = config.get("tick_ms").and_then(Value::as_u64).unwrap_or(100);
        self.set_tick_period(Duration::from_millis(tick_ms));
        let counter = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "probe.requests");
        let gauge = proxy_wasm::hostcalls::define_metric(MetricType::Gauge, "probe.in_flight");
        let histogram = proxy_wasm::hostcalls::define_metric(MetricType::Histogram, "probe.size");
        VM.with_borrow_mut(|vm| {
            vm.tick_period_ms = tick_ms;
            vm.counter_id = counter.ok();
            vm.gauge_id = gauge.ok();
            vm.histogram_id = histogram.ok();
        });
        true
    }

    fn on_tick(&mut self) {
        let now = now_ns(self);
        let paused = VM.with_borrow_mut(|vm| {
            vm.ticks_ns.push(now);
            if vm.ticks_ns.len() > 16 {
                vm.ticks_ns.remove(0);
            }
            std::mem::take(&mut vm.paused)
        });
        for context_id in paused {
            // The bulkhead pattern: wake a parked request from the root context.
            let switched = proxy_wasm::hostcalls::set_effective_context(context_id);
            if switched.is_ok() {
                let _ = proxy_wasm::hostcalls::set_shared_data(
                    &format!("probe/resumed/{context_id}"),
                    Some(&now.to_le_bytes()),
                    None,
                );
                let _ = proxy_wasm::hostcalls::resume_http_request();
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(passthrough) = VM.with_borrow(|vm| vm.passthrough.clone()) {
            return Some(Box::new(PassthroughStream {
                config: passthrough,
                trap: None,
                report_vm: false,
            }));
        }
        Some(Box::new(ProbeStream::new(context_id)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct ProbeStream {
    context_id: u32,
    probe_id: String,
    observations: BTreeMap<String, Value>,
    callbacks: Vec<String>,
    paused_at_ns: Option<u64>,
    upstream_body: Vec<u8>,
    trap: Option<TrapPoint>,
}

impl ProbeStream {
    fn new(context_id: u32) -> Self {
        Self {
            context_id,
            probe_id: context_id.to_string(),
            observations: BTreeMap::new(),
            callbacks: Vec::new(),
            paused_at_ns: None,
            upstream_body: Vec::new(),
            trap: None,
        }
    }

    fn observe(&mut self, name: &str, value: Value) {
        self.observations.insert(name.to_owned(), value);
    }

    fn observe_properties(&mut self, phase: &str, properties: &[(&str, Encoding)]) {
        for (path, encoding) in properties {
            let value = read_property(path, *encoding);
            self.observe(&format!("{phase}.property.{path}"), value);
        }
    }

    /// CAS rules every sluice filter builds on (Envoy: stale non-zero cas fails,
    /// cas 0 overwrites, each successful set changes the cas).
    fn observe_shared_data(&mut self) {
        use proxy_wasm::hostcalls::{get_shared_data, set_shared_data};
        let key = format!("probe/cas/{}", self.probe_id);
        let missing = get_shared_data(&key);
        self.observe(
            "shared_data.get_missing",
            json!(match missing {
                Ok((None, None)) => "none".to_owned(),
                Ok((value, cas)) => format!("value={value:?} cas={cas:?}"),
                Err(status) => format!("{status:?}"),
            }),
        );
        let first = set_shared_data(&key, Some(b"v1"), None);
        let (value1, cas1) = get_shared_data(&key).unwrap_or((None, None));
        let second = set_shared_data(&key, Some(b"v2"), cas1);
        let stale = set_shared_data(&key, Some(b"v3"), cas1);
        let overwrite = set_shared_data(&key, Some(b"v4"), None);
        let (value4, cas4) = get_shared_data(&key).unwrap_or((None, None));
        let empty = set_shared_data(&key, None, None);
        let (value_empty, _) = get_shared_data(&key).unwrap_or((None, None));
        self.observe("shared_data.set_new_cas0", status_json(first));
        self.observe("shared_data.get_after_set", bytes_text(value1.as_deref()));
        self.observe("shared_data.cas_nonzero", json!(cas1.is_some()));
        self.observe("shared_data.set_fresh_cas", status_json(second));
        self.observe("shared_data.set_stale_cas", status_json(stale));
        self.observe("shared_data.set_cas0_overwrites", status_json(overwrite));
        self.observe(
            "shared_data.get_after_overwrite",
            bytes_text(value4.as_deref()),
        );
        self.observe(
            "shared_data.cas_changed",
            json!(cas1 != cas4 && cas4.is_some()),
        );
        self.observe("shared_data.set_none_value", status_json(empty));
        self.observe(
            "shared_data.get_after_none",
            bytes_text(value_empty.as_deref()),
        );
    }

    /// Metric rules (Envoy: a counter rejects a non-positive increment, a
    /// histogram cannot be read back).
    fn observe_metrics(&mut self) {
        use proxy_wasm::hostcalls::{get_metric, increment_metric, record_metric};
        let (counter, gauge, histogram) =
            VM.with_borrow(|vm| (vm.counter_id, vm.gauge_id, vm.histogram_id));
        if let (Some(counter), Some(gauge), Some(histogram)) = (counter, gauge, histogram) {
            let before = get_metric(counter);
            let inc = increment_metric(counter, 1);
            let after = get_metric(counter);
            self.observe(
                "metrics.counter_increment_by_1",
                json!(match (before, after) {
                    (Ok(b), Ok(a)) => json!(a.saturating_sub(b)),
                    _ => json!("error"),
                }),
            );
            self.observe("metrics.counter_increment_status", status_json(inc));
            self.observe(
                "metrics.counter_increment_negative",
                status_json(increment_metric(counter, -1)),
            );
            self.observe(
                "metrics.counter_increment_zero",
                status_json(increment_metric(counter, 0)),
            );
            let _ = record_metric(gauge, 10);
            let _ = increment_metric(gauge, -3);
            self.observe(
                "metrics.gauge_after_set10_minus3",
                json!(get_metric(gauge).map_err(|s| format!("{s:?}")).ok()),
            );
            self.observe(
                "metrics.histogram_record",
                status_json(record_metric(histogram, 42)),
            );
            self.observe(
                "metrics.histogram_get",
                json!(match get_metric(histogram) {
                    Ok(value) => format!("Ok({value})"),
                    Err(status) => format!("{status:?}"),
                }),
            );
            self.observe(
                "metrics.unknown_id_increment",
                status_json(increment_metric(0x7fff_fff0, 1)),
            );
        }
    }

    /// `dispatch_http_call` argument checks (Envoy answers BadArgument).
    fn observe_http_call_checks(&mut self) {
        let timeout = Duration::from_secs(1);
        let unknown = self.dispatch_http_call(
            "no-such-cluster",
            vec![(":method", "GET"), (":path", "/"), (":authority", "x")],
            None,
            vec![],
            timeout,
        );
        self.observe(
            "http_call.unknown_cluster",
            status_json(unknown.map(|_| ())),
        );
        let cluster = self.get_http_request_header("x-probe-callout");
        if let Some(cluster) = cluster {
            let no_path = self.dispatch_http_call(
                &cluster,
                vec![(":method", "GET"), (":authority", "x")],
                None,
                vec![],
                timeout,
            );
            self.observe("http_call.missing_path", status_json(no_path.map(|_| ())));
        }
    }

    fn document(&self) -> Value {
        json!({
            "probe": "sluice-probe",
            "version": 1,
            "observations": self.observations,
        })
    }
}

impl Context for ProbeStream {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        num_trailers: usize,
    ) {
        self.callbacks.push(format!(
            "on_http_call_response(headers={num_headers},body={body_size},trailers={num_trailers})"
        ));
        let headers = self.get_http_call_response_headers();
        let body = self.get_http_call_response_body(0, body_size);
        self.observe("http_call.response_token_positive", json!(token_id > 0));
        self.observe("http_call.response_headers", pairs_json(&headers));
        self.observe("http_call.response_body", bytes_text(body.as_deref()));
        self.observe("http_call.response_at_ns", json!(now_ns(self)));
        self.resume_http_request();
    }

    fn on_done(&mut self) -> bool {
        self.callbacks.push("on_done".to_owned());
        let callbacks = self.callbacks.clone();
        VM.with_borrow_mut(|vm| {
            if let Some(Value::Object(end)) = vm.last_stream_end.as_mut() {
                end.insert("callbacks".to_owned(), json!(callbacks));
            }
        });
        true
    }
}

impl HttpContext for ProbeStream {
    fn on_http_request_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.callbacks.push(format!(
            "on_http_request_headers(n={num_headers},eos={end_of_stream})"
        ));
        if let Some(id) = self.get_http_request_header("x-probe-id") {
            self.probe_id = id;
        }
        self.trap = self
            .get_http_request_header(TrapPoint::HEADER)
            .as_deref()
            .and_then(TrapPoint::parse);
        TrapPoint::fire_if(self.trap, TrapPoint::RequestHeaders);
        let now = now_ns(self);
        self.observe("request.time_ns_at_headers", json!(now));
        self.observe("request.num_headers_arg", json!(num_headers));
        self.observe("request.end_of_stream_arg", json!(end_of_stream));
        let headers = self.get_http_request_headers();
        self.observe("request.headers", pairs_json(&headers));
        self.observe(
            "request.header_missing",
            raw_header_status(raw::MAP_REQUEST_HEADERS, "x-probe-no-such-header"),
        );
        self.observe(
            "request.header_uppercase_lookup",
            json!(self.get_http_request_header(":METHOD")),
        );
        self.observe_properties("request_headers", REQUEST_PROPERTIES);
        self.observe_shared_data();
        self.observe_metrics();
        self.observe_http_call_checks();
        let previous = VM.with_borrow(|vm| vm.last_stream_end.clone());
        self.observe("previous_stream_end", previous.unwrap_or(Value::Null));
        self.observe(
            "vm.tick_period_ms",
            json!(VM.with_borrow(|vm| vm.tick_period_ms)),
        );
        let ticks = VM.with_borrow(|vm| vm.ticks_ns.clone());
        self.observe("vm.ticks_ns", json!(ticks));
        self.observe(
            "vm.tick_intervals_ms",
            json!(
                ticks
                    .windows(2)
                    .map(|w| w[1].saturating_sub(w[0]) / 1_000_000)
                    .collect::<Vec<_>>()
            ),
        );

        // Header mutations made here must be visible to later callbacks and
        // to the upstream.
        self.set_http_request_header("x-probe-added", Some("1"));
        self.add_http_request_header("x-probe-multi", "a");
        self.add_http_request_header("x-probe-multi", "b");
        self.observe(
            "request.multi_value_lookup",
            json!(self.get_http_request_header("x-probe-multi")),
        );
        self.observe(
            "request.property_headers_multi",
            read_property("request.headers.x-probe-multi", Encoding::String),
        );

        if let Some(status) = self
            .get_http_request_header("x-probe-local-reply")
            .and_then(|s| s.parse::<u32>().ok())
        {
            self.send_http_response(
                status,
                vec![("x-probe-local", "yes"), ("X-Probe-Case", "Mixed")],
                Some(b"probe local reply"),
            );
            return Action::Pause;
        }
        if let Some(cluster) = self.get_http_request_header("x-probe-callout") {
            let token = self.dispatch_http_call(
                &cluster,
                vec![
                    (":method", "GET"),
                    (":path", "/probe-callout"),
                    (":authority", "probe"),
                ],
                None,
                vec![],
                Duration::from_secs(5),
            );
            self.observe("http_call.dispatch", status_json(token.map(|_| ())));
            if token.is_ok() {
                return Action::Pause;
            }
        }
        if self.get_http_request_header("x-probe-pause").as_deref() == Some("tick") {
            self.paused_at_ns = Some(now);
            let context_id = self.context_id;
            VM.with_borrow_mut(|vm| vm.paused.push(context_id));
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.callbacks.push(format!(
            "on_http_request_body(size={body_size},eos={end_of_stream})"
        ));
        if end_of_stream {
            let body = self.get_http_request_body(0, body_size);
            self.observe("request.body", bytes_text(body.as_deref()));
        }
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        self.callbacks
            .push(format!("on_http_request_trailers(n={num_trailers})"));
        let trailers = self.get_http_request_trailers();
        self.observe("request.trailers", pairs_json(&trailers));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, num_headers: usize, end_of_stream: bool) -> Action {
        self.callbacks.push(format!(
            "on_http_response_headers(n={num_headers},eos={end_of_stream})"
        ));
        TrapPoint::fire_if(self.trap, TrapPoint::ResponseHeaders);
        if let Some(paused_at) = self.paused_at_ns {
            let resumed = proxy_wasm::hostcalls::get_shared_data(&format!(
                "probe/resumed/{}",
                self.context_id
            ));
            if let Ok((Some(bytes), _)) = resumed
                && let Ok(array) = <[u8; 8]>::try_from(bytes.as_slice())
            {
                let resumed_at = u64::from_le_bytes(array);
                self.observe(
                    "pause.resumed_after_ms",
                    json!(resumed_at.saturating_sub(paused_at) / 1_000_000),
                );
            }
        }
        self.observe("response.time_ns_at_headers", json!(now_ns(self)));
        self.observe("response.end_of_stream_arg", json!(end_of_stream));
        let headers = self.get_http_response_headers();
        self.observe("response.headers", pairs_json(&headers));
        self.observe(
            "response.request_header_status",
            raw_header_status(raw::MAP_REQUEST_HEADERS, ":path"),
        );
        self.observe_properties("response_headers", RESPONSE_PROPERTIES);
        // The body is replaced by the observation document.
        self.set_http_response_header("content-length", None);
        self.set_http_response_header("content-type", Some("application/json"));
        if end_of_stream {
            let document = self.document().to_string();
            log::info!("probe-observations: {document}");
            self.set_http_response_header("x-probe-observations", Some(&document));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.callbacks.push(format!(
            "on_http_response_body(size={body_size},eos={end_of_stream})"
        ));
        TrapPoint::fire_if(self.trap, TrapPoint::ResponseBody);
        if let Some(chunk) = self.get_http_response_body(0, body_size) {
            self.upstream_body.extend_from_slice(&chunk);
        }
        if !end_of_stream {
            // Swallow the chunk: the client gets the document at the end.
            self.set_http_response_body(0, body_size, b"");
            return Action::Continue;
        }
        let upstream_body = String::from_utf8_lossy(&self.upstream_body).into_owned();
        self.observe("response.upstream_body", json!(upstream_body));
        self.observe("callbacks", json!(self.callbacks));
        let document = self.document().to_string();
        log::info!("probe-observations: {document}");
        self.set_http_response_body(0, body_size, document.as_bytes());
        Action::Continue
    }

    fn on_log(&mut self) {
        self.callbacks.push("on_log".to_owned());
        let mut end = serde_json::Map::new();
        for (path, encoding) in LOG_PROPERTIES {
            end.insert((*path).to_owned(), read_property(path, *encoding));
        }
        end.insert("callbacks".to_owned(), json!(self.callbacks));
        VM.with_borrow_mut(|vm| vm.last_stream_end = Some(Value::Object(end)));
    }
}

/// The cheap stream of passthrough mode.
struct PassthroughStream {
    config: Passthrough,
    trap: Option<TrapPoint>,
    /// The request asked which VM answered (`x-probe-vm`).
    report_vm: bool,
}

impl Context for PassthroughStream {}

impl HttpContext for PassthroughStream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.trap = self
            .get_http_request_header(TrapPoint::HEADER)
            .as_deref()
            .and_then(TrapPoint::parse);
        TrapPoint::fire_if(self.trap, TrapPoint::RequestHeaders);
        self.report_vm = self.get_http_request_header("x-probe-vm").is_some();
        if let Some(id) = self.config.requests_metric {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        self.add_http_request_header("x-probe-chain", &self.config.plugin_name);
        if let Some(retry_on) = &self.config.retry_on {
            self.set_http_request_header("x-envoy-retry-on", Some(retry_on));
        }
        if let Some(max) = self.config.max_retries {
            self.set_http_request_header("x-envoy-max-retries", Some(&max.to_string()));
        }
        if let Some(codes) = &self.config.retriable_status_codes {
            self.set_http_request_header("x-envoy-retriable-status-codes", Some(codes));
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        TrapPoint::fire_if(self.trap, TrapPoint::ResponseHeaders);
        let status = self.get_http_response_header(":status");
        if status.is_some_and(|s| s.starts_with('5'))
            && let Some(id) = self.config.errors_metric
        {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        self.add_http_response_header("x-probe-chain", &self.config.plugin_name);
        if self.report_vm {
            self.set_http_response_header("x-probe-vm", Some(&self.config.instance));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _body_size: usize, _end_of_stream: bool) -> Action {
        TrapPoint::fire_if(self.trap, TrapPoint::ResponseBody);
        Action::Continue
    }
}

fn now_ns(context: &dyn Context) -> u64 {
    context
        .get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn status_json(result: Result<(), Status>) -> Value {
    json!(match result {
        Ok(()) => "Ok".to_owned(),
        Err(status) => format!("{status:?}"),
    })
}

fn bytes_text(bytes: Option<&[u8]>) -> Value {
    match bytes {
        None => Value::Null,
        Some(bytes) => json!(String::from_utf8_lossy(bytes)),
    }
}

fn pairs_json(pairs: &[(String, String)]) -> Value {
    json!(pairs.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>())
}

fn raw_header_status(map: u32, name: &str) -> Value {
    let (status, value) = raw::get_header_map_value(map, name);
    json!({ "status": raw::status_name(status), "value": bytes_text(value.as_deref()) })
}

/// Reads a property with the raw ABI call (the SDK panics on some statuses)
/// and shows its bytes as hex plus the decoding Envoy documents for it.
fn read_property(path: &str, encoding: Encoding) -> Value {
    let (status, bytes) = raw::get_property(path);
    let mut out = serde_json::Map::new();
    out.insert("status".to_owned(), json!(raw::status_name(status)));
    if let Some(bytes) = bytes {
        out.insert("hex".to_owned(), json!(hex(&bytes)));
        let decoded = match encoding {
            Encoding::String => json!(String::from_utf8_lossy(&bytes)),
            Encoding::I64 => <[u8; 8]>::try_from(bytes.as_slice())
                .map(|a| json!(i64::from_le_bytes(a)))
                .unwrap_or(Value::Null),
            Encoding::U64 => <[u8; 8]>::try_from(bytes.as_slice())
                .map(|a| json!(u64::from_le_bytes(a)))
                .unwrap_or(Value::Null),
            Encoding::Pairs => {
                // Envoy builds maps from hash sets: the order is unspecified, so sort.
                let mut pairs = raw::decode_pairs(&bytes).unwrap_or_default();
                pairs.sort();
                pairs_json(&pairs)
            }
            Encoding::Hex => Value::Null,
        };
        if !decoded.is_null() {
            out.insert("value".to_owned(), decoded);
        }
    }
    Value::Object(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
