//! The VM's logger and a panic hook that says what happened before the VM
//! stops.
//!
//! proxy-wasm's own logger (`proxy_wasm::set_log_level`) unwraps the host's
//! answer to every log call; this one goes through [`crate::host::log`],
//! which ignores it. Filter code denies unwrap, expect and panic, but a bug
//! in a dependency can still panic; with `panic = "abort"` the VM then traps
//! and Envoy applies the plugin's failure policy. The hook makes sure the
//! reason reaches Envoy's log at critical level first.

use crate::host::{self, Level};

struct HostLogger;

static LOGGER: HostLogger = HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Error => Level::Error,
            log::Level::Warn => Level::Warn,
            log::Level::Info => Level::Info,
            log::Level::Debug | log::Level::Trace => Level::Debug,
        };
        host::log(level, &record.args().to_string());
    }

    fn flush(&self) {}
}

/// Installs the logger (at `max_level`) and the panic hook; call it once
/// from the module's start (`proxy_wasm::main!`). `module` prefixes panics.
pub fn install(module: &'static str, max_level: log::LevelFilter) {
    // Fails only if a logger is already set: keep that one.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(max_level);
    std::panic::set_hook(Box::new(move |info| {
        host::log(Level::Critical, &format!("{module}: panic: {info}"));
    }));
}
