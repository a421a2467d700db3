//! What a request carries beyond the chat schema: the inbound API it came in by
//! (SPEC §7), for the way back, and what that API sends that chat has no field for.
//!
//! Every inbound API is translated at the HTTP edge ([`crate::normalize`]) into one
//! [`ChatRequest`](super::ChatRequest), so route, health, credit, fallback, metering
//! and logging serve every endpoint with one code path. [`Inbound`] rides along on the
//! request (never on the wire): the dialect tells the edge how to write the answer,
//! the Anthropic body lets an anthropic-kind upstream get the client's request with
//! nothing lost, and an embeddings request carries its inputs.

use std::sync::Arc;

use serde_json::{Map, Value};

/// The API a request came in by, and so the shape of its answer (SPEC §7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// `POST /v1/chat/completions` (OpenAI, with OpenRouter's extensions).
    #[default]
    OpenAiChat,
    /// `POST /v1/messages` (Anthropic Messages, SPEC §7.1).
    AnthropicMessages,
    /// `POST /v1/responses` (OpenAI Responses, stateless, SPEC §7.2).
    OpenAiResponses,
    /// `POST /v1/embeddings` (SPEC §7.3).
    Embeddings,
    /// `POST /v1/completions` (OpenAI's legacy completions: prompt in, text out),
    /// served as chat with the prompt as one user message.
    Completions,
}

impl Dialect {
    /// The dialect of a request path (`/v1/…` or `/api/v1/…`); chat completions for
    /// any path it does not know, so [`NormalizeLayer`](crate::normalize::NormalizeLayer)
    /// mounted anywhere speaks chat.
    pub fn from_path(path: &str) -> Dialect {
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Dialect::OpenAiChat
        } else if path.ends_with("/completions") {
            Dialect::Completions
        } else if path.ends_with("/messages") {
            Dialect::AnthropicMessages
        } else if path.ends_with("/responses") {
            Dialect::OpenAiResponses
        } else if path.ends_with("/embeddings") {
            Dialect::Embeddings
        } else {
            Dialect::OpenAiChat
        }
    }

    /// The name used in logs and docs: `chat`, `messages`, `responses`, `embeddings`,
    /// `completions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAiChat => "chat",
            Dialect::AnthropicMessages => "messages",
            Dialect::OpenAiResponses => "responses",
            Dialect::Embeddings => "embeddings",
            Dialect::Completions => "completions",
        }
    }
}

/// What the inbound API brought that the chat schema does not model.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inbound {
    /// The API the request came in by.
    pub dialect: Dialect,
    /// `/v1/messages`: the client's body as sent, for anthropic-kind upstreams.
    pub anthropic: Option<Arc<AnthropicInbound>>,
    /// `/v1/embeddings`: what to embed.
    pub embeddings: Option<Arc<EmbeddingsInput>>,
    /// `/v1/responses`: the request's settings its `response` object echoes.
    pub responses: Option<Arc<ResponsesInbound>>,
}

impl Inbound {
    /// Whether the call asks for embeddings rather than a chat answer.
    pub fn is_embeddings(&self) -> bool {
        self.dialect == Dialect::Embeddings
    }
}

/// An Anthropic Messages request as the client sent it (SPEC §7.1): sent on to an
/// anthropic-kind upstream with only `model` (and the gateway's own fields)
/// changed, so `cache_control`, `thinking` blocks and their signatures and any field
/// the gateway does not know reach it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnthropicInbound {
    /// The request body's top-level object.
    pub body: Map<String, Value>,
    /// The client's `anthropic-beta` header, forwarded to anthropic-kind upstreams.
    pub beta: Option<String>,
}

/// What a Responses request (SPEC §7.2) sent that its `response` object echoes
/// (`instructions`, `tools`, `tool_choice`, `text`, `metadata`, …), as the client
/// sent it: the answer repeats the client's own values, not their chat translation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResponsesInbound {
    /// The echoed top-level fields, by name; a field the client did not send is absent.
    pub echo: Map<String, Value>,
}

/// An embeddings request's inputs and options (SPEC §7.3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsInput {
    /// What to embed, one vector each, in order.
    pub inputs: Vec<EmbeddingInput>,
    /// The vectors' size, when the client asks for one.
    pub dimensions: Option<u32>,
    /// `encoding_format: "base64"`: vectors as base64 of little-endian `f32`s.
    pub base64: bool,
}

/// One input of an embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbeddingInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

/// OpenRouter's `reasoning` request parameter (chat completions), and what the other
/// inbound APIs' reasoning settings become: how much the model may think, and
/// whether its reasoning text is returned.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reasoning {
    /// `"minimal" | "low" | "medium" | "high"` (or `"none"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effort: Option<String>,
    /// A thinking budget in tokens (wins over `effort` where the upstream takes one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Think, but do not return the reasoning text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclude: bool,
    /// `false` turns reasoning off; `true` turns it on at the default effort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::Dialect;

    #[test]
    fn dialects_come_from_paths() {
        for (path, d) in [
            ("/v1/chat/completions", Dialect::OpenAiChat),
            ("/api/v1/messages", Dialect::AnthropicMessages),
            ("/v1/responses", Dialect::OpenAiResponses),
            ("/v1/embeddings/", Dialect::Embeddings),
            ("/api/v1/chat/completions", Dialect::OpenAiChat),
            ("/v1/completions", Dialect::Completions),
            ("/api/v1/completions/", Dialect::Completions),
            ("/", Dialect::OpenAiChat),
        ] {
            assert_eq!(Dialect::from_path(path), d, "{path}");
        }
    }
}
