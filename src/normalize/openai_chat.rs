//! `POST /v1/chat/completions`: the OpenAI chat dialect (SPEC §3.1), the internal
//! schema itself. Parsing with the JSON path of any error, the `chat.completion`
//! body, and `chat.completion.chunk` events ending in `data: [DONE]`.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::{record_stream_error, DONE_EVENT};
use crate::chat::{ChatChunk, ChatCompletion, ChatRequest, ChunkChoice};
use crate::context::CallContext;
use crate::error::GatewayError;

/// Parses a chat request, naming the JSON path of what is wrong.
pub fn parse_request(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
    // The plain parse first: tracking the path costs on every field (≈ 4k
    // instructions a request, callgrind), and is only needed to explain an error.
    let mut req = match crate::chat::from_json::<ChatRequest>(bytes) {
        Ok(req) => req,
        Err(_) => return Err(explain_parse_error(bytes)),
    };
    req.validate().map_err(GatewayError::InvalidRequest)?;
    // The request lives as long as its stream: no spare capacity (serde grows the
    // vector to 4 messages for the first one).
    req.messages.shrink_to_fit();
    Ok(req)
}

/// The error of a body that did not parse, with the JSON path of what is wrong.
#[cold]
fn explain_parse_error(bytes: &[u8]) -> GatewayError {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, ChatRequest>(de) {
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                GatewayError::InvalidRequest(format!("the body is not valid JSON: {inner}"))
            } else if path == "." {
                GatewayError::InvalidRequest(format!("invalid request: {inner}"))
            } else {
                GatewayError::InvalidRequest(format!("invalid `{path}`: {inner}"))
            }
        }
        // Both parsers read the same bytes with the same types.
        Ok(_) => GatewayError::InvalidRequest("the body is not a valid chat request".into()),
    }
}

/// The `chat.completion` body of a folded reply.
pub(super) fn json_body(completion: &ChatCompletion) -> Vec<u8> {
    // Sized up front: growing from serde_json's default 128 bytes reallocates and
    // copies several times for a typical completion.
    let mut body = Vec::with_capacity(384 + agg_len_hint(completion));
    completion.write_json(&mut body);
    body
}

/// Roughly the bytes of a completion's content.
fn agg_len_hint(c: &ChatCompletion) -> usize {
    c.choices
        .iter()
        .map(|ch| {
            ch.message
                .content
                .as_ref()
                .map_or(0, |t| t.len() + t.len() / 8)
        })
        .sum()
}

/// Writes chunks as SSE events, stamped with the request's id, model and provider
/// (shared with the context and the catalog, not copied per stream).
pub(crate) struct SseWriter {
    ctx: CallContext,
    model: Arc<str>,
    provider: Arc<str>,
    wants_usage: bool,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"provider":…,"choices":`,
    /// the same in every chunk of the stream: encoded once, copied per chunk.
    prefix: Vec<u8>,
}

impl SseWriter {
    pub(super) fn new(
        ctx: CallContext,
        endpoint: Option<&crate::catalog::Endpoint>,
        wants_usage: bool,
    ) -> Self {
        let (model, provider): (Arc<str>, Arc<str>) = match endpoint {
            Some(e) => (e.model.clone(), e.provider.name.clone()),
            None => (Arc::from(""), Arc::from("")),
        };
        let mut prefix = Vec::with_capacity(160);
        prefix.extend_from_slice(b"data: {\"id\":");
        crate::json::push_str(&mut prefix, ctx.request_id());
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        prefix.extend_from_slice(itoa::Buffer::new().format(ctx.created()).as_bytes());
        prefix.extend_from_slice(b",\"model\":");
        crate::json::push_str(&mut prefix, &model);
        prefix.extend_from_slice(b",\"provider\":");
        crate::json::push_str(&mut prefix, &provider);
        // The object stays open for the chunk's own fields.
        prefix.extend_from_slice(b",\"choices\":");
        SseWriter {
            model,
            provider,
            ctx,
            wants_usage,
            prefix,
        }
    }

    /// Encodes one chunk, or `None` when there is nothing for this client in it:
    /// the stream's prefix, then the chunk's `choices` (and `usage`, if asked for).
    pub(super) fn encode(&self, chunk: &ChatChunk) -> Option<Bytes> {
        let usage = chunk.usage.as_ref().filter(|_| self.wants_usage);
        if usage.is_none() && chunk.choices.is_empty() {
            return None;
        }
        // Into a Vec (`Bytes::from(Vec)` takes the buffer without a copy), by the
        // writers of `chat/ser.rs`: the bytes serde_json would write.
        let mut out = Vec::with_capacity(self.prefix.len() + 160);
        out.extend_from_slice(&self.prefix);
        ChunkChoice::write_json_list(&chunk.choices, &mut out);
        if let Some(u) = usage {
            out.extend_from_slice(b",\"usage\":");
            u.write_json(&mut out);
        }
        out.extend_from_slice(b"}\n\n");
        Some(Bytes::from(out))
    }
}

impl SseWriter {
    /// An error chunk followed by `[DONE]` (SPEC §3.2, errors after the stream started).
    pub(super) fn error(&self, e: &GatewayError) -> Bytes {
        record_stream_error(&self.ctx, e);
        let chunk = serde_json::json!({
            "id": self.ctx.request_id(),
            "object": "chat.completion.chunk",
            "created": self.ctx.created(),
            "model": &*self.model,
            "provider": &*self.provider,
            "error": e.to_json(),
            "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
        });
        let mut out = BytesMut::with_capacity(256);
        out.put_slice(b"data: ");
        out.put_slice(chunk.to_string().as_bytes());
        out.put_slice(b"\n\n");
        out.put_slice(DONE_EVENT);
        out.freeze()
    }
}
