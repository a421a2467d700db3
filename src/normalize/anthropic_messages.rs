//! `POST /v1/messages`: the Anthropic Messages dialect (SPEC §7.1).
//!
//! Not built yet: this module is the seam the dialect fills in (parse into a
//! [`ChatRequest`] with [`Inbound`](crate::chat::Inbound) set, fold a reply into its
//! JSON body, and write a stream as its events).

use std::sync::Arc;

use bytes::Bytes;

use crate::chat::{ChatChunk, ChatCompletion, ChatRequest};
use crate::context::CallContext;
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

/// Writes one stream's events.
pub(crate) struct Encoder {
    ctx: CallContext,
}

impl Encoder {
    pub(super) fn new(
        ctx: CallContext,
        _endpoint: Option<&crate::catalog::Endpoint>,
        _request: &Arc<ChatRequest>,
    ) -> Self {
        Encoder { ctx }
    }

    pub(super) fn chunk(&mut self, _chunk: &ChatChunk) -> Option<Bytes> {
        None
    }

    pub(super) fn done(&mut self) -> Bytes {
        Bytes::new()
    }

    pub(super) fn error(&mut self, e: &GatewayError) -> Bytes {
        super::record_stream_error(&self.ctx, e);
        Bytes::new()
    }
}
