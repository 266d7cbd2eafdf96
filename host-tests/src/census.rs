//! A census of the proxy-wasm host calls filters make, per phase of a
//! request: how many of each, and how many bytes crossed the guest boundary.
//!
//! A filter's cost in Envoy is mostly its own work per callback plus what it
//! asks of the host: every header read copies a value into guest memory
//! through `proxy_on_memory_allocate`, every shared-data CAS copies a value
//! both ways. Measured Envoy CPU says *how much* a filter costs; the census
//! says *where*: which phase, which call, how many bytes. It is what to look
//! at before and after merging capabilities into one module (one body parse,
//! one read of each header), and it is deterministic, so a test can pin it.
//!
//! Recording is a few array increments per host call (indices are resolved
//! when the host functions are defined, not by name per call), so it is
//! always on. [`crate::Host::census`] reads it, [`Census::reset`] (through
//! [`crate::Host::reset_census`]) starts a new count, e.g. per request.

use std::fmt;

/// When a host call was made: the callback the host was running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// `_initialize`, the root context's creation, `on_vm_start`, `on_configure`.
    Start,
    /// `on_http_request_headers` (and the stream context's creation).
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    /// `on_log`, `on_done`, `on_delete`.
    Log,
    /// `on_http_call_response`.
    Callout,
    /// The root context's timers and queues: `on_tick`, `on_queue_ready`.
    Tick,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Start,
        Phase::RequestHeaders,
        Phase::RequestBody,
        Phase::RequestTrailers,
        Phase::ResponseHeaders,
        Phase::ResponseBody,
        Phase::ResponseTrailers,
        Phase::Log,
        Phase::Callout,
        Phase::Tick,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Start => "start",
            Phase::RequestHeaders => "request_headers",
            Phase::RequestBody => "request_body",
            Phase::RequestTrailers => "request_trailers",
            Phase::ResponseHeaders => "response_headers",
            Phase::ResponseBody => "response_body",
            Phase::ResponseTrailers => "response_trailers",
            Phase::Log => "log",
            Phase::Callout => "callout",
            Phase::Tick => "tick",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The host functions the census knows by name (ABI 0.2.1). Anything else
/// (WASI, stubs of unknown imports) is counted under [`OTHER`], bytes only.
pub const HOST_CALLS: [&str; 38] = [
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_add_header_map_value",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_call_foreign_function",
    "proxy_done",
    "proxy_define_metric",
    "proxy_get_metric",
    "proxy_record_metric",
    "proxy_increment_metric",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "wasi/other",
];

/// Index of the slot for WASI calls and unknown imports.
pub const OTHER: usize = HOST_CALLS.len() - 1;

/// The census slot of a host function (resolved once, when it is defined).
pub fn host_call_index(name: &str) -> usize {
    HOST_CALLS.iter().position(|n| *n == name).unwrap_or(OTHER)
}

/// The `proxy_on_*` callbacks the host calls into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Callback {
    ContextCreate,
    VmStart,
    Configure,
    Tick,
    QueueReady,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    HttpCallResponse,
    Log,
    Done,
    Delete,
}

impl Callback {
    const COUNT: usize = 15;

