//! One worker VM: a wasmtime `Store` running one instance of a filter module.
//!
//! Envoy runs one VM per worker thread for each plugin; the contexts of a
//! stream live in the VM of the worker that accepted the connection. The
//! harness does the same: a [`crate::Host`] holds, per plugin, one
//! [`WorkerVm`] per worker, all sharing one [`crate::world::World`].

mod hostcalls;
mod wasi;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use anyhow::anyhow;
use wasmtime::{Caller, Extern, InstancePre, Linker, Memory, Store, TypedFunc};

use crate::abi::{MetricType, Status, StreamType};
use crate::census::{Census, Phase};
use crate::headers::HeaderMap;
use crate::module_cache::{FilterModule, engine};
use crate::prng::Prng;
use crate::properties::PluginIdentity;
use crate::stream_data::{Access, SharedStream};
use crate::world::World;

/// A local reply a filter asked for (`proxy_send_local_response`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    /// `response.code_details` (spaces replaced by `_`, as Envoy does).
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// -1 when unset (the SDK's default).
    pub grpc_status: i32,
}

/// What a filter asked of its stream during a callback; Envoy defers these
/// until the VM call returns, and so does the harness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamAction {
    Continue(StreamType),
    Close(StreamType),
    LocalReply(LocalReply),
}

/// An HTTP call a filter dispatched (`proxy_http_call`).
#[derive(Clone, Debug)]
pub struct OutgoingCall {
    /// Context that dispatched it (the callback's effective context).
    pub context_id: u32,
    pub token: u32,
    pub cluster: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
    /// 0 means no timeout.
    pub timeout_ms: u32,
}

/// The answer to an [`OutgoingCall`].
#[derive(Clone, Debug, Default)]
pub struct CallResponse {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub trailers: HeaderMap,
}

/// An HTTP context's view of its stream.
pub(crate) struct StreamContext {
    pub stream: SharedStream,
    pub access: Access,
}

/// Which configuration buffer is readable (only during the matching callback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConfigPhase {
    None,
    VmStart,
    Configure,
}

/// Everything the host functions of one VM need: the `Store`'s data.
pub struct VmState {
    pub(crate) world: Rc<RefCell<World>>,
    pub(crate) identity: Rc<PluginIdentity>,
    pub(crate) plugin: usize,
    pub(crate) worker: usize,
    pub(crate) plugin_configuration: Rc<Vec<u8>>,
    pub(crate) vm_configuration: Rc<Vec<u8>>,
    pub(crate) memory: Option<Memory>,
    pub(crate) allocate: Option<TypedFunc<u32, u32>>,
    pub(crate) root_context_id: u32,
    /// Context of the callback being run.
    pub(crate) current_context: u32,
    /// Context host calls act on (`proxy_set_effective_context`).
    pub(crate) effective_context: u32,
    pub(crate) contexts: HashMap<u32, StreamContext>,
    pub(crate) config_phase: ConfigPhase,
    /// Set when the guest changed its tick period; the host reschedules.
    pub(crate) tick_period_ms: Option<u32>,
    pub(crate) metric_ids: HashMap<u32, (String, MetricType)>,
    pub(crate) next_metric_serial: u32,
    pub(crate) next_call_token: u32,
    pub(crate) outgoing_calls: Vec<OutgoingCall>,
    /// Outstanding call tokens and the context that owns each.
    pub(crate) pending_calls: HashMap<u32, u32>,
    /// The response being delivered by `on_http_call_response`.
    pub(crate) call_response: Option<CallResponse>,
    /// Stream actions by context id, in call order.
    pub(crate) actions: Vec<(u32, StreamAction)>,
    pub(crate) rng: Prng,
    /// Number of host calls that returned a non-Ok status the SDK would not expect.
    pub(crate) unsupported_calls: Vec<String>,
    /// The host's census of host calls, shared by every VM.
    pub(crate) census: Rc<RefCell<Census>>,
    /// Phase of the callback being run (set by the host before each call).
    pub(crate) phase: Phase,
    /// Census slot of the host function being run ([`crate::census::OTHER`] between calls).
    pub(crate) host_call: usize,
}

impl VmState {
    fn log_host(&self, level: crate::abi::LogLevel, message: String) {
        let name = self.identity.name.clone();
        self.world
            .borrow_mut()
            .log(level, &name, self.worker, message);
    }

