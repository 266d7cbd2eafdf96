//! Header maps as Envoy keeps them, and the proxy-wasm pair serialization.
//!
//! Envoy lowercases names, keeps insertion order, and keeps pseudo-headers
//! (`:method`, `:path`, ...) in front of regular ones. `replace` removes every
//! entry of a name and appends one (Envoy's `setCopy`), `get` returns the first
//! value. A filter can observe all of this, so the harness copies it.
//!
//! Values are bytes, as in Envoy: a client may send `x-tenant-id: \xff`, and
//! Envoy hands exactly those bytes to the guest (the Rust SDK's `String`
//! helpers then panic on them; a filter that reads identities must use the
//! `_bytes` variants). The `&str` accessors stay for the common case and show
//! a value that is not UTF-8 with U+FFFD replacements; the `_bytes` accessors
//! and the serialization always carry the exact bytes.

use std::borrow::Cow;
use std::fmt;

/// A header value: arbitrary bytes, with a text view.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderValue {
    bytes: Vec<u8>,
    /// The lossy text of `bytes`, kept only when they are not UTF-8 (so
    /// [`HeaderValue::as_str`] can lend a `&str` without allocating per call).
    lossy: Option<Box<str>>,
}

impl HeaderValue {
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let lossy = match String::from_utf8_lossy(bytes) {
            Cow::Borrowed(_) => None,
            Cow::Owned(text) => Some(text.into_boxed_str()),
        };
        Self {
            bytes: bytes.to_vec(),
            lossy,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The value as text; bytes that are not UTF-8 read as U+FFFD.
    pub fn as_str(&self) -> &str {
        match &self.lossy {
            Some(text) => text,
            // Valid UTF-8 whenever `lossy` is None (checked in `from_bytes`).
            None => std::str::from_utf8(&self.bytes).unwrap_or_default(),
        }
    }

    /// Whether the bytes are UTF-8 (the `&str` view is then exact).
    pub fn is_utf8(&self) -> bool {
        self.lossy.is_none()
    }
}

impl From<&str> for HeaderValue {
    fn from(text: &str) -> Self {
        Self {
            bytes: text.as_bytes().to_vec(),
            lossy: None,
        }
    }
}

impl fmt::Debug for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_utf8() {
            fmt::Debug::fmt(self.as_str(), f)
        } else {
            write!(f, "b\"{}\"", self.bytes.escape_ascii())
        }
    }
}

/// An ordered, case-insensitive multimap of header names to byte values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HeaderMap {
    entries: Vec<(String, HeaderValue)>,
}

impl HeaderMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a map from pairs, lowercasing names (pseudo-headers move first).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut map = Self::new();
        for (k, v) in pairs {
            map.add(k.as_ref(), v.as_ref());
        }
        map
    }

    /// Builds a map from byte pairs (as a guest serializes them); names that
    /// are not UTF-8 are kept lossily (Envoy's codecs reject such names).
    pub fn from_byte_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut map = Self::new();
        for (k, v) in pairs {
            map.add_bytes(&String::from_utf8_lossy(k.as_ref()), v.as_ref());
        }
        map
    }

    /// Number of entries (a repeated name counts once per value).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, name: &str) -> Option<&HeaderValue> {
        // Stored names are lowercase: compare without allocating.
        self.entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// First value of `name` (case-insensitive), as text.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).map(HeaderValue::as_str)
    }

    /// First value of `name` (case-insensitive), byte-exact.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.find(name).map(HeaderValue::as_bytes)
    }

    /// Every value of `name`, in order, as text.
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of `name`, in order, byte-exact.
    pub fn get_all_bytes(&self, name: &str) -> Vec<&[u8]> {
        self.entries
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_bytes())
            .collect()
    }

    /// Appends an entry; a pseudo-header goes after the last pseudo-header.
    pub fn add(&mut self, name: &str, value: &str) {
        self.insert(name, HeaderValue::from(value));
    }

    /// Appends an entry with a value of arbitrary bytes.
    pub fn add_bytes(&mut self, name: &str, value: &[u8]) {
        self.insert(name, HeaderValue::from_bytes(value));
    }

    fn insert(&mut self, name: &str, value: HeaderValue) {
        let name = name.to_ascii_lowercase();
        if name.starts_with(':') {
            let at = self
                .entries
                .iter()
                .take_while(|(k, _)| k.starts_with(':'))
                .count();
            self.entries.insert(at, (name, value));
        } else {
            self.entries.push((name, value));
        }
    }

    /// Removes every entry of `name`, then appends one (Envoy's `setCopy`).
    pub fn replace(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.add(name, value);
    }

    /// [`HeaderMap::replace`] with a value of arbitrary bytes.
    pub fn replace_bytes(&mut self, name: &str, value: &[u8]) {
        self.remove(name);
        self.add_bytes(name, value);
    }

    /// Removes every entry of `name`.
    pub fn remove(&mut self, name: &str) {
        self.entries.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// Entries in order, values as text.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Entries in order, values byte-exact.
    pub fn iter_bytes(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_bytes()))
    }

    /// Entries as owned pairs, in order, values as text.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Sum of name and value lengths in bytes (Envoy's `byteSize`).
    pub fn byte_size(&self) -> usize {
        self.entries
            .iter()
            .map(|(k, v)| k.len() + v.as_bytes().len())
            .sum()
    }

    /// The proxy-wasm serialization of this map (see [`serialize_pairs`]).
    pub fn serialize(&self) -> Vec<u8> {
        serialize_pairs(
            self.entries
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        )
    }
}

