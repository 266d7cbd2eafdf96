//! Who is calling and which model they ask for: `[tenant]` and `[model]`.
//!
//! Kept apart because these decide the keys every capability's state is
//! filed under; an API-key tenant must never be configured with a key
//! itself, only with its hash.

use sluice_core::config::{self as cfg, ApiKeyName, ModelSource, TenantIdentity, TenantSource};

use super::{Compiler, loc_of, or};
use crate::defaults as dflt;
use crate::diagnostic::Loc;
use crate::raw;

impl Compiler {
    pub(super) fn tenant(&mut self, raw: Option<&raw::Tenant>, doc_loc: &Loc) -> TenantIdentity {
        let default = raw::Tenant {
            loc: doc_loc.clone(),
            ..Default::default()
        };
        let raw = raw.unwrap_or(&default);
        let missing = or(&raw.missing, dflt::TENANT_MISSING.to_string());
        let source = match or(&raw.from, raw::TenantFrom::Header) {
            raw::TenantFrom::Header => {
                if let Some(names) = &raw.names {
                    self.invalid(
                        &names.loc,
                        "`names` applies only to `from = \"api-key\"`",
                        Some("remove it, or identify tenants by API key"),
                    );
                }
                let header = or(&raw.header, dflt::TENANT_HEADER.to_string());
                self.check_header_name(&header, &loc_of(&raw.header, &raw.loc));
                TenantSource::Header {
                    header: header.to_ascii_lowercase(),
                }
            }
            raw::TenantFrom::ApiKey => {
                if let Some(h) = &raw.header {
                    self.invalid(
                        &h.loc,
                        "`header` applies only to `from = \"header\"`",
                        Some("API keys are read from `authorization: Bearer …` or `x-api-key`"),
                    );
                }
                let names = raw
                    .names
                    .as_ref()
                    .map(|m| m.value.0.as_slice())
                    .unwrap_or_default();
                let names = names
                    .iter()
                    .map(|(hash, tenant)| {
                        if !is_key_hash(&hash.value) {
                            self.invalid(&hash.loc, format!("`{}` is not an API key hash", hash.value), Some("write `key-` and 16 hex digits, as `sluice hash-key` prints; never the key itself"));
                        }
                        ApiKeyName { hash: hash.value.clone(), tenant: tenant.value.clone() }
                    })
                    .collect();
                TenantSource::ApiKey { names }
            }
        };
        TenantIdentity { source, missing }
    }

    fn check_header_name(&mut self, name: &str, loc: &Loc) {
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !name.starts_with(':');
        if !valid {
            self.invalid(
                loc,
                format!("`{name}` is not a valid header name"),
                Some("use letters, digits and `-`, like `x-tenant-id`"),
            );
        }
    }

    pub(super) fn model(&mut self, raw: Option<&raw::Model>) -> ModelSource {
        let default = raw::Model::default();
        let raw = raw.unwrap_or(&default);
        let header = or(&raw.header, dflt::MODEL_HEADER.to_string());
        self.check_header_name(&header, &loc_of(&raw.header, &raw.loc));
        ModelSource {
            from: match or(&raw.from, raw::ModelFrom::Body) {
                raw::ModelFrom::Body => cfg::ModelFrom::Body,
                raw::ModelFrom::Header => cfg::ModelFrom::Header,
            },
            header: header.to_ascii_lowercase(),
            default: raw.default.as_ref().map(|s| s.value.clone()),
        }
    }
}

/// `key-` followed by 16 lowercase hex digits.
pub fn is_key_hash(s: &str) -> bool {
    s.strip_prefix("key-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}
