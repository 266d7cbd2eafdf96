//! Everything sluice asks of the host, with no panic path.
//!
//! proxy-wasm 0.2.5's `hostcalls` (and the `Context` getters built on them)
//! end every call in `status => panic!("unexpected status")`, and its header
//! getter unwraps `String::from_utf8`: a client sending a header value that
//! is not UTF-8, or Envoy answering `BadArgument` for a map it no longer
//! holds (a stream resumed from a tick), would kill the VM and with it every
//! request on that worker. This module declares the ABI calls itself
//! (status as a plain `u32`, so an unknown status is a value, not undefined
//! behaviour) and turns every outcome into an `Option` or a `Result`.
//! clippy's `disallowed-methods` (clippy.toml) keeps filter code from
//! reaching for the SDK's getters instead.
//!
//! On a native build (unit tests of the filter crates) the calls do not
//! exist: every read is empty and every write fails, which is also what a
//! host that refuses everything looks like.

use std::time::Duration;

use sluice_core::shared::{SharedStore, StoreError, Versioned};
use sluice_core::time::Timestamp;

/// A header map of the current HTTP stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Map {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

/// A byte buffer the host holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Buffer {
    RequestBody = 0,
    ResponseBody = 1,
    PluginConfiguration = 7,
}

/// Log levels, as the ABI numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// Metric kinds, as the ABI numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
    Histogram = 2,
}

/// A host call that did not do what was asked; the ABI status it returned
/// (`NotFound` = 1, `BadArgument` = 2, `CasMismatch` = 8, …; 0 on a
/// native build, where there is no host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostError(pub u32);

const OK: u32 = 0;
#[cfg(target_arch = "wasm32")]
const NOT_FOUND: u32 = 1;
#[cfg(target_arch = "wasm32")]
const CAS_MISMATCH: u32 = 8;