impl fmt::Debug for HeaderMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.iter()).finish()
    }
}

/// Serializes pairs the way the SDK parses them: a little-endian u32 count,
/// then a (name length, value length) u32 pair per entry, then every name and
/// value each followed by a NUL byte.
pub fn serialize_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone,
) -> Vec<u8> {
    let count = pairs.clone().into_iter().count();
    let data: usize = pairs
        .clone()
        .into_iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + count * 8 + data);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses the pair serialization; `None` when the bytes are malformed (a guest
/// bug the host reports as `BadArgument`, never a panic). Empty input is an
/// empty map, as in Envoy.
pub fn deserialize_pairs(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let read_u32 = |at: usize| -> Option<usize> {
        let slice = bytes.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes(slice.try_into().ok()?) as usize)
    };
    let count = read_u32(0)?;
    let mut data_at = 4usize.checked_add(count.checked_mul(8)?)?;
    if data_at > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = read_u32(4 + i * 8)?;
        let value_len = read_u32(8 + i * 8)?;
        let key = bytes.get(data_at..data_at.checked_add(key_len)?)?.to_vec();
        data_at = data_at.checked_add(key_len)?.checked_add(1)?;
        let value = bytes
            .get(data_at..data_at.checked_add(value_len)?)?
            .to_vec();
        data_at = data_at.checked_add(value_len)?.checked_add(1)?;
        pairs.push((key, value));
    }
    Some(pairs)
}

/// Lossy UTF-8 view of parsed pairs (header names and values in tests are text).
pub fn pairs_to_strings(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, String)> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialization_matches_the_sdk_layout() {
        let map = HeaderMap::from_pairs([(":method", "GET"), (":path", "/bytes/1")]);
        let bytes = map.serialize();
        let expected: Vec<u8> = [
            &2u32.to_le_bytes()[..],
            &7u32.to_le_bytes(),
            &3u32.to_le_bytes(),
            &5u32.to_le_bytes(),
            &8u32.to_le_bytes(),
            b":method\0GET\0:path\0/bytes/1\0",
        ]
        .concat();
        assert_eq!(bytes, expected);
        let back = pairs_to_strings(deserialize_pairs(&bytes).unwrap());
        assert_eq!(back, map.to_pairs());
    }

    #[test]
    fn malformed_pairs_are_rejected_not_panicking() {
        assert!(deserialize_pairs(&[5, 0, 0, 0, 1]).is_none());
        assert!(deserialize_pairs(&[1, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0]).is_none());
        assert_eq!(deserialize_pairs(&[]).unwrap(), vec![]);
    }

    #[test]
    fn values_that_are_not_utf8_keep_their_bytes() {
        let mut map = HeaderMap::from_pairs([(":path", "/")]);
        map.add_bytes("x-tenant-id", b"t\xff\xfe1");
        map.add("x-tenant-id", "plain");
        assert_eq!(map.get_bytes("X-Tenant-Id"), Some(&b"t\xff\xfe1"[..]));
        assert_eq!(map.get("x-tenant-id"), Some("t\u{fffd}\u{fffd}1"));
        assert_eq!(
            map.get_all_bytes("x-tenant-id"),
            [&b"t\xff\xfe1"[..], b"plain"]
        );
        assert_eq!(map.byte_size(), 5 + 1 + 11 + 4 + 11 + 5);
        let pairs = deserialize_pairs(&map.serialize()).unwrap();
        assert_eq!(pairs[1], (b"x-tenant-id".to_vec(), b"t\xff\xfe1".to_vec()));
        assert_eq!(HeaderMap::from_byte_pairs(pairs), map);
        assert_eq!(
            format!("{map:?}"),
            r#"[(":path", "/"), ("x-tenant-id", b"t\xff\xfe1"), ("x-tenant-id", "plain")]"#
        );
    }

    #[test]
    fn pseudo_headers_stay_in_front_and_replace_appends() {
        let mut map = HeaderMap::from_pairs([("accept", "*/*"), (":path", "/")]);
        map.add(":method", "POST");
        map.add("X-Foo", "1");
        map.add("x-foo", "2");
        assert_eq!(map.get("X-FOO"), Some("1"));
        map.replace("accept", "json");
        let names: Vec<_> = map.iter().map(|(k, _)| k.to_owned()).collect();
        assert_eq!(names, [":path", ":method", "x-foo", "x-foo", "accept"]);
    }
}
