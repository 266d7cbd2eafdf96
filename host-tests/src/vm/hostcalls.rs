//! The `env.proxy_*` host functions of ABI 0.2.1, with Envoy's behaviour.
//!
//! Every function validates what the guest passes and answers with a status:
//! out-of-bounds pointers give `InvalidMemoryAccess`, malformed maps and
//! unknown enum values `BadArgument`. Nothing a guest passes can panic the host.

use std::collections::HashSet;

use wasmtime::{Caller, Linker};

use super::{
    CallResponse, ConfigPhase, LocalReply, OutgoingCall, StreamAction, VmState, copy_out,
    read_bytes, read_string, status_of, write_u32, write_u64,
};
use crate::abi::{BufferType, LogLevel, MapType, MetricType, Status, StreamType};
use crate::census::{OTHER, host_call_index};
use crate::headers::{HeaderMap, deserialize_pairs, pairs_to_strings};
use crate::properties::{PropertyScope, get_property};
use crate::world::QueueOwner;

type C<'a> = Caller<'a, VmState>;
type R = Result<(), Status>;

/// Registers every host function on `linker`, recording the names in `defined`.
pub(super) fn define(
    linker: &mut Linker<VmState>,
    defined: &mut HashSet<(String, String)>,
) -> wasmtime::Result<()> {
    macro_rules! host {
        ($name:literal, |$caller:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {{
            defined.insert(("env".to_owned(), $name.to_owned()));
            let slot = host_call_index($name);
            linker.func_wrap("env", $name, move |mut $caller: C<'_>, $($arg: $ty),*| -> u32 {
                enter(&mut $caller, slot);
                #[allow(clippy::redundant_closure_call)]
                let result: R = (|| $body)();
                $caller.data_mut().host_call = OTHER;
                status_of(result)
            })?;
        }};
    }

    host!("proxy_log", |caller, level: u32, ptr: u32, len: u32| {
        let level = LogLevel::from_raw(level).ok_or(Status::BadArgument)?;
        let message = read_string(&mut caller, ptr, len)?;
        let state = caller.data();
        let name = state.identity.name.clone();
        state
            .world
            .borrow_mut()
            .log(level, &name, state.worker, message);
        Ok(())
    });
    host!("proxy_get_log_level", |caller, ret: u32| {
        let level = caller.data().world.borrow().log_level as u32;
        write_u32(&mut caller, ret, level)
    });
    host!("proxy_get_current_time_nanoseconds", |caller, ret: u32| {
        let now = caller.data().world.borrow().now_ns;
        write_u64(&mut caller, ret, now)
    });
    host!(
        "proxy_set_tick_period_milliseconds",
        |caller, period: u32| {
            caller.data_mut().tick_period_ms = Some(period);
            Ok(())
        }
    );
    host!(
        "proxy_get_buffer_bytes",
        |caller, kind: u32, start: u32, max: u32, ret_ptr: u32, ret_size: u32| {
            let bytes = read_buffer(&caller, kind)?;
            let start = start as usize;
            if start > bytes.len() {
                return Err(Status::BadArgument);
            }
            let end = start.saturating_add(max as usize).min(bytes.len());
            let slice = bytes[start..end].to_vec();
            copy_out(&mut caller, &slice, ret_ptr, ret_size)
        }
    );
    host!(
        "proxy_set_buffer_bytes",
        |caller, kind: u32, start: u32, size: u32, ptr: u32, len: u32| {
            let data = read_bytes(&mut caller, ptr, len)?;
            write_buffer(&mut caller, kind, start as usize, size as usize, data)
        }
    );
    host!(
        "proxy_get_header_map_pairs",
        |caller, map: u32, ret_ptr: u32, ret_size: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            // An inaccessible map reads as empty, as in Envoy.
            let bytes = with_map(&caller, map, false, |m| m.serialize()).unwrap_or_default();
            let bytes = if bytes.len() <= 4 { Vec::new() } else { bytes };
            copy_out(&mut caller, &bytes, ret_ptr, ret_size)
        }
    );
    host!(
        "proxy_set_header_map_pairs",
        |caller, map: u32, ptr: u32, len: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            let pairs = deserialize_pairs(&read_bytes(&mut caller, ptr, len)?)
                .ok_or(Status::BadArgument)?;
            with_map_mut(&caller, map, |m| *m = HeaderMap::from_byte_pairs(pairs))
        }
    );
    host!(
        "proxy_get_header_map_value",
        |caller, map: u32, key_ptr: u32, key_len: u32, ret_ptr: u32, ret_size: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            let key = read_string(&mut caller, key_ptr, key_len)?;
            // The value's bytes exactly as stored: Envoy does not check that
            // a value is UTF-8, and neither does the guest's ABI.
            let value = with_map(&caller, map, true, |m| {
                m.get_bytes(&key).map(<[u8]>::to_vec)
            })
            .ok_or(Status::BadArgument)?;
            let value = value.ok_or(Status::NotFound)?;
            copy_out(&mut caller, &value, ret_ptr, ret_size)
        }
    );
    host!(
        "proxy_remove_header_map_value",
        |caller, map: u32, key_ptr: u32, key_len: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            let key = read_string(&mut caller, key_ptr, key_len)?;
            with_map_mut(&caller, map, |m| m.remove(&key))
        }
    );
    host!(
        "proxy_replace_header_map_value",
        |caller, map: u32, key_ptr: u32, key_len: u32, val_ptr: u32, val_len: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            let key = read_string(&mut caller, key_ptr, key_len)?;
            let value = read_bytes(&mut caller, val_ptr, val_len)?;
            with_map_mut(&caller, map, |m| m.replace_bytes(&key, &value))
        }
    );
    host!(
        "proxy_add_header_map_value",
        |caller, map: u32, key_ptr: u32, key_len: u32, val_ptr: u32, val_len: u32| {
            let map = MapType::from_raw(map).ok_or(Status::BadArgument)?;
            let key = read_string(&mut caller, key_ptr, key_len)?;
            let value = read_bytes(&mut caller, val_ptr, val_len)?;
            with_map_mut(&caller, map, |m| m.add_bytes(&key, &value))
        }
    );
    host!(
        "proxy_get_property",
        |caller, path_ptr: u32, path_len: u32, ret_ptr: u32, ret_size: u32| {
            let path = read_bytes(&mut caller, path_ptr, path_len)?;
            let value = {
                let state = caller.data();
                let world = state.world.borrow();
                let stream_ctx = state.contexts.get(&state.effective());
                let stream = stream_ctx.map(|c| c.stream.borrow());
                let scope = PropertyScope {
                    plugin: &state.identity,
                    node: &world.node,
                    stream: stream.as_deref().zip(stream_ctx.map(|c| c.access)),
                };
                get_property(&scope, &path)?
            };
            copy_out(&mut caller, &value, ret_ptr, ret_size)
        }
    );
    host!(
        "proxy_set_property",
        |caller, path_ptr: u32, path_len: u32, val_ptr: u32, val_len: u32| {
            let path = read_bytes(&mut caller, path_ptr, path_len)?;
            let value = read_bytes(&mut caller, val_ptr, val_len)?;
            let state = caller.data();
            let ctx = state
                .contexts
                .get(&state.effective())
                .ok_or(Status::NotFound)?;
            let key = String::from_utf8_lossy(&path).replace('\0', ".");
            ctx.stream.borrow_mut().info.filter_state.insert(key, value);
            Ok(())
        }
    );
    host!(
        "proxy_get_shared_data",
        |caller, key_ptr: u32, key_len: u32, ret_ptr: u32, ret_size: u32, ret_cas: u32| {
            let key = read_bytes(&mut caller, key_ptr, key_len)?;
            let (value, cas) = {
                let state = caller.data();
                state
                    .world
                    .borrow()
                    .shared_data
                    .get(&state.identity.vm_id, &key)?
            };
            copy_out(&mut caller, &value, ret_ptr, ret_size)?;
            write_u32(&mut caller, ret_cas, cas)
        }
    );
    host!(
        "proxy_set_shared_data",
        |caller, key_ptr: u32, key_len: u32, val_ptr: u32, val_len: u32, cas: u32| {
            let key = read_bytes(&mut caller, key_ptr, key_len)?;
            let value = read_bytes(&mut caller, val_ptr, val_len)?;
            let state = caller.data();
            match state
                .world
                .borrow_mut()
                .shared_data
                .set(&state.identity.vm_id, &key, &value, cas)
            {
                Status::Ok => Ok(()),
                status => Err(status),
            }
        }
    );
    host!(
        "proxy_register_shared_queue",
        |caller, name_ptr: u32, name_len: u32, ret_id: u32| {
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let id = {
                let state = caller.data();
                let owner = QueueOwner {
                    plugin: state.plugin,
                    worker: state.worker,
                    context_id: state.effective(),
                };
                state
                    .world
                    .borrow_mut()
                    .queues
                    .register(&state.identity.vm_id, &name, owner)
            };
            write_u32(&mut caller, ret_id, id)
        }
    );
    host!(
        "proxy_resolve_shared_queue",
        |caller, vm_ptr: u32, vm_len: u32, name_ptr: u32, name_len: u32, ret_id: u32| {
            let vm_id = read_string(&mut caller, vm_ptr, vm_len)?;
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let id = {
                let state = caller.data();
                // An empty vm_id means this VM's own id.
                let vm_id = if vm_id.is_empty() {
                    state.identity.vm_id.clone()
                } else {
                    vm_id
                };
                state
                    .world
                    .borrow()
                    .queues
                    .resolve(&vm_id, &name)
                    .ok_or(Status::NotFound)?
            };
            write_u32(&mut caller, ret_id, id)
        }
    );
    host!(
        "proxy_dequeue_shared_queue",
        |caller, id: u32, ret_ptr: u32, ret_size: u32| {
            let value = caller.data().world.borrow_mut().queues.dequeue(id)?;
            copy_out(&mut caller, &value, ret_ptr, ret_size)
        }
    );
    host!(
        "proxy_enqueue_shared_queue",
        |caller, id: u32, ptr: u32, len: u32| {
            let value = read_bytes(&mut caller, ptr, len)?;
            match caller.data().world.borrow_mut().queues.enqueue(id, value) {
                Status::Ok => Ok(()),
                status => Err(status),
            }
        }
    );
    host!("proxy_continue_stream", |caller, kind: u32| {
        let kind = StreamType::from_raw(kind).ok_or(Status::BadArgument)?;
        match kind {
            StreamType::HttpRequest | StreamType::HttpResponse => {
                push_action(&mut caller, StreamAction::Continue(kind))
            }
            StreamType::Downstream => Ok(()),
            StreamType::Upstream => Err(Status::Unimplemented),
        }
    });
    host!("proxy_close_stream", |caller, kind: u32| {
        let kind = StreamType::from_raw(kind).ok_or(Status::BadArgument)?;
        match kind {
            StreamType::HttpRequest | StreamType::HttpResponse => {
                push_action(&mut caller, StreamAction::Close(kind))
            }
            StreamType::Downstream | StreamType::Upstream => Ok(()),
        }
    });
    host!(
        "proxy_send_local_response",
        |caller,
         status: u32,
         details_ptr: u32,
         details_len: u32,
         body_ptr: u32,
         body_len: u32,
         headers_ptr: u32,
         headers_len: u32,
         grpc_status: i32| {
            let details = read_string(&mut caller, details_ptr, details_len)?.replace(' ', "_");
            let body = read_bytes(&mut caller, body_ptr, body_len)?;
            let headers = pairs_to_strings(
                deserialize_pairs(&read_bytes(&mut caller, headers_ptr, headers_len)?)
                    .ok_or(Status::BadArgument)?,
            );
            push_action(
                &mut caller,
                StreamAction::LocalReply(LocalReply {
                    status,
                    details,
                    body,
                    headers,
                    grpc_status,
                }),
            )
        }
    );
    host!(
        "proxy_http_call",
        |caller,
         up_ptr: u32,
         up_len: u32,
         h_ptr: u32,
         h_len: u32,
         b_ptr: u32,
         b_len: u32,
         t_ptr: u32,
         t_len: u32,
         timeout: u32,
         ret_token: u32| {
            let cluster = read_string(&mut caller, up_ptr, up_len)?;
            let headers = deserialize_pairs(&read_bytes(&mut caller, h_ptr, h_len)?)
                .ok_or(Status::BadArgument)?;
            let body = read_bytes(&mut caller, b_ptr, b_len)?;
            let trailers = deserialize_pairs(&read_bytes(&mut caller, t_ptr, t_len)?)
                .ok_or(Status::BadArgument)?;
            if (timeout as i32) < 0 {
                return Err(Status::BadArgument);
            }
            let headers = HeaderMap::from_byte_pairs(headers);
            let token = {
                let state = caller.data_mut();
                if !state.world.borrow().cluster_names.contains(&cluster) {
                    return Err(Status::BadArgument);
                }
                // Envoy requires these three to build the request.
                if [":path", ":method", ":authority"]
                    .iter()
                    .any(|h| headers.get(h).is_none())
                {
                    return Err(Status::BadArgument);
                }
                state.next_call_token += 1;
                let token = state.next_call_token;
                let context_id = state.effective();
                state.pending_calls.insert(token, context_id);
                state.outgoing_calls.push(OutgoingCall {
                    context_id,
                    token,
                    cluster,
                    headers,
                    body,
                    trailers: HeaderMap::from_byte_pairs(trailers),
                    timeout_ms: timeout,
                });
                token
            };
            write_u32(&mut caller, ret_token, token)
        }
    );
    host!(
        "proxy_get_status",
        |caller, ret_code: u32, ret_ptr: u32, ret_size: u32| {
            write_u32(&mut caller, ret_code, 0)?;
            copy_out(&mut caller, b"", ret_ptr, ret_size)
        }
    );
    host!("proxy_set_effective_context", |caller, context_id: u32| {
        let state = caller.data_mut();
        if context_id == state.root_context_id || state.contexts.contains_key(&context_id) {
            state.effective_context = context_id;
            Ok(())
        } else {
            Err(Status::BadArgument)
        }
    });
    host!(
        "proxy_call_foreign_function",
        |caller,
         name_ptr: u32,
         name_len: u32,
         _args_ptr: u32,
         _args_len: u32,
         ret_ptr: u32,
         ret_size: u32| {
            let name = read_string(&mut caller, name_ptr, name_len)?;
            match name.as_str() {
                // The router re-reads request headers at the end of the chain, so
                // clearing the route cache has nothing more to do here.
                "clear_route_cache" => copy_out(&mut caller, b"", ret_ptr, ret_size),
                _ => {
                    caller
                        .data_mut()
                        .unsupported_calls
                        .push(format!("foreign function {name}"));
                    Err(Status::NotFound)
                }
            }
        }
    );
    host!("proxy_done", |caller| {
        let _ = &mut caller;
        Ok(())
    });
    host!(
        "proxy_define_metric",
        |caller, kind: u32, name_ptr: u32, name_len: u32, ret_id: u32| {
            let kind = MetricType::from_raw(kind).ok_or(Status::BadArgument)?;
            let name = read_string(&mut caller, name_ptr, name_len)?;
            let id = {
                let state = caller.data_mut();
                state.next_metric_serial += 1;
                let bits = match kind {
                    MetricType::Counter => 0,
                    MetricType::Gauge => 1,
                    MetricType::Histogram => 2,
                };
                let id = (state.next_metric_serial << 2) | bits;
                state.world.borrow_mut().metrics.define(&name, kind);
                state.metric_ids.insert(id, (name, kind));
                id
            };
            write_u32(&mut caller, ret_id, id)
        }
    );
    host!("proxy_get_metric", |caller, id: u32, ret: u32| {
        let value = {
            let state = caller.data();
            if id & 3 == 2 || id & 3 == 3 {
                return Err(Status::BadArgument);
            }
            let (name, _) = state.metric_ids.get(&id).ok_or(Status::NotFound)?;
            state.world.borrow().metrics.value(name)
        };
        write_u64(&mut caller, ret, value.max(0) as u64)
    });
    host!("proxy_record_metric", |caller, id: u32, value: u64| {
        let state = caller.data();
        let (name, kind) = state.metric_ids.get(&id).ok_or(Status::NotFound)?;
        let mut world = state.world.borrow_mut();
        let metric = world.metrics.get_mut(name).ok_or(Status::NotFound)?;
        match kind {
            MetricType::Counter => metric.value = metric.value.saturating_add(value as i64),
            MetricType::Gauge => metric.value = value as i64,
            MetricType::Histogram => metric.samples.push(value),
        }
        Ok(())
    });
    host!("proxy_increment_metric", |caller, id: u32, offset: i64| {
        let state = caller.data();
        if id & 3 >= 2 {
            return Err(Status::BadArgument);
        }
        let (name, kind) = state.metric_ids.get(&id).ok_or(Status::NotFound)?;
        if *kind == MetricType::Counter && offset <= 0 {
            return Err(Status::BadArgument);
        }
        let mut world = state.world.borrow_mut();
        let metric = world.metrics.get_mut(name).ok_or(Status::NotFound)?;
        metric.value = metric.value.saturating_add(offset);
        Ok(())
    });

    // gRPC is not simulated: answer with a status the SDK turns into an `Err`
    // (not a panic), and log it so a test sees why.
    macro_rules! unsupported {
        ($name:literal, $status:expr, |$caller:ident $(, $arg:ident : $ty:ty)*|) => {{
            defined.insert(("env".to_owned(), $name.to_owned()));
            let slot = host_call_index($name);
            linker.func_wrap("env", $name, move |mut $caller: C<'_>, $(_: $ty),*| -> u32 {
                enter(&mut $caller, slot);
                let state = $caller.data_mut();
                state.host_call = OTHER;
                state.unsupported_calls.push($name.to_owned());
                state.log_host(LogLevel::Warn, format!("host: {} is not simulated", $name));
                ($status as Status).code()
            })?;
        }};
    }
    unsupported!("proxy_grpc_call", Status::InternalFailure, |caller, a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32, j: u32, k: u32, l: u32|);
    unsupported!("proxy_grpc_stream", Status::InternalFailure, |caller, a: u32, b: u32, c: u32, d: u32, e: u32, f: u32, g: u32, h: u32, i: u32|);
    unsupported!("proxy_grpc_send", Status::NotFound, |caller, a: u32, b: u32, c: u32, d: u32|);
    unsupported!("proxy_grpc_cancel", Status::NotFound, |caller, a: u32|);
    unsupported!("proxy_grpc_close", Status::NotFound, |caller, a: u32|);
    Ok(())
}

