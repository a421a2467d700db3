//! `POST /v1/messages`: the Anthropic Messages dialect (SPEC §7.1).
//!
//! - [`parse`](parse::parse) reads an Anthropic body into a [`ChatRequest`] (system,
//!   text / image / `tool_use` / `tool_result` blocks, tools, `tool_choice`,
//!   `stop_sequences`, `thinking`…), with [`Inbound`](crate::chat::Inbound) carrying
//!   the body as sent and `anthropic-beta`, so an anthropic-kind upstream gets it with
//!   nothing lost ([`crate::providers::anthropic::pass_through_body`]); other
//!   upstream kinds get the translation through their own adapters.
//! - [`json_body`] folds a reply into a `message` (thinking with its signature, text,
//!   `tool_use` blocks, `stop_reason`, usage with cache reads / writes and `cost`).
//! - [`Encoder`] writes a stream as Anthropic's events, `message_start` …
//!   `message_stop`, or an `error` event when it breaks after the start.
//! - [`AnthropicErrorsLayer`] gives every error on these paths Anthropic's shape,
//!   wherever it was made (auth, rate limits, idempotency, routing, 404 / 405).
//! - [`CountTokens`] answers `POST /v1/messages/count_tokens`.

mod count_tokens;
mod errors;
mod parse;
mod reply;

use crate::chat::{ChatCompletion, ChatRequest};
use crate::error::GatewayError;

pub use count_tokens::CountTokens;
pub use errors::{error_type, AnthropicErrors, AnthropicErrorsLayer};
pub(crate) use reply::Encoder;

/// Parses and checks a `/v1/messages` request body (400 naming the field).
pub(super) fn parse(bytes: &[u8], headers: &http::HeaderMap) -> Result<ChatRequest, GatewayError> {
    parse::parse(bytes, headers, parse::Require::MaxTokens)
}

/// The `message` body of a folded reply.
pub(super) fn json_body(completion: &ChatCompletion, request: &ChatRequest) -> Vec<u8> {
    reply::json_body(completion, request)
}
