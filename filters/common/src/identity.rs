//! Who is calling: the tenant of a request, as the policy says to find it.
//!
//! From a header, the value is the tenant. From an API key
//! (`authorization: Bearer …`, else `x-api-key`), the tenant is the key's
//! hash (`key-` and 16 hex digits, see `sluice_core::tenant`) or the name
//! `[tenant.names]` gives that hash: the key itself is read, hashed and
//! dropped, never stored, logged or exported.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;
use sluice_core::config::{TenantIdentity, TenantSource};
use sluice_core::tenant::{api_key_tenant, bearer_token};

/// Longest tenant name taken from a header; longer values are cut, so a
/// client cannot make keys or metric names of arbitrary size.
pub const MAX_TENANT_LEN: usize = 128;

/// A request header's value, if present and not empty.
pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
        .filter(|v| !v.is_empty())
}

/// The tenant of the current request.
pub fn tenant(identity: &TenantIdentity) -> String {
    tenant_from(identity, request_header)
}

/// The tenant given a header lookup (separate from the host for tests).
pub fn tenant_from(identity: &TenantIdentity, header: impl Fn(&str) -> Option<String>) -> String {
    match &identity.source {
        TenantSource::Header { header: name } => match header(name) {
            Some(mut value) => {
                if value.len() > MAX_TENANT_LEN {
                    let mut cut = MAX_TENANT_LEN;
                    while !value.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    value.truncate(cut);
                }
                value
            }
            None => identity.missing.clone(),
        },
        TenantSource::ApiKey { names } => {
            let key = header("authorization")
                .and_then(|a| bearer_token(&a).map(str::to_string))
                .or_else(|| header("x-api-key"));
            match key {
                Some(key) => {
                    let id = api_key_tenant(&key);
                    names
                        .iter()
                        .find(|n| n.hash == id)
                        .map_or(id, |n| n.tenant.clone())
                }
                None => identity.missing.clone(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::ApiKeyName;

    fn headers<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn header_tenants() {
        let id = TenantIdentity {
            source: TenantSource::Header {
                header: "x-tenant-id".into(),
            },
            missing: "anon".into(),
        };
        assert_eq!(
            tenant_from(&id, headers(&[("x-tenant-id", "acme")])),
            "acme"
        );
        assert_eq!(tenant_from(&id, headers(&[])), "anon");
        let long = "x".repeat(500);
        assert_eq!(
            tenant_from(&id, headers(&[("x-tenant-id", &long)])).len(),
            MAX_TENANT_LEN
        );
    }

    #[test]
    fn api_key_tenants_never_carry_the_key() {
        let id = TenantIdentity {
            source: TenantSource::ApiKey {
                names: vec![ApiKeyName {
                    hash: "key-f3abf2a6cc4f0098".into(),
                    tenant: "acme".into(),
                }],
            },
            missing: "anon".into(),
        };
        assert_eq!(
            tenant_from(&id, headers(&[("authorization", "Bearer sk-test")])),
            "acme"
        );
        assert_eq!(
            tenant_from(&id, headers(&[("x-api-key", "sk-test")])),
            "acme"
        );
        let other = tenant_from(&id, headers(&[("authorization", "Bearer sk-other")]));
        assert!(other.starts_with("key-") && !other.contains("sk-other"));
        assert_eq!(tenant_from(&id, headers(&[])), "anon");
    }
}