/// Marks the start of a host call for the census.
fn enter(caller: &mut C<'_>, slot: usize) {
    let state = caller.data_mut();
    state.host_call = slot;
    state.census.borrow_mut().enter_host_call(state.phase, slot);
}

fn push_action(caller: &mut C<'_>, action: StreamAction) -> R {
    let state = caller.data_mut();
    let context_id = state.effective();
    // From a root context there is no stream to act on; Envoy returns Ok.
    if state.contexts.contains_key(&context_id) {
        state.actions.push((context_id, action));
    }
    Ok(())
}

fn read_buffer(caller: &C<'_>, kind: u32) -> Result<Vec<u8>, Status> {
    let kind = BufferType::from_raw(kind).ok_or(Status::BadArgument)?;
    let state = caller.data();
    let ctx = state.contexts.get(&state.effective());
    match kind {
        BufferType::HttpRequestBody => {
            let ctx = ctx.ok_or(Status::NotFound)?;
            Ok(if ctx.access.request_body {
                ctx.stream.borrow().request_body.clone()
            } else {
                Vec::new()
            })
        }
        BufferType::HttpResponseBody => {
            let ctx = ctx.ok_or(Status::NotFound)?;
            Ok(if ctx.access.response_body {
                ctx.stream.borrow().response_body.clone()
            } else {
                Vec::new()
            })
        }
        BufferType::HttpCallResponseBody => state
            .call_response
            .as_ref()
            .map(|r| r.body.clone())
            .ok_or(Status::NotFound),
        BufferType::VmConfiguration => Ok(state.vm_configuration.to_vec()),
        BufferType::PluginConfiguration => match state.config_phase {
            ConfigPhase::Configure => Ok(state.plugin_configuration.to_vec()),
            _ => Err(Status::NotFound),
        },
        _ => Err(Status::NotFound),
    }
}

