//! Tenant identity from an API key, without keeping the key.
//!
//! The tenant id of a key is `key-` and the first 16 hex digits (64 bits) of
//! its SHA-256: stable across proxies and restarts, safe to put in logs and
//! metrics, and not reversible to the secret. 64 bits keep accidental
//! collisions out of reach for any realistic number of keys.

use sha2::{Digest, Sha256};

/// The tenant id of an API key.
pub fn api_key_tenant(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
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

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }
}
