//! A panic hook that says what happened before the VM stops.
//!
//! Filter code denies unwrap, expect and panic, but a bug in a dependency can
//! still panic; with `panic = "abort"` the VM then traps and Envoy applies the
//! plugin's failure policy. The hook makes sure the reason reaches Envoy's log
//! at critical level first.

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

/// Installs the hook; call it once from the module's `_start`/main.
pub fn install(filter: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("{filter}: panic: {info}"));
    }));
}
