//! Raw ABI calls that return the host's status instead of panicking.
//!
//! The Rust SDK panics on statuses it does not expect (for example
//! `BadArgument` from `get_property`). Those statuses are exactly what the probe
//! wants to record, so it declares the two imports it needs itself.

use std::ptr::null_mut;

/// `MapType::HttpRequestHeaders` in ABI 0.2.1.
pub const MAP_REQUEST_HEADERS: u32 = 0;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;

    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// Reads a property by dotted path (`request.headers.x-foo` splits on dots
/// except inside the last segment of `request.headers`).
pub fn get_property(path: &str) -> (u32, Option<Vec<u8>>) {
    let segments = split_path(path);
    let mut serialized = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            serialized.push(0);
        }
        serialized.extend_from_slice(segment.as_bytes());
    }
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer it allocated with
    // `proxy_on_memory_allocate` (a boxed slice of `size` bytes) or leaves null.
    let status =
        unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut size) };
    (status, take_host_bytes(data, size))
}

/// Reads one header value with its raw status.
pub fn get_header_map_value(map_type: u32, key: &str) -> (u32, Option<Vec<u8>>) {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `get_property`.
    let status = unsafe {
        proxy_get_header_map_value(map_type, key.as_ptr(), key.len(), &mut data, &mut size)
    };
    (status, take_host_bytes(data, size))
}

fn take_host_bytes(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: `data` came from the SDK's `proxy_on_memory_allocate(size)`,
    // which leaks a boxed slice of exactly `size` bytes.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

fn split_path(path: &str) -> Vec<&str> {
    // Header names contain no dots in practice, but keep `x.y` intact after
    // `headers` just in case.
    let mut out = Vec::new();
    let mut rest = path;
    while let Some((head, tail)) = rest.split_once('.') {
        out.push(head);
        rest = tail;
        if head == "headers" {
            break;
        }
    }
    out.push(rest);
    out
}

/// Names of the proxy-wasm statuses, as the SDK's `Status` debug output spells them.
pub fn status_name(status: u32) -> String {
    match status {
        0 => "Ok".to_owned(),
        1 => "NotFound".to_owned(),
        2 => "BadArgument".to_owned(),
        3 => "SerializationFailure".to_owned(),
        4 => "ParseFailure".to_owned(),
        6 => "InvalidMemoryAccess".to_owned(),
        7 => "Empty".to_owned(),
        8 => "CasMismatch".to_owned(),
        10 => "InternalFailure".to_owned(),
        12 => "Unimplemented".to_owned(),
        other => format!("Status({other})"),
    }
}

/// Decodes the proxy-wasm map serialization: a u32 count, then a (key length,
/// value length) u32 pair per entry, then each key and value followed by NUL.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let read_u32 = |at: usize| -> Option<usize> {
        let slice = bytes.get(at..at.checked_add(4)?)?;
        let array = <[u8; 4]>::try_from(slice).ok()?;
        usize::try_from(u32::from_le_bytes(array)).ok()
    };
    let count = read_u32(0)?;
    let mut data_at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = read_u32(4 + i * 8)?;
        let value_len = read_u32(8 + i * 8)?;
        let key = bytes.get(data_at..data_at.checked_add(key_len)?)?;
        data_at = data_at.checked_add(key_len + 1)?;
        let value = bytes.get(data_at..data_at.checked_add(value_len)?)?;
        data_at = data_at.checked_add(value_len + 1)?;
        pairs.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Some(pairs)
}