/// Envoy's `Buffer::copyFrom`: prepend (start 0, size 0), replace (start 0,
/// size ≥ length), append (start ≥ length); anything else is `BadArgument`.
fn write_buffer(caller: &mut C<'_>, kind: u32, start: usize, size: usize, data: Vec<u8>) -> R {
    let kind = BufferType::from_raw(kind).ok_or(Status::BadArgument)?;
    let state = caller.data();
    let ctx = state
        .contexts
        .get(&state.effective())
        .ok_or(Status::NotFound)?;
    let mut stream = ctx.stream.borrow_mut();
    let buffer = match kind {
        BufferType::HttpRequestBody if ctx.access.request_body => &mut stream.request_body,
        BufferType::HttpResponseBody if ctx.access.response_body => &mut stream.response_body,
        BufferType::HttpRequestBody | BufferType::HttpResponseBody => return Err(Status::NotFound),
        _ => return Err(Status::BadArgument),
    };
    if start == 0 {
        if size == 0 {
            let mut joined = data;
            joined.extend_from_slice(buffer);
            *buffer = joined;
        } else if size >= buffer.len() {
            *buffer = data;
        } else {
            return Err(Status::BadArgument);
        }
    } else if start >= buffer.len() {
        buffer.extend_from_slice(&data);
    } else {
        return Err(Status::BadArgument);
    }
    Ok(())
}