#[cfg(target_arch = "wasm32")]
mod abi {
    //! The proxy-wasm 0.2.1 imports sluice uses. Statuses are `u32`s:
    //! whatever a host returns is a value to match on.
    #[link(wasm_import_module = "env")]
    unsafe extern "C" {
        pub fn proxy_log(level: u32, data: *const u8, size: usize) -> u32;
        pub fn proxy_get_current_time_nanoseconds(out: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            kind: u32,
            start: usize,
            max: usize,
            out_data: *mut *mut u8,
            out_size: *mut usize,
        ) -> u32;
        pub fn proxy_set_buffer_bytes(
            kind: u32,
            start: usize,
            size: usize,
            data: *const u8,
            data_size: usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_size: usize,
            out_data: *mut *mut u8,
            out_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_pairs(
            map: u32,
            out_data: *mut *mut u8,
            out_size: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
        pub fn proxy_set_property(
            path: *const u8,
            path_size: usize,
            value: *const u8,
            value_size: usize,
        ) -> u32;
        pub fn proxy_get_property(
            path: *const u8,
            path_size: usize,
            out_data: *mut *mut u8,
            out_size: *mut usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key: *const u8,
            key_size: usize,
            out_data: *mut *mut u8,
            out_size: *mut usize,
            out_cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key: *const u8,
            key_size: usize,
            value: *const u8,
            value_size: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_continue_stream(stream: u32) -> u32;
        pub fn proxy_send_local_response(
            status: u32,
            details: *const u8,
            details_size: usize,
            body: *const u8,
            body_size: usize,
            headers: *const u8,
            headers_size: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_set_effective_context(context_id: u32) -> u32;
        pub fn proxy_define_metric(
            kind: u32,
            name: *const u8,
            name_size: usize,
            out: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
        pub fn proxy_record_metric(id: u32, value: u64) -> u32;
    }
}

/// Takes ownership of bytes the host allocated in this VM (through the
/// SDK's `proxy_on_memory_allocate`, a `Vec<u8>` allocation of `size`).
#[cfg(target_arch = "wasm32")]
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        return Vec::new();
    }
    // SAFETY: the host wrote `size` bytes into memory it got from
    // `proxy_on_memory_allocate(size)`, which allocates a `Vec<u8>` of
    // exactly that capacity and leaks it to the host; we take it back once.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn check(status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Reads a value the host returns as (data, size): `Ok(None)` for
/// `NotFound`, an error for any other failure.
#[cfg(target_arch = "wasm32")]
fn read_out(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Vec<u8>>, HostError> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    match call(&mut data, &mut size) {
        OK => Ok(Some(owned(data, size))),
        NOT_FOUND => Ok(None),
        status => Err(HostError(status)),
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn read_out(
    _call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Vec<u8>>, HostError> {
    Err(HostError(0))
}

/// The host's clock (`proxy_get_current_time_nanoseconds`); the epoch when
/// the host refuses, which the algorithms treat as "no time passed".
pub fn now() -> Timestamp {
    #[cfg(target_arch = "wasm32")]
    {
        let mut nanos = 0u64;
        // SAFETY: the host writes one u64 through the pointer.
        if unsafe { abi::proxy_get_current_time_nanoseconds(&mut nanos) } == OK {
            return Timestamp::from_nanos(nanos);
        }
    }
    Timestamp::ZERO
}

/// Writes a line to Envoy's log.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointer and length of a live str.
    unsafe {
        abi::proxy_log(level as u32, message.as_ptr(), message.len());
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}

/// Asks for `on_tick` every `period` (whole milliseconds, at least 1).
pub fn set_tick_period(period: Duration) -> Result<(), HostError> {
    let ms = u32::try_from(period.as_millis()).unwrap_or(u32::MAX).max(1);
    #[cfg(target_arch = "wasm32")]
    // SAFETY: plain value call.
    return check(unsafe { abi::proxy_set_tick_period_milliseconds(ms) });
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = ms;
        Err(HostError(0))
    }
}

/// A header's value as raw bytes (Envoy passes them through as sent).
pub fn header_bytes(map: Map, name: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    let call = |d: *mut *mut u8, s: *mut usize| {
        // SAFETY: key pointer and length of a live str; out pointers valid.
        unsafe { abi::proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), d, s) }
    };
    #[cfg(not(target_arch = "wasm32"))]
    let call = |_: *mut *mut u8, _: *mut usize| {
        let _ = (map, name);
        0
    };
    read_out(call).ok().flatten()
}

/// Every header of a map, in one host call (one copy, where reading
/// headers one by one costs a call and an allocation each).
pub fn headers(map: Map) -> Option<Headers> {
    #[cfg(target_arch = "wasm32")]
    let call = |d: *mut *mut u8, s: *mut usize| {
        // SAFETY: out pointers valid for the call.
        unsafe { abi::proxy_get_header_map_pairs(map as u32, d, s) }
    };
    #[cfg(not(target_arch = "wasm32"))]
    let call = |_: *mut *mut u8, _: *mut usize| {
        let _ = map;
        0
    };
    read_out(call).ok().flatten().map(Headers::parse)
}

/// A snapshot of a header map, as the ABI serializes it: a count, then each
/// (name, value) length pair, then each name and value followed by a NUL.
/// A malformed serialization reads as the entries that fit.
#[derive(Clone, Debug, Default)]
pub struct Headers {
    data: Vec<u8>,
    /// (name start, name len, value start, value len) into `data`.
    entries: Vec<(usize, usize, usize, usize)>,
}

impl Headers {
    /// Parses the ABI's serialization (what `proxy_get_header_map_pairs`
    /// returns).
    pub fn parse(data: Vec<u8>) -> Self {
        let word = |at: usize| -> Option<usize> {
            let bytes: [u8; 4] = data.get(at..at.checked_add(4)?)?.try_into().ok()?;
            usize::try_from(u32::from_le_bytes(bytes)).ok()
        };
        let mut entries = Vec::new();
        let count = word(0).unwrap_or(0);
        // Each entry needs 8 bytes of lengths: a count beyond what the data
        // could hold is a lie, not a reason to allocate.
        let count = count.min(data.len() / 8);
        let mut at = 4usize.saturating_add(count.saturating_mul(8));
        for i in 0..count {
            let (Some(name_len), Some(value_len)) = (word(4 + i * 8), word(8 + i * 8)) else {
                break;
            };
            let name = at;
            let value = name.saturating_add(name_len).saturating_add(1);
            let end = value.saturating_add(value_len).saturating_add(1);
            if end > data.len() {
                break;
            }
            entries.push((name, name_len, value, value_len));
            at = end;
        }
        Headers { data, entries }
    }

    /// The first value of `name` (lowercase, as Envoy keeps names).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|&&(n, nl, _, _)| self.data.get(n..n + nl) == Some(name.as_bytes()))
            .and_then(|&(_, _, v, vl)| self.data.get(v..v + vl))
    }

    /// The first value of `name` as text; `None` when absent or not UTF-8.
    pub fn text(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether the map has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

/// A header's value as text; `None` when absent or not UTF-8 (use
/// [`header_bytes`] where such a value must still be told apart).
pub fn header(map: Map, name: &str) -> Option<String> {
    header_bytes(map, name).and_then(|v| String::from_utf8(v).ok())
}

/// A request header as text (see [`header`]).
pub fn request_header(name: &str) -> Option<String> {
    header(Map::RequestHeaders, name)
}

/// A response header as text (see [`header`]).
pub fn response_header(name: &str) -> Option<String> {
    header(Map::ResponseHeaders, name)
}

/// Sets (replaces every value of) or, with `None`, removes a header.
pub fn set_header(map: Map, name: &str, value: Option<&str>) -> Result<(), HostError> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointers and lengths of live strs.
    let status = unsafe {
        match value {
            Some(v) => abi::proxy_replace_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => abi::proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
        }
    };
    #[cfg(not(target_arch = "wasm32"))]
    let status = {
        let _ = (map, name, value);
        u32::MAX
    };
    check(status)
}

/// Sets or removes a request header; a failure is ignored (the map is gone
/// only when the stream is, and then nothing reads it).
pub fn set_request_header(name: &str, value: Option<&str>) {
    let _ = set_header(Map::RequestHeaders, name, value);
}

/// Sets a response header; a failure is ignored (see [`set_request_header`]).
pub fn set_response_header(name: &str, value: &str) {
    let _ = set_header(Map::ResponseHeaders, name, Some(value));
}

/// `size` bytes of a buffer from its start (`None` when absent or refused).
pub fn buffer(kind: Buffer, size: usize) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    let call = |d: *mut *mut u8, s: *mut usize| {
        // SAFETY: out pointers valid for the call.
        unsafe { abi::proxy_get_buffer_bytes(kind as u32, 0, size, d, s) }
    };
    #[cfg(not(target_arch = "wasm32"))]
    let call = |_: *mut *mut u8, _: *mut usize| {
        let _ = (kind, size);
        0
    };
    read_out(call).ok().flatten()
}

/// Replaces the first `old_size` bytes of a body buffer with `bytes`.
pub fn replace_buffer(kind: Buffer, old_size: usize, bytes: &[u8]) -> Result<(), HostError> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointer and length of a live slice.
    let status = unsafe {
        abi::proxy_set_buffer_bytes(kind as u32, 0, old_size, bytes.as_ptr(), bytes.len())
    };
    #[cfg(not(target_arch = "wasm32"))]
    let status = {
        let _ = (kind, old_size, bytes);
        u32::MAX
    };
    check(status)
}

/// A property path as the ABI wants it: the segments joined by NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            serialized.push(0);
        }
        serialized.extend_from_slice(part.as_bytes());
    }
    serialized
}

