//! A reply sluice sends itself instead of calling the upstream.

use super::{ErrorKind, error_body};
use crate::config::Api;

/// A local reply (`send_local_response`): status, headers, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl LocalReply {
    /// An error of `kind` in `api`'s shape (JSON, [`error_body`]), with
    /// `headers` added after `content-type`.
    pub fn error(
        api: Api,
        kind: ErrorKind,
        message: &str,
        headers: impl IntoIterator<Item = (&'static str, String)>,
    ) -> Self {
        let mut all = vec![("content-type", "application/json".to_string())];
        all.extend(headers);
        LocalReply {
            status: kind.status(),
            headers: all,
            body: error_body(api, kind, message),
        }
    }

    /// The first value of header `name`, if the reply carries it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}