    pub fn name(self) -> &'static str {
        match self {
            Callback::ContextCreate => "proxy_on_context_create",
            Callback::VmStart => "proxy_on_vm_start",
            Callback::Configure => "proxy_on_configure",
            Callback::Tick => "proxy_on_tick",
            Callback::QueueReady => "proxy_on_queue_ready",
            Callback::RequestHeaders => "proxy_on_request_headers",
            Callback::RequestBody => "proxy_on_request_body",
            Callback::RequestTrailers => "proxy_on_request_trailers",
            Callback::ResponseHeaders => "proxy_on_response_headers",
            Callback::ResponseBody => "proxy_on_response_body",
            Callback::ResponseTrailers => "proxy_on_response_trailers",
            Callback::HttpCallResponse => "proxy_on_http_call_response",
            Callback::Log => "proxy_on_log",
            Callback::Done => "proxy_on_done",
            Callback::Delete => "proxy_on_delete",
        }
    }

    /// The phase host calls made in this callback belong to. A context's
    /// creation is counted where it happens (see [`Phase`]), so it is given
    /// by the caller.
    pub fn phase(self) -> Phase {
        match self {
            Callback::ContextCreate | Callback::VmStart | Callback::Configure => Phase::Start,
            Callback::Tick | Callback::QueueReady => Phase::Tick,
            Callback::RequestHeaders => Phase::RequestHeaders,
            Callback::RequestBody => Phase::RequestBody,
            Callback::RequestTrailers => Phase::RequestTrailers,
            Callback::ResponseHeaders => Phase::ResponseHeaders,
            Callback::ResponseBody => Phase::ResponseBody,
            Callback::ResponseTrailers => Phase::ResponseTrailers,
            Callback::HttpCallResponse => Phase::Callout,
            Callback::Log | Callback::Done | Callback::Delete => Phase::Log,
        }
    }

    const ALL: [Callback; Callback::COUNT] = [
        Callback::ContextCreate,
        Callback::VmStart,
        Callback::Configure,
        Callback::Tick,
        Callback::QueueReady,
        Callback::RequestHeaders,
        Callback::RequestBody,
        Callback::RequestTrailers,
        Callback::ResponseHeaders,
        Callback::ResponseBody,
        Callback::ResponseTrailers,
        Callback::HttpCallResponse,
        Callback::Log,
        Callback::Done,
        Callback::Delete,
    ];
}

/// Counts for one host function in one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    pub calls: u64,
    /// Bytes the host read from guest memory (keys, values, pairs, bodies).
    pub bytes_in: u64,
    /// Bytes the host wrote into guest memory: the data it hands over plus
    /// the pointers, sizes and integers it returns through out-parameters.
    pub bytes_out: u64,
}

impl CallStats {
    fn add(&mut self, other: CallStats) {
        self.calls += other.calls;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
    }
}

/// Counts for one callback in one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallbackStats {
    pub calls: u64,
    /// Wall-clock time spent in the guest, host calls included (meaningful
    /// in a release build only).
    pub guest_ns: u64,
}

/// Host calls and callbacks, per phase, for every VM of a [`crate::Host`].
#[derive(Clone, PartialEq, Eq)]
pub struct Census {
    host: [[CallStats; HOST_CALLS.len()]; Phase::ALL.len()],
    callbacks: [[CallbackStats; Callback::COUNT]; Phase::ALL.len()],
}

impl Default for Census {
    fn default() -> Self {
        Self {
            host: [[CallStats::default(); HOST_CALLS.len()]; Phase::ALL.len()],
            callbacks: [[CallbackStats::default(); Callback::COUNT]; Phase::ALL.len()],
        }
    }
}

impl Census {
    /// Forgets everything counted so far.
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn enter_host_call(&mut self, phase: Phase, call: usize) {
        self.host[phase.index()][call].calls += 1;
    }

    pub(crate) fn copied_in(&mut self, phase: Phase, call: usize, bytes: usize) {
        self.host[phase.index()][call].bytes_in += bytes as u64;
    }

    pub(crate) fn copied_out(&mut self, phase: Phase, call: usize, bytes: usize) {
        self.host[phase.index()][call].bytes_out += bytes as u64;
    }

    pub(crate) fn callback(&mut self, phase: Phase, callback: Callback, guest_ns: u64) {
        let slot = &mut self.callbacks[phase.index()][callback as usize];
        slot.calls += 1;
        slot.guest_ns += guest_ns;
    }

    /// One host function's counts in a phase (by its import name).
    pub fn host_call(&self, phase: Phase, name: &str) -> CallStats {
        let index = host_call_index(name);
        if index == OTHER && name != HOST_CALLS[OTHER] {
            return CallStats::default();
        }
        self.host[phase.index()][index]
    }

    /// The host functions used in a phase, in ABI order, with their counts.
    pub fn host_calls(&self, phase: Phase) -> Vec<(&'static str, CallStats)> {
        HOST_CALLS
            .iter()
            .zip(self.host[phase.index()])
            .filter(|(_, s)| *s != CallStats::default())
            .map(|(n, s)| (*n, s))
            .collect()
    }

