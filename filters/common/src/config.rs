//! Reading the policy a filter is configured with.

use log::{error, info};
use sluice_core::config::Policy;

/// Parses the plugin configuration (TOML from an Envoy `StringValue`, JSON
/// from Istio's `pluginConfig`) with exactly the code `sluice validate` runs.
/// On failure every error is logged and `None` returned: `on_configure` then
/// returns false, Envoy rejects the configuration and the previous one keeps
/// serving.
pub fn load_policy(filter: &str, bytes: Option<&[u8]>) -> Option<Policy> {
    let Some(bytes) = bytes.filter(|b| !b.is_empty()) else {
        error!("{filter}: no configuration: the filter needs a sluice policy (TOML or JSON)");
        return None;
    };
    match sluice_policy::parse_config_bytes("plugin configuration", bytes) {
        Ok(policy) => {
            info!(
                "{filter}: policy {} loaded",
                policy.name.as_deref().unwrap_or("(unnamed)")
            );
            Some(policy)
        }
        Err(diagnostics) => {
            for line in diagnostics.to_compact_string().lines() {
                error!("{filter}: invalid policy: {line}");
            }
            None
        }
    }
}
