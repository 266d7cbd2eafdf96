//! `proxy_get_property` with Envoy's encodings.
//!
//! Envoy evaluates a property path as a CEL attribute and serializes the value
//! natively (`serializeValue` in Envoy's wasm `context.cc`): strings and bytes
//! raw; int64, uint64, double, durations (ns) and timestamps (ns since the
//! epoch) as 8 little-endian bytes; bools as 1 byte; maps and lists in the
//! proxy-wasm pair format; protobuf messages in wire format. The harness
//! produces the same bytes for the paths sluice's filters read.

use crate::abi::Status;
use crate::headers::{HeaderMap, serialize_pairs};
use crate::stream_data::{Access, StreamData};
use crate::world::{Locality, NodeInfo};

/// Plugin identity for `plugin_name`, `plugin_root_id`, `plugin_vm_id`.
#[derive(Clone, Debug)]
pub struct PluginIdentity {
    pub name: String,
    pub root_id: String,
    pub vm_id: String,
}

/// What a property lookup may read.
pub struct PropertyScope<'a> {
    pub plugin: &'a PluginIdentity,
    pub node: &'a NodeInfo,
    /// The stream of the calling context, with what the context may access;
    /// `None` in root-context callbacks (Envoy has no stream info there).
    pub stream: Option<(&'a StreamData, Access)>,
}

/// Looks up a NUL-separated property path.
pub fn get_property(scope: &PropertyScope<'_>, path: &[u8]) -> Result<Vec<u8>, Status> {
    let segments: Vec<&[u8]> = path.split(|&b| b == 0).collect();
    let Some((first, rest)) = segments.split_first() else {
        return Err(Status::NotFound);
    };
    let first = std::str::from_utf8(first).map_err(|_| Status::NotFound)?;
    let rest: Vec<&str> = rest
        .iter()
        .map(|s| std::str::from_utf8(s).map_err(|_| Status::NotFound))
        .collect::<Result<_, _>>()?;
    let value = lookup(scope, first, &rest)?;
    Ok(value)
}