    /// The callbacks run in a phase, with their counts.
    pub fn callbacks(&self, phase: Phase) -> Vec<(&'static str, CallbackStats)> {
        Callback::ALL
            .iter()
            .zip(self.callbacks[phase.index()])
            .filter(|(_, s)| s.calls > 0)
            .map(|(c, s)| (c.name(), s))
            .collect()
    }

    /// Every host call of a phase added up.
    pub fn phase_total(&self, phase: Phase) -> CallStats {
        let mut total = CallStats::default();
        for stats in self.host[phase.index()] {
            total.add(stats);
        }
        total
    }

    /// Every host call of every phase added up.
    pub fn total(&self) -> CallStats {
        let mut total = CallStats::default();
        for phase in Phase::ALL {
            total.add(self.phase_total(phase));
        }
        total
    }

    /// Callbacks run in every phase.
    pub fn total_callbacks(&self) -> u64 {
        self.callbacks.iter().flatten().map(|s| s.calls).sum()
    }
}

/// A table: per phase, its callbacks, then each host call with its count and
/// bytes in and out, then the phase's total.
impl fmt::Display for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<18} {:<36} {:>7} {:>10} {:>10}",
            "phase", "call", "count", "bytes in", "bytes out"
        )?;
        for phase in Phase::ALL {
            let callbacks = self.callbacks(phase);
            let calls = self.host_calls(phase);
            if callbacks.is_empty() && calls.is_empty() {
                continue;
            }
            for (name, stats) in callbacks {
                writeln!(
                    f,
                    "{:<18} {:<36} {:>7} {:>10} {:>10}",
                    phase.name(),
                    format!("[{name}]"),
                    stats.calls,
                    "",
                    ""
                )?;
            }
            for (name, stats) in calls {
                writeln!(
                    f,
                    "{:<18} {:<36} {:>7} {:>10} {:>10}",
                    phase.name(),
                    name,
                    stats.calls,
                    stats.bytes_in,
                    stats.bytes_out
                )?;
            }
            let total = self.phase_total(phase);
            writeln!(
                f,
                "{:<18} {:<36} {:>7} {:>10} {:>10}",
                phase.name(),
                "= host calls",
                total.calls,
                total.bytes_in,
                total.bytes_out
            )?;
        }
        let total = self.total();
        write!(
            f,
            "{:<18} {:<36} {:>7} {:>10} {:>10}",
            "all",
            format!("= host calls ({} callbacks)", self.total_callbacks()),
            total.calls,
            total.bytes_in,
            total.bytes_out
        )
    }
}

impl fmt::Debug for Census {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_phase_and_call() {
        let mut census = Census::default();
        let get = host_call_index("proxy_get_header_map_value");
        census.enter_host_call(Phase::RequestHeaders, get);
        census.copied_in(Phase::RequestHeaders, get, 11);
        census.copied_out(Phase::RequestHeaders, get, 4 + 8);
        census.callback(Phase::RequestHeaders, Callback::RequestHeaders, 5);
        let stats = census.host_call(Phase::RequestHeaders, "proxy_get_header_map_value");
        assert_eq!(
            stats,
            CallStats {
                calls: 1,
                bytes_in: 11,
                bytes_out: 12
            }
        );
        assert_eq!(
            census.host_call(Phase::ResponseHeaders, "proxy_get_header_map_value"),
            CallStats::default()
        );
        assert_eq!(
            census.host_call(Phase::RequestHeaders, "no_such_call"),
            CallStats::default()
        );
        assert_eq!(census.total().calls, 1);
        assert_eq!(census.total_callbacks(), 1);
        assert!(census.to_string().contains("[proxy_on_request_headers]"));
        census.reset();
        assert_eq!(census, Census::default());
    }

    #[test]
    fn every_phase_and_callback_has_its_own_slot() {
        for (i, phase) in Phase::ALL.iter().enumerate() {
            assert_eq!(phase.index(), i);
        }
        for (i, callback) in Callback::ALL.iter().enumerate() {
            assert_eq!(*callback as usize, i);
        }
        assert_eq!(host_call_index("proxy_grpc_close"), OTHER - 1);
    }
}