    /// The context host calls act on.
    pub(crate) fn effective(&self) -> u32 {
        self.effective_context
    }
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
pub(crate) type HttpCallResponseFn = TypedFunc<(u32, u32, u32, u32, u32), ()>;

/// The `proxy_on_*` exports the host calls; each is optional (a module that
/// lacks one simply never gets that callback).
#[derive(Clone)]
pub(crate) struct Exports {
    pub on_context_create: Option<TypedFunc<(u32, u32), ()>>,
    pub on_vm_start: Option<TypedFunc<(u32, u32), u32>>,
    pub on_configure: Option<TypedFunc<(u32, u32), u32>>,
    pub on_tick: Option<TypedFunc<u32, ()>>,
    pub on_queue_ready: Option<TypedFunc<(u32, u32), ()>>,
    pub on_request_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    pub on_request_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    pub on_request_trailers: Option<TypedFunc<(u32, u32), u32>>,
    pub on_response_headers: Option<TypedFunc<(u32, u32, u32), u32>>,
    pub on_response_body: Option<TypedFunc<(u32, u32, u32), u32>>,
    pub on_response_trailers: Option<TypedFunc<(u32, u32), u32>>,
    pub on_http_call_response: Option<HttpCallResponseFn>,
    pub on_done: Option<TypedFunc<u32, u32>>,
    pub on_log: Option<TypedFunc<u32, ()>>,
    pub on_delete: Option<TypedFunc<u32, ()>>,
}

/// A linker with every host function, prepared for one module.
pub(crate) fn instance_pre(module: &FilterModule) -> anyhow::Result<InstancePre<VmState>> {
    let mut linker: Linker<VmState> = Linker::new(engine());
    let mut defined = std::collections::HashSet::new();
    hostcalls::define(&mut linker, &mut defined)
        .map_err(|e| anyhow!("defining host calls: {e}"))?;
    wasi::define(&mut linker, &mut defined).map_err(|e| anyhow!("defining WASI: {e}"))?;
    // Any other import gets a stub that logs and answers Unimplemented
    // (ENOSYS for WASI): a filter that calls it sees an error status, never a
    // link failure or a host panic.
    for import in module.module.imports() {
        let key = (import.module().to_owned(), import.name().to_owned());
        if defined.contains(&key) {
            continue;
        }
        let wasmtime::ExternType::Func(ty) = import.ty() else {
            return Err(anyhow!(
                "{}.{}: only function imports are supported",
                key.0,
                key.1
            ));
        };
        let is_wasi = key.0.starts_with("wasi");
        let label = format!("{}.{}", key.0, key.1);
        let stub_label = label.clone();
        linker
            .func_new(
                &key.0,
                &key.1,
                ty.clone(),
                move |mut caller: Caller<'_, VmState>, _params, results| {
                    let status = if is_wasi {
                        wasi::ENOSYS
                    } else {
                        Status::Unimplemented.code()
                    };
                    for (slot, result_ty) in results.iter_mut().zip(ty.results()) {
                        *slot = match result_ty {
                            wasmtime::ValType::I32 => wasmtime::Val::I32(status as i32),
                            wasmtime::ValType::I64 => wasmtime::Val::I64(0),
                            wasmtime::ValType::F32 => wasmtime::Val::F32(0),
                            wasmtime::ValType::F64 => wasmtime::Val::F64(0),
                            _ => wasmtime::Val::null_extern_ref(),
                        };
                    }
                    let state = caller.data_mut();
                    state.unsupported_calls.push(stub_label.clone());
                    state.log_host(
                        crate::abi::LogLevel::Warn,
                        format!("host: unimplemented import {stub_label} called"),
                    );
                    Ok(())
                },
            )
            .map_err(|e| anyhow!("stubbing {label}: {e}"))?;
    }
    linker
        .instantiate_pre(&module.module)
        .map_err(|e| anyhow!("linking {}: {e}", module.name))
}

/// One running instance of a filter module.
pub(crate) struct WorkerVm {
    pub store: Store<VmState>,
    pub exports: Exports,
    /// Why the VM stopped working (a trap), if it did.
    pub failed: Option<String>,
    /// The context whose callback trapped (its stream fails under every
    /// policy; later streams follow the policy).
    pub failed_context: Option<u32>,
    pub next_context_id: u32,
    /// Bumped when the tick period changes, so stale tick events are dropped.
    pub tick_generation: u64,
}

