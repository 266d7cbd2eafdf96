//! Who is calling: the tenant of a request, as the policy says to find it.
//!
//! From a header, the value is the tenant (cut to [`MAX_TENANT_LEN`]
//! bytes; bytes that are not UTF-8 become U+FFFD, so two such values may
//! share a tenant, which limits them together, never apart). From an API
//! key (`authorization: Bearer …`, or `x-api-key`), the tenant is the key's
//! hash or the name `[tenant.names]` gives that hash: the key itself is
//! read, hashed and dropped, never stored, logged or exported. A request
//! carrying two different keys is refused ([`IdentityError::TwoKeys`]): the
//! upstream would bill one of them, and sluice cannot know which.
//!
//! The tenant id of a key is `key-` and the first 16 hex digits (64 bits) of
//! its SHA-256: stable across proxies and restarts, safe to put in logs and
//! metrics, and not reversible to the secret. 64 bits keep accidental
//! collisions out of reach for any realistic number of keys.

use sha2::{Digest, Sha256};

use crate::config::{TenantIdentity, TenantSource};

/// Longest tenant name taken from a header, in bytes; longer values are
/// cut, so a client cannot make keys or metric names of arbitrary size.
pub const MAX_TENANT_LEN: usize = 128;

/// Why a request's identity cannot be decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the request carries two different API keys (`authorization` and `x-api-key`)")]
    TwoKeys,
}

/// The tenant of a request, given a lookup of its raw header values.
pub fn identify(
    identity: &TenantIdentity,
    header: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<String, IdentityError> {
    let present = |name: &str| header(name).filter(|v| !v.is_empty());
    match &identity.source {
        TenantSource::Header { header: name } => Ok(match present(name) {
            Some(value) => header_tenant(&value),
            None => identity.missing.clone(),
        }),
        TenantSource::ApiKey { names } => {
            let bearer =
                present("authorization").and_then(|a| bearer_token_bytes(&a).map(<[u8]>::to_vec));
            let key = match (bearer, present("x-api-key")) {
                (Some(a), Some(b)) if a != b => return Err(IdentityError::TwoKeys),
                (Some(k), _) | (None, Some(k)) => k,
                (None, None) => return Ok(identity.missing.clone()),
            };
            let id = api_key_tenant_bytes(&key);
            Ok(names
                .iter()
                .find(|n| n.hash == id)
                .map_or(id, |n| n.tenant.clone()))
        }
    }
}

/// A header value as a tenant name: lossy UTF-8, cut to [`MAX_TENANT_LEN`]
/// bytes on a character boundary.
fn header_tenant(value: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(value).into_owned();
    if text.len() > MAX_TENANT_LEN {
        let mut cut = MAX_TENANT_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The tenant id of an API key.
pub fn api_key_tenant(key: &str) -> String {
    api_key_tenant_bytes(key.as_bytes())
}

/// The tenant id of an API key given as raw bytes.
pub fn api_key_tenant_bytes(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let mut id = String::with_capacity(20);
    id.push_str("key-");
    for byte in &digest[..8] {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The token of an `authorization: Bearer <token>` header value.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// [`bearer_token`] over raw bytes (a header value need not be UTF-8).
pub fn bearer_token_bytes(authorization: &[u8]) -> Option<&[u8]> {
    let value = authorization.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_is_a_truncated_sha256() {
        // From `printf sk-test | sha256sum`.
        let id = api_key_tenant("sk-test");
        assert_eq!(id, "key-f3abf2a6cc4f0098");
        assert_ne!(id, api_key_tenant("sk-test2"));
    }

    fn lookup<'a>(pairs: &'a [(&'a str, &'a [u8])]) -> impl Fn(&str) -> Option<Vec<u8>> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_vec())
        }
    }

    fn by_header() -> TenantIdentity {
        TenantIdentity {
            source: TenantSource::Header {
                header: "x-tenant-id".into(),
            },
            missing: "anon".into(),
        }
    }

    fn by_key() -> TenantIdentity {
        TenantIdentity {
            source: TenantSource::ApiKey {
                names: vec![crate::config::ApiKeyName {
                    hash: "key-f3abf2a6cc4f0098".into(),
                    tenant: "acme".into(),
                }],
            },
            missing: "anon".into(),
        }
    }

    #[test]
    fn header_tenants_are_cut_and_survive_bytes_that_are_not_utf8() {
        let id = by_header();
        assert_eq!(
            identify(&id, lookup(&[("x-tenant-id", b"acme")])),
            Ok("acme".into())
        );
        assert_eq!(identify(&id, lookup(&[])), Ok("anon".into()));
        assert_eq!(
            identify(&id, lookup(&[("x-tenant-id", b"")])),
            Ok("anon".into())
        );
        let long = vec![b'x'; 500];
        assert_eq!(
            identify(&id, lookup(&[("x-tenant-id", &long)]))
                .unwrap()
                .len(),
            MAX_TENANT_LEN
        );
        let odd = identify(&id, lookup(&[("x-tenant-id", b"ac\xffme")])).unwrap();
        assert_eq!(odd, "ac\u{fffd}me");
        // A cut never splits a character.
        let wide = "é".repeat(100);
        let cut = identify(&id, lookup(&[("x-tenant-id", wide.as_bytes())])).unwrap();
        assert!(cut.len() <= MAX_TENANT_LEN && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn api_key_tenants_never_carry_the_key() {
        let id = by_key();
        let tenant = |pairs: &[(&str, &[u8])]| identify(&id, lookup(pairs));
        assert_eq!(
            tenant(&[("authorization", b"Bearer sk-test")]),
            Ok("acme".into())
        );
        assert_eq!(tenant(&[("x-api-key", b"sk-test")]), Ok("acme".into()));
        // The same key in both headers is one identity.
        assert_eq!(
            tenant(&[
                ("authorization", b"Bearer sk-test"),
                ("x-api-key", b"sk-test")
            ]),
            Ok("acme".into())
        );
        assert_eq!(
            tenant(&[
                ("authorization", b"Bearer sk-test"),
                ("x-api-key", b"sk-other")
            ]),
            Err(IdentityError::TwoKeys)
        );
        let other = tenant(&[("authorization", b"Bearer sk-other")]).unwrap();
        assert!(other.starts_with("key-") && !other.contains("sk-other"));
        // Bytes that are not UTF-8 are hashed as they are.
        let raw = tenant(&[("authorization", b"Bearer \xff\xfe")]).unwrap();
        assert_eq!(raw, api_key_tenant_bytes(b"\xff\xfe"));
        assert_eq!(tenant(&[]), Ok("anon".into()));
        // A non-bearer authorization is no key.
        assert_eq!(
            tenant(&[("authorization", b"Basic abc")]),
            Ok("anon".into())
        );
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token_bytes(b" Bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token_bytes(b"Basic abc"), None);
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
