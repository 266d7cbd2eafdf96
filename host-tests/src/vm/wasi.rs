//! The WASI preview1 functions a Rust `wasm32-wasip1` filter imports.
//!
//! Written by hand instead of pulling in `wasmtime-wasi`: a filter needs five
//! or six of them, the full crate doubles the host's build time, and the
//! harness needs them deterministic (random bytes from the seeded PRNG, time
//! from the virtual clock), which `wasmtime-wasi` is not.

use std::collections::HashSet;

use wasmtime::{Caller, Linker};

use super::{VmState, read_bytes, write_bytes, write_u32, write_u64};
use crate::abi::LogLevel;

const MODULE: &str = "wasi_snapshot_preview1";
const SUCCESS: u32 = 0;
const EBADF: u32 = 8;
const EINVAL: u32 = 28;
const EFAULT: u32 = 21;
/// "Function not supported", returned by every WASI call the harness lacks.
pub(super) const ENOSYS: u32 = 52;

type C<'a> = Caller<'a, VmState>;

pub(super) fn define(
    linker: &mut Linker<VmState>,
    defined: &mut HashSet<(String, String)>,
) -> wasmtime::Result<()> {
    for name in [
        "fd_write",
        "random_get",
        "environ_get",
        "environ_sizes_get",
        "args_get",
        "args_sizes_get",
        "clock_time_get",
        "proc_exit",
        "sched_yield",
        "fd_close",
        "fd_seek",
        "fd_fdstat_get",
        "fd_prestat_get",
        "fd_prestat_dir_name",
        "fd_read",
    ] {
        defined.insert((MODULE.to_owned(), name.to_owned()));
    }

    // stdout/stderr go to the log, like Envoy does (info / error).
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut caller: C<'_>, fd: u32, iovs: u32, iovs_len: u32, nwritten: u32| -> u32 {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            let mut text = Vec::new();
            for i in 0..iovs_len {
                let Ok(iov) = read_bytes(&mut caller, iovs.wrapping_add(i * 8), 8) else {
                    return EFAULT;
                };
                let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                match read_bytes(&mut caller, ptr, len) {
                    Ok(bytes) => text.extend_from_slice(&bytes),
                    Err(_) => return EFAULT,
                }
            }
            let written = text.len() as u32;
            let level = if fd == 1 {
                LogLevel::Info
            } else {
                LogLevel::Error
            };
            let message = String::from_utf8_lossy(&text).trim_end().to_owned();
            let state = caller.data();
            let name = state.identity.name.clone();
            state
                .world
                .borrow_mut()
                .log(level, &name, state.worker, message);
            if write_u32(&mut caller, nwritten, written).is_err() {
                EFAULT
            } else {
                SUCCESS
            }
        },
    )?;
    // Deterministic: from the VM's seeded PRNG.
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut caller: C<'_>, buf: u32, len: u32| -> u32 {
            let mut bytes = vec![0u8; len as usize];
            caller.data_mut().rng.fill(&mut bytes);
            if write_bytes(&mut caller, buf, &bytes).is_err() {
                EFAULT
            } else {
                SUCCESS
            }
        },
    )?;
    // No environment and no arguments: both lists are empty.
    for (list, sizes) in [
        ("environ_get", "environ_sizes_get"),
        ("args_get", "args_sizes_get"),
    ] {
        linker.func_wrap(MODULE, list, |_: C<'_>, _ptrs: u32, _buf: u32| -> u32 {
            SUCCESS
        })?;
        linker.func_wrap(
            MODULE,
            sizes,
            |mut caller: C<'_>, count: u32, size: u32| -> u32 {
                if write_u32(&mut caller, count, 0)
                    .and_then(|_| write_u32(&mut caller, size, 0))
                    .is_err()
                {
                    EFAULT
                } else {
                    SUCCESS
                }
            },
        )?;
    }
    // Both the realtime and the monotonic clock read the virtual clock.
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut caller: C<'_>, clock: u32, _precision: u64, out: u32| -> u32 {
            if clock > 3 {
                return EINVAL;
            }
            let now = caller.data().world.borrow().now_ns;
            if write_u64(&mut caller, out, now).is_err() {
                EFAULT
            } else {
                SUCCESS
            }
        },
    )?;
    // A module asking to exit is a failure of that VM: trap with a clear message.
    linker.func_wrap(
        MODULE,
        "proc_exit",
        |caller: C<'_>, code: u32| -> wasmtime::Result<()> {
            let state = caller.data();
            let name = state.identity.name.clone();
            state.world.borrow_mut().log(
                LogLevel::Critical,
                &name,
                state.worker,
                format!("host: guest called proc_exit({code})"),
            );
            Err(wasmtime::Error::msg(format!(
                "guest called proc_exit({code})"
            )))
        },
    )?;
    linker.func_wrap(MODULE, "sched_yield", |_: C<'_>| -> u32 { SUCCESS })?;
    linker.func_wrap(MODULE, "fd_close", |_: C<'_>, _fd: u32| -> u32 { EBADF })?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_: C<'_>, _fd: u32, _offset: i64, _whence: u32, _out: u32| -> u32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |_: C<'_>, _fd: u32, _out: u32| -> u32 { EBADF },
    )?;
    // No preopened directories: EBADF ends the libc's preopen scan.
    linker.func_wrap(
        MODULE,
        "fd_prestat_get",
        |_: C<'_>, _fd: u32, _out: u32| -> u32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_: C<'_>, _fd: u32, _path: u32, _len: u32| -> u32 { EBADF },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |_: C<'_>, _fd: u32, _iovs: u32, _len: u32, _nread: u32| -> u32 { EBADF },
    )?;
    Ok(())
}