/// Sets a property of the current stream: in Envoy, filter state
/// (`wasm.<name>`) that the stream's upstream filters read too, once per
/// attempt, and that never leaves the proxy.
pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), HostError> {
    let serialized = property_path(path);
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointers and lengths of live buffers.
    let status = unsafe {
        abi::proxy_set_property(
            serialized.as_ptr(),
            serialized.len(),
            value.as_ptr(),
            value.len(),
        )
    };
    #[cfg(not(target_arch = "wasm32"))]
    let status = {
        let _ = (&serialized, value);
        u32::MAX
    };
    check(status)
}

/// A property's raw bytes (`["upstream", "address"]`, …).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let serialized = property_path(path);
    #[cfg(target_arch = "wasm32")]
    let call = |d: *mut *mut u8, s: *mut usize| {
        // SAFETY: path pointer and length of a live Vec; out pointers valid.
        unsafe { abi::proxy_get_property(serialized.as_ptr(), serialized.len(), d, s) }
    };
    #[cfg(not(target_arch = "wasm32"))]
    let call = |_: *mut *mut u8, _: *mut usize| {
        let _ = &serialized;
        0
    };
    read_out(call).ok().flatten()
}

/// An integer property (Envoy serializes int64/uint64 as 8 little-endian bytes).
pub fn property_u64(path: &[&str]) -> Option<u64> {
    let bytes = property(path)?;
    let array: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(array))
}

/// A text property; `None` when absent or not UTF-8.
pub fn property_string(path: &[&str]) -> Option<String> {
    String::from_utf8(property(path)?).ok()
}

/// Resumes the current (paused) request.
pub fn resume_request() -> Result<(), HostError> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: plain value call; 0 is the HTTP request stream.
    return check(unsafe { abi::proxy_continue_stream(0) });
    #[cfg(not(target_arch = "wasm32"))]
    Err(HostError(0))
}

/// Makes `context_id` the stream later calls act on (from the root's tick).
pub fn set_effective_context(context_id: u32) -> Result<(), HostError> {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: plain value call.
    return check(unsafe { abi::proxy_set_effective_context(context_id) });
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = context_id;
        Err(HostError(0))
    }
}

