//! Which API a request speaks, from its path.

use crate::config::Api;

/// The API shape of a request, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApiShape {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `POST /v1/completions` (legacy).
    Completions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Any other path (embeddings, models, ...): no completion is reserved.
    Other,
}

impl ApiShape {
    /// The shape of a request to `path`. The query string is ignored, and so
    /// is a prefix before `/v1/` (`/openai/v1/chat/completions` is chat), as
    /// gateways often mount APIs under a prefix; a trailing `/` is accepted.
    ///
    /// Case is ignored: the providers' APIs are case-sensitive, but an
    /// upstream that is not would serve `/V1/CHAT/COMPLETIONS` as chat, and
    /// sluice must not let it through unmetered.
    pub fn from_path(path: &str) -> Self {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_suffix('/').unwrap_or(path);
        let lower;
        let path = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = path.to_ascii_lowercase();
            lower.as_str()
        } else {
            path
        };
        let tail = match path.rfind("/v1/") {
            Some(i) => &path[i..],
            None => return ApiShape::Other,
        };
        match tail {
            "/v1/chat/completions" => ApiShape::ChatCompletions,
            "/v1/completions" => ApiShape::Completions,
            "/v1/responses" => ApiShape::Responses,
            "/v1/messages" => ApiShape::Messages,
            _ => ApiShape::Other,
        }
    }

    /// The vendor whose error shape a client of this API expects; `fallback`
    /// (the backend's `api`) for paths that do not say.
    pub fn vendor(self, fallback: Api) -> Api {
        match self {
            ApiShape::ChatCompletions | ApiShape::Completions | ApiShape::Responses => Api::Openai,
            ApiShape::Messages => Api::Anthropic,
            ApiShape::Other => fallback,
        }
    }

    /// Whether `stream_options.include_usage` exists for this API (OpenAI
    /// chat and legacy completions; the responses API and Anthropic always
    /// report a stream's usage).
    pub fn has_include_usage(self) -> bool {
        matches!(self, ApiShape::ChatCompletions | ApiShape::Completions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_from_paths() {
        assert_eq!(
            ApiShape::from_path("/v1/chat/completions"),
            ApiShape::ChatCompletions
        );
        assert_eq!(
            ApiShape::from_path("/v1/chat/completions?x=1"),
            ApiShape::ChatCompletions
        );
        assert_eq!(
            ApiShape::from_path("/openai/v1/completions/"),
            ApiShape::Completions
        );
        assert_eq!(ApiShape::from_path("/v1/responses"), ApiShape::Responses);
        assert_eq!(ApiShape::from_path("/v1/messages"), ApiShape::Messages);
        assert_eq!(ApiShape::from_path("/v1/embeddings"), ApiShape::Other);
        assert_eq!(ApiShape::from_path("/v1/messages/batches"), ApiShape::Other);
        assert_eq!(ApiShape::from_path(""), ApiShape::Other);
        assert_eq!(ApiShape::from_path("/v1/"), ApiShape::Other);
        // Case never hides an inference path.
        assert_eq!(
            ApiShape::from_path("/V1/CHAT/COMPLETIONS"),
            ApiShape::ChatCompletions
        );
        assert_eq!(ApiShape::from_path("/v1/Messages"), ApiShape::Messages);
    }

    #[test]
    fn vendors() {
        assert_eq!(ApiShape::Messages.vendor(Api::Openai), Api::Anthropic);
        assert_eq!(ApiShape::Responses.vendor(Api::Anthropic), Api::Openai);
        assert_eq!(ApiShape::Other.vendor(Api::Anthropic), Api::Anthropic);
    }
}
