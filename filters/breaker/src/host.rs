//! The host calls the filter makes, each returning an `Option` or ignoring
//! a failure rather than unwrapping.
//!
//! The SDK's trait helpers (`get_http_request_header` and friends) unwrap
//! the host's status, so a header map Envoy no longer holds (after a
//! resume, in a tick) would panic the VM; these wrappers read such a map as
//! empty, as Envoy itself reports it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn set_request_header(name: &str, value: Option<&str>) {
    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value);
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

pub fn set_response_header(name: &str, value: &str) {
    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
}

pub fn request_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
        .ok()
        .flatten()
}

pub fn replace_request_body(old_size: usize, body: &[u8]) {
    let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, old_size, body);
}

pub fn response_body(size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
        .ok()
        .flatten()
}

/// An integer property (Envoy serializes int64/uint64 as 8 little-endian bytes).
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

pub fn property_string(path: &[&str]) -> Option<String> {
    let bytes = hostcalls::get_property(path.to_vec()).ok().flatten()?;
    String::from_utf8(bytes).ok()
}

/// Answers the current request locally.
pub fn send_reply(status: u16, headers: &[(&str, String)], body: &str) {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _ = hostcalls::send_http_response(u32::from(status), headers, Some(body.as_bytes()));
}