fn i64_bytes(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn u64_bytes(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The serialization Envoy uses for a CEL map of strings.
fn string_map(pairs: &[(String, String)]) -> Vec<u8> {
    serialize_pairs(pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

fn only_leaf(rest: &[&str], value: Vec<u8>) -> Result<Vec<u8>, Status> {
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(Status::NotFound)
    }
}

fn lookup(scope: &PropertyScope<'_>, first: &str, rest: &[&str]) -> Result<Vec<u8>, Status> {
    match first {
        "plugin_name" => only_leaf(rest, scope.plugin.name.as_bytes().to_vec()),
        "plugin_root_id" => only_leaf(rest, scope.plugin.root_id.as_bytes().to_vec()),
        "plugin_vm_id" => only_leaf(rest, scope.plugin.vm_id.as_bytes().to_vec()),
        "connection_id" => stream_leaf(scope, rest, |_, _| Some(u64_bytes(1))),
        // Envoy 1.40 has no top-level `node`, `cluster_name`, `route_name` or
        // `listener_direction` any more (older Envoys had them as wasm
        // attributes): those names fall through to filter state below and read
        // NotFound. The values live under `xds.` (CEL's XDSWrapper).
        "xds" => {
            let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
            match *key {
                "node" => node(scope.node, rest),
                // The upstream cluster info: set when the route is resolved
                // (before the first filter's request headers callback).
                "cluster_name" => stream_leaf(scope, rest, |s, _| {
                    s.info.cluster_name.clone().map(String::into_bytes)
                }),
                "route_name" => stream_leaf(scope, rest, |s, _| {
                    s.info.route_name.clone().map(String::into_bytes)
                }),
                // The listener's `traffic_direction`: `sluice render envoy`
                // writes a static listener without one (UNSPECIFIED = 0).
                "listener_direction" => stream_leaf(scope, rest, |_, _| Some(i64_bytes(0))),
                _ => Err(Status::NotFound),
            }
        }
        "request" => request(scope, rest),
        "response" => response(scope, rest),
        "upstream" => upstream(scope, rest),
        "source" | "destination" => {
            let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
            stream_leaf(scope, rest, |s, _| {
                let address = if first == "source" {
                    &s.info.source_address
                } else {
                    &s.info.destination_address
                };
                match *key {
                    "address" => Some(address.clone().into_bytes()),
                    "port" => address
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<i64>().ok())
                        .map(i64_bytes),
                    _ => None,
                }
            })
        }
        "connection" => {
            let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
            stream_leaf(scope, rest, |_, _| match *key {
                "mtls" => Some(vec![0]),
                "requested_server_name" => Some(Vec::new()),
                "id" => Some(u64_bytes(1)),
                _ => None,
            })
        }
        other => {
            // Values set with `proxy_set_property` ("wasm." filter state in Envoy).
            let (stream, _) = scope.stream.ok_or(Status::NotFound)?;
            let value = stream
                .info
                .filter_state
                .get(other)
                .cloned()
                .ok_or(Status::NotFound)?;
            only_leaf(rest, value)
        }
    }
}

/// Evaluates a leaf on the stream; `NotFound` without a stream or a value.
fn stream_leaf(
    scope: &PropertyScope<'_>,
    rest: &[&str],
    f: impl FnOnce(&StreamData, Access) -> Option<Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let (stream, access) = scope.stream.ok_or(Status::NotFound)?;
    let value = f(stream, access).ok_or(Status::NotFound)?;
    only_leaf(rest, value)
}

fn header_string(map: Option<&HeaderMap>, name: &str) -> Option<Vec<u8>> {
    map?.get_bytes(name).map(<[u8]>::to_vec)
}

/// The `request.headers` / `response.headers` CEL map: one entry per name,
/// repeated values joined with `,` (Envoy's `getAllOfHeaderAsString`).
fn headers_map(map: Option<&HeaderMap>, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let empty = HeaderMap::new();
    let map = map.unwrap_or(&empty);
    if let Some((name, rest)) = rest.split_first() {
        let values = map.get_all_bytes(name);
        if values.is_empty() {
            return Err(Status::NotFound);
        }
        return only_leaf(rest, values.join(&b","[..]));
    }
    let mut names: Vec<&str> = map.iter().map(|(k, _)| k).collect();
    names.dedup();
    let mut seen = std::collections::BTreeSet::new();
    let pairs: Vec<(&str, Vec<u8>)> = names
        .into_iter()
        .filter(|n| seen.insert(*n))
        .map(|n| (n, map.get_all_bytes(n).join(&b","[..])))
        .collect();
    Ok(serialize_pairs(
        pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())),
    ))
}

fn request(scope: &PropertyScope<'_>, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let (stream, access) = scope.stream.ok_or(Status::NotFound)?;
    // `request` alone is a wrapper map Envoy cannot list.
    let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
    let headers = (access.request_headers || access.access_log).then_some(&stream.request_headers);
    let path = headers.and_then(|h| h.get(":path")).unwrap_or_default();
    let value = match *key {
        "headers" => return headers_map(headers, rest),
        "time" => Some(i64_bytes(stream.info.start_time_ns as i64)),
        "duration" => stream.info.request_duration_ns.map(|d| i64_bytes(d as i64)),
        "protocol" => Some(stream.info.protocol.clone().into_bytes()),
        "path" => header_string(headers, ":path"),
        "url_path" => headers.map(|_| {
            path.split('?')
                .next()
                .unwrap_or_default()
                .as_bytes()
                .to_vec()
        }),
        "query" => headers.map(|_| {
            let query = path.split_once('?').map(|(_, q)| q).unwrap_or_default();
            query
                .split('#')
                .next()
                .unwrap_or_default()
                .as_bytes()
                .to_vec()
        }),
        "host" => header_string(headers, ":authority"),
        "scheme" => header_string(headers, ":scheme"),
        "method" => header_string(headers, ":method"),
        "referer" => header_string(headers, "referer"),
        "id" => header_string(headers, "x-request-id"),
        "useragent" => header_string(headers, "user-agent"),
        "size" => match headers.and_then(|h| h.get("content-length")) {
            Some(cl) => cl.parse::<i64>().ok().map(i64_bytes),
            None => Some(i64_bytes(stream.info.bytes_received as i64)),
        },
        "total_size" => Some(i64_bytes(
            (stream.info.bytes_received + headers.map_or(0, |h| h.byte_size() as u64)) as i64,
        )),
        _ => None,
    };
    only_leaf(rest, value.ok_or(Status::NotFound)?)
}