/// Runs `f` on a readable map; `None` when the map is not available to the
/// calling context (Envoy: null map).
fn with_map<T>(
    caller: &C<'_>,
    map: MapType,
    _value_lookup: bool,
    f: impl FnOnce(&HeaderMap) -> T,
) -> Option<T> {
    let state = caller.data();
    match map {
        MapType::HttpCallResponseHeaders => {
            return state.call_response.as_ref().map(|r| f(&r.headers));
        }
        MapType::HttpCallResponseTrailers => {
            return state.call_response.as_ref().map(|r| f(&r.trailers));
        }
        _ => {}
    }
    let ctx = state.contexts.get(&state.effective())?;
    let stream = ctx.stream.borrow();
    let a = ctx.access;
    match map {
        MapType::RequestHeaders if a.request_headers || a.access_log => {
            Some(f(&stream.request_headers))
        }
        MapType::RequestTrailers if a.request_trailers => Some(f(&stream.request_trailers)),
        MapType::ResponseHeaders if a.response_headers || a.access_log => {
            Some(f(&stream.response_headers))
        }
        MapType::ResponseTrailers if a.response_trailers || a.access_log => {
            Some(f(&stream.response_trailers))
        }
        _ => None,
    }
}

fn with_map_mut(caller: &C<'_>, map: MapType, f: impl FnOnce(&mut HeaderMap)) -> R {
    let state = caller.data();
    let ctx = state
        .contexts
        .get(&state.effective())
        .ok_or(Status::BadArgument)?;
    let mut stream = ctx.stream.borrow_mut();
    let a = ctx.access;
    let target = match map {
        MapType::RequestHeaders if a.request_headers => &mut stream.request_headers,
        MapType::RequestTrailers if a.request_trailers => &mut stream.request_trailers,
        MapType::ResponseHeaders if a.response_headers => &mut stream.response_headers,
        MapType::ResponseTrailers if a.response_trailers => &mut stream.response_trailers,
        _ => return Err(Status::BadArgument),
    };
    f(target);
    Ok(())
}

#[allow(dead_code)]
fn _assert_types(_: CallResponse) {}