impl WorkerVm {
    pub fn instantiate(pre: &InstancePre<VmState>, state: VmState) -> anyhow::Result<Self> {
        let mut store = Store::new(engine(), state);
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| anyhow!("instantiating: {e}"))?;
        let memory = instance.get_memory(&mut store, "memory");
        store.data_mut().memory = memory;
        let allocate = instance
            .get_typed_func::<u32, u32>(&mut store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<u32, u32>(&mut store, "malloc"))
            .ok();
        store.data_mut().allocate = allocate;
        macro_rules! export {
            ($name:literal) => {
                instance.get_typed_func(&mut store, $name).ok()
            };
        }
        let exports = Exports {
            on_context_create: export!("proxy_on_context_create"),
            on_vm_start: export!("proxy_on_vm_start"),
            on_configure: export!("proxy_on_configure"),
            on_tick: export!("proxy_on_tick"),
            on_queue_ready: export!("proxy_on_queue_ready"),
            on_request_headers: export!("proxy_on_request_headers"),
            on_request_body: export!("proxy_on_request_body"),
            on_request_trailers: export!("proxy_on_request_trailers"),
            on_response_headers: export!("proxy_on_response_headers"),
            on_response_body: export!("proxy_on_response_body"),
            on_response_trailers: export!("proxy_on_response_trailers"),
            on_http_call_response: export!("proxy_on_http_call_response"),
            on_done: export!("proxy_on_done"),
            on_log: export!("proxy_on_log"),
            on_delete: export!("proxy_on_delete"),
        };
        if let Some(Extern::Func(init)) = instance.get_export(&mut store, "_initialize") {
            let init = init
                .typed::<(), ()>(&store)
                .map_err(|e| anyhow!("_initialize has an unexpected type: {e}"))?;
            init.call(&mut store, ())
                .map_err(|e| anyhow!("_initialize trapped: {e:?}"))?;
        }
        Ok(Self {
            store,
            exports,
            failed: None,
            failed_context: None,
            next_context_id: 1,
            tick_generation: 0,
        })
    }
}

// --- guest memory helpers shared by the host call modules ---

/// Reads guest memory as text, invalid UTF-8 replaced (header names and
/// values, property paths, log lines).
pub(crate) fn read_string(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    len: u32,
) -> Result<String, Status> {
    Ok(String::from_utf8_lossy(&read_bytes(caller, ptr, len)?).into_owned())
}

pub(crate) fn read_bytes(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    len: u32,
) -> Result<Vec<u8>, Status> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data(&*caller);
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    let bytes = data
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)?;
    let state = caller.data();
    state
        .census
        .borrow_mut()
        .copied_in(state.phase, state.host_call, bytes.len());
    Ok(bytes)
}

pub(crate) fn write_bytes(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    bytes: &[u8],
) -> Result<(), Status> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    let data = memory.data_mut(&mut *caller);
    let start = ptr as usize;
    let end = start
        .checked_add(bytes.len())
        .ok_or(Status::InvalidMemoryAccess)?;
    data.get_mut(start..end)
        .ok_or(Status::InvalidMemoryAccess)?
        .copy_from_slice(bytes);
    let state = caller.data();
    state
        .census
        .borrow_mut()
        .copied_out(state.phase, state.host_call, bytes.len());
    Ok(())
}

pub(crate) fn write_u32(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    value: u32,
) -> Result<(), Status> {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

pub(crate) fn write_u64(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    value: u64,
) -> Result<(), Status> {
    write_bytes(caller, ptr, &value.to_le_bytes())
}

/// Hands bytes to the guest: allocates with `proxy_on_memory_allocate`, copies,
/// and writes the pointer and size. Empty data is returned as (0, 0), as
/// Envoy does (the SDK then reads "no value" or an empty one).
pub(crate) fn copy_out(
    caller: &mut Caller<'_, VmState>,
    bytes: &[u8],
    ptr_ptr: u32,
    size_ptr: u32,
) -> Result<(), Status> {
    if bytes.is_empty() {
        write_u32(caller, ptr_ptr, 0)?;
        return write_u32(caller, size_ptr, 0);
    }
    let allocate = caller
        .data()
        .allocate
        .clone()
        .ok_or(Status::InvalidMemoryAccess)?;
    let ptr = allocate
        .call(&mut *caller, bytes.len() as u32)
        .map_err(|_| Status::InvalidMemoryAccess)?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess);
    }
    write_bytes(caller, ptr, bytes)?;
    write_u32(caller, ptr_ptr, ptr)?;
    write_u32(caller, size_ptr, bytes.len() as u32)
}

/// Turns a host call result into the status returned to the guest.
pub(crate) fn status_of(result: Result<(), Status>) -> u32 {
    match result {
        Ok(()) => Status::Ok.code(),
        Err(status) => status.code(),
    }
}