fn response(scope: &PropertyScope<'_>, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let (stream, access) = scope.stream.ok_or(Status::NotFound)?;
    let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
    let headers =
        (access.response_headers || access.access_log).then_some(&stream.response_headers);
    let trailers =
        (access.response_trailers || access.access_log).then_some(&stream.response_trailers);
    let value = match *key {
        "headers" => return headers_map(headers, rest),
        "trailers" => return headers_map(trailers, rest),
        "code" => stream.info.response_code.map(|c| i64_bytes(i64::from(c))),
        "code_details" => stream
            .info
            .response_code_details
            .clone()
            .map(String::into_bytes),
        "flags" => Some(i64_bytes(stream.info.response_flags as i64)),
        "size" => Some(i64_bytes(stream.info.bytes_sent as i64)),
        "total_size" => Some(i64_bytes(
            (stream.info.bytes_sent
                + headers.map_or(0, |h| h.byte_size() as u64)
                + trailers.map_or(0, |h| h.byte_size() as u64)) as i64,
        )),
        "grpc_status" => None,
        _ => None,
    };
    only_leaf(rest, value.ok_or(Status::NotFound)?)
}

fn upstream(scope: &PropertyScope<'_>, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let (stream, _) = scope.stream.ok_or(Status::NotFound)?;
    let (key, rest) = rest.split_first().ok_or(Status::SerializationFailure)?;
    let host = stream.info.upstream_host.as_ref();
    match *key {
        "address" => only_leaf(
            rest,
            host.ok_or(Status::NotFound)?.address.clone().into_bytes(),
        ),
        "port" => only_leaf(
            rest,
            i64_bytes(host.and_then(|h| h.port()).ok_or(Status::NotFound)?),
        ),
        "request_attempt_count" => only_leaf(rest, u64_bytes(stream.info.attempt_count)),
        "locality" => locality(&host.ok_or(Status::NotFound)?.locality, rest),
        _ => Err(Status::NotFound),
    }
}

fn node(node: &NodeInfo, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let Some((key, rest)) = rest.split_first() else {
        return Ok(node_proto(node));
    };
    match *key {
        "id" => only_leaf(rest, node.id.as_bytes().to_vec()),
        "cluster" => only_leaf(rest, node.cluster.as_bytes().to_vec()),
        "metadata" => {
            // A protobuf Struct becomes a CEL map; string values serialize raw.
            if let Some((field, rest)) = rest.split_first() {
                let value = node.metadata.get(*field).ok_or(Status::NotFound)?;
                return only_leaf(rest, value.as_bytes().to_vec());
            }
            let pairs: Vec<(String, String)> = node
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Ok(string_map(&pairs))
        }
        "locality" => locality(&node.locality, rest),
        _ => Err(Status::NotFound),
    }
}

fn locality(locality: &Locality, rest: &[&str]) -> Result<Vec<u8>, Status> {
    let Some((key, rest)) = rest.split_first() else {
        return Ok(locality_proto(locality));
    };
    let value = match *key {
        "region" => &locality.region,
        "zone" => &locality.zone,
        "sub_zone" => &locality.sub_zone,
        _ => return Err(Status::NotFound),
    };
    only_leaf(rest, value.as_bytes().to_vec())
}

// --- protobuf wire format, just enough for Node, Locality and Struct ---

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field; empty values are omitted, as proto3 does.
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `envoy.config.core.v3.Locality` (region = 1, zone = 2, sub_zone = 3).
pub fn locality_proto(l: &Locality) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, l.region.as_bytes());
    put_bytes(&mut out, 2, l.zone.as_bytes());
    put_bytes(&mut out, 3, l.sub_zone.as_bytes());
    out
}