/// Answers the current request locally: `status`, `headers` and `body`.
pub fn send_local_response(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HostError> {
    let serialized = serialize_pairs(headers);
    #[cfg(target_arch = "wasm32")]
    // SAFETY: pointers and lengths of live buffers.
    let result = unsafe {
        abi::proxy_send_local_response(
            u32::from(status),
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            serialized.as_ptr(),
            serialized.len(),
            -1,
        )
    };
    #[cfg(not(target_arch = "wasm32"))]
    let result = {
        let _ = (status, body, serialized);
        u32::MAX
    };
    check(result)
}

/// The ABI's header-pairs encoding: a count, (name, value) lengths, then
/// each name and value followed by a NUL.
fn serialize_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = Vec::with_capacity(
        4 + pairs
            .iter()
            .map(|(k, v)| k.len() + v.len() + 10)
            .sum::<usize>(),
    );
    out.extend_from_slice(&len32(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Defines a metric; `None` when the host refuses (the metric is then a no-op).
pub fn define_metric(kind: MetricKind, name: &str) -> Option<u32> {
    #[cfg(target_arch = "wasm32")]
    {
        let mut id = 0u32;
        // SAFETY: name pointer and length of a live str; out pointer valid.
        let status =
            unsafe { abi::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
        (status == OK).then_some(id)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (kind, name);
        None
    }
}

/// Adds `offset` to a counter or gauge.
pub fn increment_metric(id: u32, offset: i64) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: plain value call.
    unsafe {
        abi::proxy_increment_metric(id, offset);
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (id, offset);
}

/// Sets a gauge or records a histogram value.
pub fn record_metric(id: u32, value: u64) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: plain value call.
    unsafe {
        abi::proxy_record_metric(id, value);
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (id, value);
}

/// Proxy-wasm shared data, process-wide per `vm_id`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Result<Versioned, StoreError> {
        #[cfg(target_arch = "wasm32")]
        {
            let mut data: *mut u8 = std::ptr::null_mut();
            let mut size: usize = 0;
            let mut cas: u32 = 0;
            // SAFETY: key pointer and length of a live str; out pointers valid.
            let status = unsafe {
                abi::proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas)
            };
            match status {
                OK => Ok(Versioned {
                    value: (!data.is_null()).then(|| owned(data, size)),
                    cas: (cas != 0).then_some(cas),
                }),
                NOT_FOUND => Ok(Versioned {
                    value: None,
                    cas: None,
                }),
                _ => Err(StoreError::Host),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = key;
            Err(StoreError::Host)
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        #[cfg(target_arch = "wasm32")]
        {
            // SAFETY: pointers and lengths of live buffers.
            let status = unsafe {
                abi::proxy_set_shared_data(
                    key.as_ptr(),
                    key.len(),
                    value.as_ptr(),
                    value.len(),
                    cas.unwrap_or(0),
                )
            };
            match status {
                OK => Ok(()),
                CAS_MISMATCH => Err(StoreError::CasMismatch),
                _ => Err(StoreError::Host),
            }
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (key, value, cas);
            Err(StoreError::Host)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_pairs_follow_the_abi_layout() {
        let bytes = serialize_pairs(&[("a", "xy"), ("bc", "")]);
        let mut expected = Vec::new();
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&2u32.to_le_bytes());
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(b"a\0xy\0bc\0\0");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn header_snapshots_read_the_abi_layout_and_survive_lies() {
        let bytes = serialize_pairs(&[(":path", "/v1/chat/completions"), ("x-tenant-id", "acme")]);
        let headers = Headers::parse(bytes.clone());
        assert_eq!(headers.text(":path"), Some("/v1/chat/completions"));
        assert_eq!(headers.get("x-tenant-id"), Some(&b"acme"[..]));
        assert!(!headers.has("authorization"));
        // Truncated, or a count far beyond the data: what fits, no panic.
        for cut in 0..bytes.len() {
            let _ = Headers::parse(bytes[..cut].to_vec()).get(":path");
        }
        let mut lying = bytes;
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let _ = Headers::parse(lying).get("x");
    }

    #[test]
    fn without_a_host_reads_are_empty_and_writes_fail() {
        assert_eq!(request_header("x"), None);
        assert!(set_header(Map::RequestHeaders, "x", Some("y")).is_err());
        assert_eq!(property_u64(&["response", "flags"]), None);
        assert!(HostStore.get("k").is_err());
        assert_eq!(now(), Timestamp::ZERO);
    }
}
