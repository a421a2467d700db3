//! `POST /v1/embeddings` (SPEC §7.3).
//!
//! Not built yet: this module is the seam the dialect fills in (parse into a
//! [`ChatRequest`] with [`Inbound`](crate::chat::Inbound) set, fold a reply into its
//! JSON body, and write a stream as its events).

use crate::chat::{ChatCompletion, ChatRequest};
use crate::error::GatewayError;

/// Parses and checks a request body.
pub(super) fn parse(
    _bytes: &[u8],
    _headers: &http::HeaderMap,
) -> Result<ChatRequest, GatewayError> {
    Err(GatewayError::InvalidRequest(
        "this endpoint is not served yet".into(),
    ))
}

/// The JSON body of a folded reply.
pub(super) fn json_body(completion: &ChatCompletion, _request: &ChatRequest) -> Vec<u8> {
    serde_json::to_vec(completion).unwrap_or_default()
}
