//! The data of one HTTP stream that every filter of the chain shares.
//!
//! In Envoy the filters of a chain work on the same header map objects and the
//! same `StreamInfo`; a header one filter sets is what the next filter and the
//! router see. The harness keeps one `StreamData` per stream behind an
//! `Rc<RefCell<_>>` that the contexts of every filter VM point to.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::headers::HeaderMap;
use crate::world::Locality;

/// The upstream host the router picked for the current attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamHost {
    /// `ip:port`, as `upstream.address` reports it.
    pub address: String,
    pub locality: Locality,
}

impl UpstreamHost {
    /// Port part of the address (`upstream.port`).
    pub fn port(&self) -> Option<i64> {
        self.address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
    }
}

/// What Envoy's `StreamInfo` holds that properties expose.
#[derive(Clone, Debug, Default)]
pub struct StreamInfo {
    /// `request.time`: when the stream started, ns since the epoch.
    pub start_time_ns: u64,
    /// `request.duration` once the request is complete (ns).
    pub request_duration_ns: Option<u64>,
    pub upstream_host: Option<UpstreamHost>,
    /// `upstream.request_attempt_count`: attempts the router made so far.
    pub attempt_count: u64,
    /// `response.code` once response headers exist.
    pub response_code: Option<u32>,
    /// `response.code_details` (`via_upstream`, or the local reply's details).
    pub response_code_details: Option<String>,
    /// `response.flags`: Envoy's legacy response flag bits.
    pub response_flags: u64,
    pub route_name: Option<String>,
    /// Cluster the route picked (`xds.cluster_name`).
    pub cluster_name: Option<String>,
    /// `source.address` (`ip:port`) and `destination.address`.
    pub source_address: String,
    pub destination_address: String,
    /// `request.protocol`.
    pub protocol: String,
    /// Bytes of request body received so far (`request.size` without content-length).
    pub bytes_received: u64,
    /// Bytes of response body sent so far (`response.size`).
    pub bytes_sent: u64,
    /// Values set with `proxy_set_property`, by path.
    pub filter_state: BTreeMap<String, Vec<u8>>,
}

/// Headers, bodies and trailers of both directions plus the stream info.
#[derive(Clone, Debug, Default)]
pub struct StreamData {
    pub request_headers: HeaderMap,
    /// The request body buffer visible to the filter being called.
    pub request_body: Vec<u8>,
    pub request_trailers: HeaderMap,
    pub response_headers: HeaderMap,
    /// The response body buffer visible to the filter being called.
    pub response_body: Vec<u8>,
    pub response_trailers: HeaderMap,
    pub info: StreamInfo,
}

pub type SharedStream = Rc<RefCell<StreamData>>;

/// Which parts of the stream a filter context may touch right now.
///
/// Envoy's wasm context keeps a pointer to each map only while the filter holds
/// it: after `on_http_request_headers` returns `Continue` (or the filter resumes
/// the request) the request headers are gone for that filter: reading a value
/// gives `BadArgument`, reading all pairs gives an empty map, and
/// `request.*` header properties are `NotFound`. The same holds for the other
/// maps and bodies. The harness mirrors this so a filter that works here does
/// not crash in Envoy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub request_headers: bool,
    pub request_body: bool,
    pub request_trailers: bool,
    pub response_headers: bool,
    pub response_body: bool,
    pub response_trailers: bool,
    /// In `on_log`: Envoy hands the access-log maps (request and response
    /// headers) to the filter again.
    pub access_log: bool,
}
