//! Gemini embeddings (SPEC §7.3): `POST {base_url}/v1beta/models/{model}:batchEmbedContents`
//! with one `EmbedContentRequest` per input, answered by `embeddings[].values` in
//! input order. Gemini takes text only: token-id inputs are a client error (400).
//! It reports no usage: metering counts the inputs with the model's tokenizer.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{client_error, model_name};
use crate::chat::{ChatChunk, EmbeddingInput, EmbeddingsInput};
use crate::context::ProviderCall;
use crate::error::ProviderError;
use crate::providers::protocol_error;

#[derive(Serialize)]
struct Batch<'a> {
    requests: Vec<EmbedRequest<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedRequest<'a> {
    model: &'a str,
    content: Content<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Serialize)]
struct Content<'a> {
    parts: [Text<'a>; 1],
}

#[derive(Serialize)]
struct Text<'a> {
    text: &'a str,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    embeddings: Vec<Values>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Values {
    #[serde(default)]
    values: Vec<f32>,
}

/// The URL of a batch of embeddings.
pub(super) fn url(call: &ProviderCall) -> String {
    call.endpoint.provider.url(&format!(
        "v1beta/models/{}:batchEmbedContents",
        model_name(call)
    ))
}

/// Builds the exact JSON body of a `batchEmbedContents` request (used by golden
/// tests): one request per input, each naming `models/{upstream}`.
pub fn body(call: &ProviderCall, e: &EmbeddingsInput) -> Result<Vec<u8>, ProviderError> {
    let model = format!("models/{}", model_name(call));
    let requests = e
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| match input {
            EmbeddingInput::Text(text) => Ok(EmbedRequest {
                model: &model,
                content: Content {
                    parts: [Text { text }],
                },
                output_dimensionality: e.dimensions,
            }),
            EmbeddingInput::Tokens(_) => Err(client_error(
                call,
                format!("input[{i}]: Gemini embeds text only, not token ids"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    serde_json::to_vec(&Batch { requests }).map_err(|e| protocol_error(call, e))
}

/// The vectors of a `batchEmbedContents` answer, in input order, as one chunk.
pub(super) fn parse(call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| protocol_error(call, format!("not a BatchEmbedContentsResponse: {e}")))?;
    if let Some(err) = &answer.error {
        return Err(super::in_band(&call.endpoint.provider.name, err));
    }
    Ok(ChatChunk {
        embeddings: Some(Arc::new(
            answer.embeddings.into_iter().map(|v| v.values).collect(),
        )),
        ..ChatChunk::default()
    })
}
