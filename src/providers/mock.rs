//! The in-process `mock` provider: no network, deterministic, reports usage.
//!
//! `echo` repeats the last user message; `lorem` writes `max_tokens` words (the
//! request's, else the model's `max_output_tokens`, else 16), at most
//! [`LOREM_MAX_WORDS`]. Streams go word by word. With `n` > 1 every choice is the
//! same answer, and usage counts each.
//! Tokens are counted as whitespace-separated words, so tests can predict usage.
//!
//! Tools: when the request has `tools` (and `tool_choice` is not `"none"`), `echo`
//! calls the first tool, or the one `tool_choice` names, with arguments built from
//! the last user message and the tool's JSON schema ([`tool_arguments`]), finishing
//! with `tool_calls` (streamed as tool-call deltas); when the last message is the
//! tool's result, it echoes that result as text.
//!
//! Delays: an endpoint's `delay_ms` holds the answer back and `chunk_delay_ms` spaces
//! a stream's chunks ([`call`]), under the provider's `timeout_secs` and
//! `stream_idle_timeout_secs` as a real upstream is, so the demo can show
//! timeouts, fallback and drain.
//!
//! `embed` (an embedding model's endpoint, SPEC §7.3) answers each input with a
//! deterministic unit vector of 8 numbers (or `dimensions`) drawn from a hash of the
//! input ([`embedding`]); its usage is the model's tokenizer over the inputs.

use std::sync::Arc;

use futures_util::{stream, StreamExt};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chat::{
    ChatChunk, Content, Delta, EmbeddingInput, EmbeddingsInput, FunctionCallDelta, Role, Tool,
    ToolCallDelta, Usage,
};
use crate::context::{ChunkStream, ProviderCall};
use crate::error::{FailureKind, GatewayError, ProviderError};

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

/// The completion text the mock gives for a call: `lorem`'s words, or what `echo`
/// repeats (the last message when it is a tool result, else the last user message).
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
            // A follow-up turn after a tool call: echo the tool's result.
            let last = match req.messages.last() {
                Some(m) if m.role == Role::Tool => Some(m),
                _ => req.messages.iter().rev().find(|m| m.role == Role::User),
            };
            let text = last
                .and_then(|m| m.content.as_ref())
                .map(|c| c.text().into_owned())
                .unwrap_or_default();
            (text, "stop")
        }
    }
}

/// The tool `echo` calls: the request's first tool, or the one `tool_choice` names;
/// none when there are no tools, `tool_choice` is `"none"`, or the last message is a
/// tool result (the turn after the call answers text).
pub fn chosen_tool(call: &ProviderCall) -> Option<&Tool> {
    let req = &call.request;
    if call.endpoint.upstream_model != "echo" {
        return None;
    }
    let tools = req.tools.as_deref().filter(|t| !t.is_empty())?;
    if req.messages.last().is_some_and(|m| m.role == Role::Tool) {
        return None;
    }
    match &req.tool_choice {
        Some(Value::String(s)) if s == "none" => None,
        Some(Value::Object(o)) => {
            let named = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            named
                .and_then(|n| tools.iter().find(|t| t.function.name == n))
                .or(tools.first())
        }
        _ => tools.first(),
    }
}

/// The arguments `echo` calls `tool` with: a JSON object that is a valid instance of
/// the tool's `parameters` schema, its first string property holding `text` (the
/// first of `required` that is a string, else the first by name); every other
/// property the first of its `enum`, its `const`, or a plain value of its `type`
/// (`""`, `0` or `minimum`, `false`, `[]`, an object built the same way, `null`).
pub fn tool_arguments(tool: &Tool, text: &str) -> Value {
    let schema = tool.function.parameters.as_ref().unwrap_or(&Value::Null);
    let mut text = Some(text);
    match instance(schema, &mut text, 0) {
        v @ Value::Object(_) => v,
        _ => Value::Object(Map::new()),
    }
}

/// How deep [`tool_arguments`] follows nested object schemas.
const MAX_SCHEMA_DEPTH: usize = 8;

