//! The in-process `mock` provider: no network, deterministic, reports usage.
//!
//! `echo` repeats the last user message; `lorem` writes `max_tokens` words (the
//! request's, else the model's `max_output_tokens`, else 16), at most
//! [`LOREM_MAX_WORDS`]. Streams go word by word.
//! Tokens are counted as whitespace-separated words, so tests can predict usage.
//!
//! `embed` (an embedding model's endpoint, SPEC §7.3) answers each input with a
//! deterministic unit vector of 8 numbers (or `dimensions`) drawn from a hash of the
//! input ([`embedding`]); its usage is the model's tokenizer over the inputs.

use std::sync::Arc;

use futures_util::stream;
use sha2::{Digest, Sha256};

use crate::chat::{ChatChunk, Content, Delta, EmbeddingInput, EmbeddingsInput, Role, Usage};
use crate::context::{ChunkStream, ProviderCall};

const LOREM: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
];

/// The most words `lorem` writes, whatever `max_tokens` asks (4,096 words, about
/// 28 KB): the demo's free model must not let a client size an allocation.
pub const LOREM_MAX_WORDS: usize = 4096;

/// The completion text the mock gives for a call.
pub fn completion_text(call: &ProviderCall) -> (String, &'static str) {
    let req = &call.request;
    match call.endpoint.upstream_model.as_str() {
        "lorem" => {
            let asked = req
                .max_output_tokens()
                .or(call.endpoint.max_output_tokens)
                .unwrap_or(16);
            let n = usize::try_from(asked).map_or(LOREM_MAX_WORDS, |n| n.min(LOREM_MAX_WORDS));
            let mut text = String::new();
            for (i, word) in LOREM.iter().cycle().take(n).enumerate() {
                if i > 0 {
                    text.push(' ');
                }
                text.push_str(word);
            }
            (text, "length")
        }
        _ => {
            let last = req
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .and_then(|m| m.content.as_ref())
                .map(|c| c.text().into_owned())
                .unwrap_or_default();
            (last, "stop")
        }
    }
}

fn prompt_words(call: &ProviderCall) -> u64 {
    call.request
        .messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(|c| match c {
            Content::Text(t) => t.split_whitespace().count() as u64,
            Content::Parts(_) => c.text().split_whitespace().count() as u64,
        })
        .sum()
}

/// The dimensions of a mock embedding when the request asks for none.
pub const EMBEDDING_DIMENSIONS: u32 = 8;

/// The mock's embedding of one input: a deterministic unit vector of `dims` numbers
/// drawn from SHA-256 of the input (its text's bytes, or its token ids as
/// little-endian `u32`s, tagged so that the two never collide) and a block counter.
pub fn embedding(input: &EmbeddingInput, dims: u32) -> Vec<f32> {
    let mut seed = Sha256::new();
    match input {
        EmbeddingInput::Text(t) => {
            seed.update(b"t");
            seed.update(t.as_bytes());
        }
        EmbeddingInput::Tokens(ids) => {
            seed.update(b"i");
            for id in ids {
                seed.update(id.to_le_bytes());
            }
        }
    }
    let seed = seed.finalize();
    let mut v = Vec::with_capacity(dims as usize);
    let mut block = 0u32;
    while v.len() < dims as usize {
        let digest = Sha256::new()
            .chain_update(seed)
            .chain_update(block.to_le_bytes())
            .finalize();
        for word in digest.chunks_exact(4) {
            if v.len() == dims as usize {
                break;
            }
            let n = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            // Uniform in [-1, 1].
            v.push((f64::from(n) / f64::from(u32::MAX) * 2.0 - 1.0) as f32);
        }
        block += 1;
    }
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    } else if let Some(first) = v.first_mut() {
        *first = 1.0;
    }
    v
}

/// An embeddings answer: one [`embedding`] per input, usage by the tokenizer.
fn embeddings(call: &ProviderCall, e: &EmbeddingsInput) -> ChunkStream {
    let dims = e.dimensions.unwrap_or(EMBEDDING_DIMENSIONS);
    let vectors: Vec<Vec<f32>> = e.inputs.iter().map(|i| embedding(i, dims)).collect();
    let prompt = crate::metering::embedding_tokens(&call.endpoint.tokenizer, e);
    let chunk = ChatChunk {
        embeddings: Some(Arc::new(vectors)),
        usage: Some(Usage::new(prompt, 0)),
        ..ChatChunk::default()
    };
    Box::pin(stream::iter([Ok(chunk)]))
}

/// Answers a call in-process.
pub fn respond(call: &ProviderCall) -> ChunkStream {
    if let Some(e) = &call.request.inbound.embeddings {
        return embeddings(call, e);
    }
    let (text, finish) = completion_text(call);
    let usage = Usage::new(prompt_words(call), text.split_whitespace().count() as u64);
    let mut chunks = Vec::new();
    if call.request.stream {
        chunks.push(ChatChunk::delta(Delta {
            role: Some(Role::Assistant),
            content: Some(String::new()),
            ..Delta::default()
        }));
        chunks.extend(text.split_inclusive(' ').map(ChatChunk::text));
        let mut last = ChatChunk::delta(Delta::default());
        last.choices[0].finish_reason = Some(finish.into());
        chunks.push(last);
        chunks.push(ChatChunk::usage(usage));
    } else {
        let mut chunk = ChatChunk::delta(Delta {
            role: Some(Role::Assistant),
            content: Some(text),
            ..Delta::default()
        });
        chunk.choices[0].finish_reason = Some(finish.into());
        chunk.usage = Some(usage);
        chunks.push(chunk);
    }
    Box::pin(stream::iter(chunks.into_iter().map(Ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::{ChatRequest, Message};
    use crate::config::Config;
    use crate::context::CallContext;

    fn lorem(max_tokens: Option<u32>) -> String {
        let catalog = Catalog::from_config(&Config::demo());
        let call = ProviderCall {
            endpoint: catalog.model("mock/lorem").unwrap().endpoints[0].clone(),
            request: ChatRequest {
                model: "mock/lorem".into(),
                messages: vec![Message::text(Role::User, "go")],
                max_tokens,
                ..Default::default()
            }
            .into(),
            ctx: CallContext::new(),
        };
        completion_text(&call).0
    }

    #[test]
    fn lorem_writes_max_tokens_words() {
        assert_eq!(lorem(Some(3)), "lorem ipsum dolor");
        assert_eq!(lorem(Some(20)).split(' ').count(), 20);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding(&EmbeddingInput::Text("hello".into()), 8);
        assert_eq!(a.len(), 8);
        assert_eq!(a, embedding(&EmbeddingInput::Text("hello".into()), 8));
        assert_ne!(a, embedding(&EmbeddingInput::Text("hello!".into()), 8));
        for dims in [1, 8, 9, 300] {
            let v = embedding(&EmbeddingInput::Tokens(vec![1, 2]), dims);
            assert_eq!(v.len(), dims as usize);
            let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{dims}: {norm}");
        }
    }

    /// `max_tokens: 4294967295` aborted the process on a 68 GB allocation.
    #[test]
    fn lorem_is_capped_whatever_max_tokens_asks() {
        let text = lorem(Some(u32::MAX));
        assert_eq!(text.split(' ').count(), LOREM_MAX_WORDS);
        assert!(text.len() < 40_000);
    }
}