/// `envoy.config.core.v3.Node` with id = 1, cluster = 2, metadata = 3 (a
/// `google.protobuf.Struct` of string values), locality = 4.
pub fn node_proto(node: &NodeInfo) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, node.id.as_bytes());
    put_bytes(&mut out, 2, node.cluster.as_bytes());
    let mut strukt = Vec::new();
    for (k, v) in &node.metadata {
        let mut value = Vec::new();
        // google.protobuf.Value.string_value = 3; always emitted (oneof).
        put_varint(&mut value, 3 << 3 | 2);
        put_varint(&mut value, v.len() as u64);
        value.extend_from_slice(v.as_bytes());
        let mut entry = Vec::new();
        put_bytes(&mut entry, 1, k.as_bytes());
        put_varint(&mut entry, 2 << 3 | 2);
        put_varint(&mut entry, value.len() as u64);
        entry.extend_from_slice(&value);
        put_bytes(&mut strukt, 1, &entry);
    }
    put_bytes(&mut out, 3, &strukt);
    put_bytes(&mut out, 4, &locality_proto(&node.locality));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope_with<'a>(
        plugin: &'a PluginIdentity,
        node: &'a NodeInfo,
        stream: &'a StreamData,
    ) -> PropertyScope<'a> {
        let access = Access {
            request_headers: true,
            response_headers: true,
            ..Access::default()
        };
        PropertyScope {
            plugin,
            node,
            stream: Some((stream, access)),
        }
    }

    #[test]
    fn encodings_follow_envoy() {
        let plugin = PluginIdentity {
            name: "p".into(),
            root_id: "r".into(),
            vm_id: "v".into(),
        };
        let node = NodeInfo {
            locality: Locality::zone("eu", "eu-1a"),
            ..NodeInfo::default()
        };
        let stream = StreamData {
            request_headers: HeaderMap::from_pairs([(":path", "/a?b=1#f"), ("x", "1"), ("x", "2")]),
            info: crate::stream_data::StreamInfo {
                start_time_ns: 1_700_000_000_123_456_789,
                response_code: Some(503),
                attempt_count: 3,
                ..Default::default()
            },
            ..StreamData::default()
        };
        let scope = scope_with(&plugin, &node, &stream);
        let get = |p: &str| get_property(&scope, p.replace('.', "\0").as_bytes());
        assert_eq!(get("request.path").unwrap(), b"/a?b=1#f");
        assert_eq!(get("request.url_path").unwrap(), b"/a");
        assert_eq!(get("request.query").unwrap(), b"b=1");
        assert_eq!(
            get("request.time").unwrap(),
            1_700_000_000_123_456_789i64.to_le_bytes()
        );
        assert_eq!(get("response.code").unwrap(), 503i64.to_le_bytes());
        assert_eq!(
            get("upstream.request_attempt_count").unwrap(),
            3u64.to_le_bytes()
        );
        assert_eq!(get("request.headers.x").unwrap(), b"1,2");
        let mut raw = stream.clone();
        raw.request_headers.add_bytes("x-tenant-id", b"t\xff");
        raw.request_headers.add_bytes("x-tenant-id", b"\x80");
        let raw_scope = scope_with(&plugin, &node, &raw);
        assert_eq!(
            get_property(&raw_scope, b"request\0headers\0x-tenant-id").unwrap(),
            b"t\xff,\x80",
            "header properties carry the value's bytes"
        );
        assert_eq!(get("xds.node.locality.zone").unwrap(), b"eu-1a");
        assert_eq!(
            get("xds.node.locality").unwrap(),
            b"\x0a\x02eu\x12\x05eu-1a"
        );
        // Envoy 1.40: no top-level wasm attributes besides plugin_* and connection_id.
        for gone in [
            "node.id",
            "cluster_name",
            "route_name",
            "listener_direction",
        ] {
            assert_eq!(get(gone), Err(Status::NotFound), "{gone}");
        }
        assert_eq!(get("plugin_root_id").unwrap(), b"r");
        assert_eq!(get("upstream.address"), Err(Status::NotFound));
        assert_eq!(get("request"), Err(Status::SerializationFailure));
        assert_eq!(get("nope"), Err(Status::NotFound));
    }
}