fn schema_type(schema: &Value) -> Option<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => Some(t),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ if schema.get("properties").is_some() => Some("object"),
        _ => None,
    }
}

fn instance(schema: &Value, text: &mut Option<&str>, depth: usize) -> Value {
    if let Some(v) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
        .or_else(|| schema.get("const"))
    {
        return v.clone();
    }
    match schema_type(schema) {
        Some("string") => Value::String(text.take().unwrap_or_default().to_owned()),
        Some("integer") => schema
            .get("minimum")
            .and_then(Value::as_i64)
            .map_or(Value::from(0), Value::from),
        Some("number") => schema
            .get("minimum")
            .filter(|m| m.is_number())
            .cloned()
            .unwrap_or(Value::from(0)),
        Some("boolean") => Value::Bool(false),
        Some("array") => Value::Array(Vec::new()),
        Some("object") if depth < MAX_SCHEMA_DEPTH => {
            let mut out = Map::new();
            let Some(props) = schema.get("properties").and_then(Value::as_object) else {
                return Value::Object(out);
            };
            // The text goes to the first required string property, else the first.
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let takes_text = |(name, s): &(&String, &Value)| {
                schema_type(s) == Some("string")
                    && s.get("enum").is_none()
                    && s.get("const").is_none()
                    && (required.is_empty() || required.contains(&name.as_str()))
            };
            let first = required
                .iter()
                .filter_map(|r| props.get_key_value(*r))
                .find(|p| takes_text(p))
                .or_else(|| props.iter().find(|p| takes_text(p)))
                .map(|(name, _)| name.clone());
            if let (Some(name), Some(t)) = (&first, text.take()) {
                out.insert(name.clone(), Value::String(t.to_owned()));
            }
            for (name, sub) in props {
                if !out.contains_key(name) {
                    out.insert(name.clone(), instance(sub, &mut None, depth + 1));
                }
            }
            Value::Object(out)
        }
        Some("object") => Value::Object(Map::new()),
        _ => Value::Null,
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

/// What one choice of an answer is.
enum Answer {
    Text(String, &'static str),
    Call {
        id: String,
        name: String,
        arguments: String,
    },
}

impl Answer {
    fn words(&self) -> u64 {
        match self {
            Answer::Text(t, _) => t.split_whitespace().count() as u64,
            // A call is never free: its name counts, and its arguments' words.
            Answer::Call { arguments, .. } => 1 + arguments.split_whitespace().count() as u64,
        }
    }
}

/// Answers a call in-process, at once: `n` choices (each the same answer), as one
/// chunk or, for a stream, word by word (a tool call as its deltas), usage last.
pub fn respond(call: &ProviderCall) -> ChunkStream {
    if let Some(e) = &call.request.inbound.embeddings {
        return embeddings(call, e);
    }
    let (text, finish) = completion_text(call);
    let answer = match chosen_tool(call) {
        Some(tool) => Answer::Call {
            id: format!(
                "call_mock_{}",
                &call.ctx.request_id().trim_start_matches("gen-")
            ),
            name: tool.function.name.clone(),
            arguments: tool_arguments(tool, &text).to_string(),
        },
        None => Answer::Text(text, finish),
    };
    let n = call.request.choices().max(1);
    let usage = Usage::new(prompt_words(call), answer.words() * u64::from(n));
    let mut chunks = Vec::new();
    for index in 0..n {
        let with_index = |mut c: ChatChunk| {
            c.choices[0].index = index;
            c
        };
        match (&answer, call.request.stream) {
            (Answer::Text(text, finish), true) => {
                chunks.push(with_index(ChatChunk::delta(Delta {
                    role: Some(Role::Assistant),
                    content: Some(String::new()),
                    ..Delta::default()
                })));
                chunks.extend(
                    text.split_inclusive(' ')
                        .map(|w| with_index(ChatChunk::text(w))),
                );
                let mut last = ChatChunk::delta(Delta::default());
                last.choices[0].finish_reason = Some((*finish).into());
                chunks.push(with_index(last));
            }
            (Answer::Text(text, finish), false) => {
                let mut chunk = ChatChunk::delta(Delta {
                    role: Some(Role::Assistant),
                    content: Some(text.clone()),
                    ..Delta::default()
                });
                chunk.choices[0].finish_reason = Some((*finish).into());
                chunks.push(with_index(chunk));
            }
            (
                Answer::Call {
                    id,
                    name,
                    arguments,
                },
                true,
            ) => {
                let call_delta = |first: bool, args: &str| {
                    ChatChunk::delta(Delta {
                        role: first.then_some(Role::Assistant),
                        tool_calls: Some(vec![ToolCallDelta {
                            index: 0,
                            id: first.then(|| id.clone()),
                            kind: first.then(|| "function".to_string()),
                            function: Some(FunctionCallDelta {
                                name: first.then(|| name.clone()),
                                arguments: Some(args.to_string()),
                            }),
                        }]),
                        ..Delta::default()
                    })
                };
                chunks.push(with_index(call_delta(true, "")));
                // The arguments in pieces, as upstreams stream them.
                let mut rest = arguments.as_str();
                while !rest.is_empty() {
                    let mut at = rest.len().min(16);
                    while !rest.is_char_boundary(at) {
                        at += 1;
                    }
                    chunks.push(with_index(call_delta(false, &rest[..at])));
                    rest = &rest[at..];
                }
                let mut last = ChatChunk::delta(Delta::default());
                last.choices[0].finish_reason = Some("tool_calls".into());
                chunks.push(with_index(last));
            }
            (
                Answer::Call {
                    id,
                    name,
                    arguments,
                },
                false,
            ) => {
                let mut chunk = ChatChunk::delta(Delta {
                    role: Some(Role::Assistant),
                    tool_calls: Some(vec![ToolCallDelta {
                        index: 0,
                        id: Some(id.clone()),
                        kind: Some("function".into()),
                        function: Some(FunctionCallDelta {
                            name: Some(name.clone()),
                            arguments: Some(arguments.clone()),
                        }),
                    }]),
                    ..Delta::default()
                });
                chunk.choices[0].finish_reason = Some("tool_calls".into());
                chunks.push(with_index(chunk));
            }
        }
    }
    if call.request.stream {
        chunks.push(ChatChunk::usage(usage));
    } else if let Some(first) = chunks.first_mut() {
        first.usage = Some(usage);
    }
    Box::pin(stream::iter(chunks.into_iter().map(Ok)))
}

/// Answers a call as a slow upstream would: after the endpoint's `delay` (past the
/// provider's `timeout`, the attempt fails as a timeout once that has passed), then
/// a stream's chunks `chunk_delay` apart (past `stream_idle_timeout`, the stream
/// stalls after its first chunk and is cut as idle). Waits are `tokio::time`
/// sleeps, so paused-time tests step through them, and dropping the call or its
/// stream (the client gone, a deadline) ends them.
pub async fn call(call: ProviderCall) -> Result<ChunkStream, GatewayError> {
    let endpoint = call.endpoint.clone();
    let provider = &endpoint.provider;
    if !endpoint.delay.is_zero() {
        if endpoint.delay > provider.timeout {
            tokio::time::sleep(provider.timeout).await;
            return Err(ProviderError::new(
                provider.name.clone(),
                FailureKind::Timeout,
                format!("no response within {}s", provider.timeout.as_secs()),
            )
            .into());
        }
        tokio::time::sleep(endpoint.delay).await;
    }
    let mut chunks = respond(&call);
    let gap = endpoint.chunk_delay;
    if gap.is_zero() || !call.request.stream {
        return Ok(chunks);
    }
    let idle = provider.stream_idle_timeout;
    if gap > idle {
        let first = chunks.next().await;
        let name = provider.name.clone();
        let cut = stream::once(async move {
            tokio::time::sleep(idle).await;
            Err(ProviderError::new(
                name,
                FailureKind::StreamIdle,
                format!("no event for {}s", idle.as_secs()),
            )
            .into())
        });
        return Ok(Box::pin(stream::iter(first).chain(cut)));
    }
    Ok(Box::pin(chunks.enumerate().then(
        move |(i, c)| async move {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            c
        },
    )))
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

    fn echo_call(f: impl FnOnce(&mut ChatRequest)) -> ProviderCall {
        let catalog = Catalog::from_config(&Config::demo());
        let mut request = ChatRequest {
            model: "mock/echo".into(),
            messages: vec![Message::text(Role::User, "weather in Paris")],
            ..Default::default()
        };
        f(&mut request);
        ProviderCall {
            endpoint: catalog.model("mock/echo").unwrap().endpoints[0].clone(),
            request: request.into(),
            ctx: CallContext::new(),
        }
    }

    fn tools(json: serde_json::Value) -> Option<Vec<Tool>> {
        Some(serde_json::from_value(json).unwrap())
    }

    async fn fold(s: ChunkStream) -> crate::chat::ChatCompletion {
        let mut agg = crate::chat::Aggregator::default();
        for c in s.collect::<Vec<_>>().await {
            agg.push(c.unwrap());
        }
        agg.finish()
    }

    #[test]
    fn tool_arguments_are_a_valid_instance_with_the_text_in_the_first_string() {
        let tool: Tool = serde_json::from_value(serde_json::json!({"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "required": ["query", "n"], "properties": {
                "a_flag": {"type": "boolean"}, "n": {"type": "integer", "minimum": 2},
                "query": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]},
                "note": {"type": ["string", "null"]}, "tags": {"type": "array"},
                "where": {"type": "object", "properties": {"x": {"type": "number"}}}}}}}))
        .unwrap();
        assert_eq!(
            tool_arguments(&tool, "hi there"),
            serde_json::json!({"a_flag": false, "n": 2, "query": "hi there", "unit": "c",
                               "note": "", "tags": [], "where": {"x": 0}})
        );
        // No schema: an empty object; no `required`: the first string by name.
        let bare: Tool = serde_json::from_value(serde_json::json!(
            {"type": "function", "function": {"name": "g"}}))
        .unwrap();
        assert_eq!(tool_arguments(&bare, "x"), serde_json::json!({}));
        let loose: Tool = serde_json::from_value(serde_json::json!({"type": "function", "function": {
            "name": "h", "parameters": {"properties": {"b": {"type": "string"}, "a": {"type": "string"}}}}}))
        .unwrap();
        assert_eq!(
            tool_arguments(&loose, "x"),
            serde_json::json!({"a": "x", "b": ""})
        );
    }

    #[tokio::test]
    async fn echo_calls_the_chosen_tool_then_echoes_its_result() {
        let two = tools(serde_json::json!([
            {"type": "function", "function": {"name": "first", "parameters": {"type": "object",
                "properties": {"q": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "second"}}]));
        for stream in [false, true] {
            let call = echo_call(|r| {
                r.tools = two.clone();
                r.stream = stream;
            });
            let c = fold(respond(&call)).await;
            assert_eq!(c.choices[0].finish_reason.as_deref(), Some("tool_calls"));
            let tc = &c.choices[0].message.tool_calls.as_ref().unwrap()[0];
            assert_eq!(tc.function.name, "first");
            assert!(tc.id.starts_with("call_mock_"), "{}", tc.id);
            let args: serde_json::Value = serde_json::from_str(&tc.function.arguments).unwrap();
            assert_eq!(
                args,
                serde_json::json!({"q": "weather in Paris"}),
                "stream {stream}"
            );
            assert!(c.usage.unwrap().completion_tokens > 0);
        }
        let named = echo_call(|r| {
            r.tools = two.clone();
            r.tool_choice =
                Some(serde_json::json!({"type": "function", "function": {"name": "second"}}));
        });
        let c = fold(respond(&named)).await;
        assert_eq!(
            c.choices[0].message.tool_calls.as_ref().unwrap()[0]
                .function
                .name,
            "second"
        );
        let none = echo_call(|r| {
            r.tools = two.clone();
            r.tool_choice = Some(serde_json::json!("none"));
        });
        let c = fold(respond(&none)).await;
        assert_eq!(
            c.choices[0].message.content.as_deref(),
            Some("weather in Paris")
        );
        // The turn after the call: the tool's result comes back as text.
        let follow_up = echo_call(|r| {
            r.tools = two.clone();
            let mut result = Message::text(Role::Tool, "18 C and sunny");
            result.tool_call_id = Some("call_1".into());
            r.messages.push(result);
        });
        let c = fold(respond(&follow_up)).await;
        assert_eq!(
            c.choices[0].message.content.as_deref(),
            Some("18 C and sunny")
        );
        assert_eq!(c.choices[0].finish_reason.as_deref(), Some("stop"));
    }

    #[tokio::test]
    async fn n_choices_each_answer_and_usage_counts_them_all() {
        for stream in [false, true] {
            let call = echo_call(|r| {
                r.n = Some(3);
                r.stream = stream;
            });
            let c = fold(respond(&call)).await;
            assert_eq!(c.choices.len(), 3, "stream {stream}");
            for (i, ch) in c.choices.iter().enumerate() {
                assert_eq!(ch.index, i as u32);
                assert_eq!(ch.message.content.as_deref(), Some("weather in Paris"));
            }
            let u = c.usage.unwrap();
            assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 9));
        }
    }

    fn slow_call(delay_ms: u64, chunk_delay_ms: u64, timeout_secs: u64) -> ProviderCall {
        let config = Config::from_toml(&format!(
            r#"
[[providers]]
name = "slow"
kind = "mock"
timeout_secs = {timeout_secs}
stream_idle_timeout_secs = {timeout_secs}
[[models]]
id = "slow/echo"
  [[models.endpoints]]
  provider = "slow"
  upstream_model = "echo"
  prompt_usd_per_mtok = 0
  completion_usd_per_mtok = 0
  delay_ms = {delay_ms}
  chunk_delay_ms = {chunk_delay_ms}
"#
        ))
        .unwrap();
        let catalog = Catalog::from_config(&config);
        ProviderCall {
            endpoint: catalog.model("slow/echo").unwrap().endpoints[0].clone(),
            request: ChatRequest {
                model: "slow/echo".into(),
                messages: vec![Message::text(Role::User, "one two three")],
                stream: true,
                ..Default::default()
            }
            .into(),
            ctx: CallContext::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_hold_the_answer_and_space_the_chunks() {
        let start = tokio::time::Instant::now();
        let mut s = call(slow_call(1500, 200, 5)).await.unwrap();
        assert_eq!(start.elapsed(), std::time::Duration::from_millis(1500));
        let mut at = Vec::new();
        let mut text = String::new();
        while let Some(c) = s.next().await {
            let c = c.unwrap();
            if let Some(t) = c.choices.first().and_then(|ch| ch.delta.content.as_deref()) {
                text.push_str(t);
            }
            at.push(start.elapsed().as_millis());
        }
        assert_eq!(text, "one two three");
        // Role, three words, finish, usage: 200 ms apart after the first.
        assert_eq!(at, [1500, 1700, 1900, 2100, 2300, 2500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_past_the_timeout_is_a_timeout_and_a_gap_past_idle_a_stall() {
        let start = tokio::time::Instant::now();
        let err = match call(slow_call(600_000, 0, 2)).await {
            Err(e) => e,
            Ok(_) => panic!("a delay past timeout_secs must time out"),
        };
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(2));
        assert!(
            matches!(&err, GatewayError::Provider(p) if p.is_timeout()),
            "{err}"
        );

        let mut s = call(slow_call(0, 5_000, 2)).await.unwrap();
        assert!(s.next().await.unwrap().is_ok(), "the first chunk comes");
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(4));
        assert!(err.to_string().contains("no event for 2s"), "{err}");
        assert!(s.next().await.is_none());
    }

    /// `max_tokens: 4294967295` aborted the process on a 68 GB allocation.
    #[test]
    fn lorem_is_capped_whatever_max_tokens_asks() {
        let text = lorem(Some(u32::MAX));
        assert_eq!(text.split(' ').count(), LOREM_MAX_WORDS);
        assert!(text.len() < 40_000);
    }
}
