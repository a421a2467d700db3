//! The in-process `mock` provider: no network, deterministic, reports usage.
//!
//! `echo` repeats the last user message; `lorem` writes `max_tokens` words (the
//! request's, else the model's `max_output_tokens`, else 16), at most
//! [`LOREM_MAX_WORDS`]. Streams go word by word.
//! Tokens are counted as whitespace-separated words, so tests can predict usage.

use futures_util::stream;

use crate::chat::{ChatChunk, Content, Delta, Role, Usage};
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

/// Answers a call in-process.
pub fn respond(call: &ProviderCall) -> ChunkStream {
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

    /// `max_tokens: 4294967295` aborted the process on a 68 GB allocation.
    #[test]
    fn lorem_is_capped_whatever_max_tokens_asks() {
        let text = lorem(Some(u32::MAX));
        assert_eq!(text.split(' ').count(), LOREM_MAX_WORDS);
        assert!(text.len() < 40_000);
    }
}
