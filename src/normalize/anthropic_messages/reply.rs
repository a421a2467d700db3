//! Answers in Anthropic's shape: the `message` object of a folded reply, and a
//! stream's events (`message_start` … `message_stop`, SPEC §7.1).

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::chat::{AnthropicRaw, ChatChunk, ChatCompletion, ChatRequest, NativeStop, Usage};
use crate::context::CallContext;
use crate::error::GatewayError;
use crate::money::Money;

/// Anthropic's `stop_reason` of a chat `finish_reason`.
pub(crate) fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// A content block of an answer (and the shell of a streamed one).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Thinking {
        thinking: &'a str,
        signature: &'a str,
    },
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
}

/// `usage` in Anthropic's terms: `input_tokens` excludes cache reads and writes.
#[derive(Serialize, Default)]
struct UsageOut {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<Money>,
    /// The charge by kind of token (cache reads and writes priced apart).
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_details: Option<crate::chat::CostDetails>,
}

impl UsageOut {
    fn of(u: Option<&Usage>) -> UsageOut {
        let Some(u) = u else {
            return UsageOut::default();
        };
        let read = u.cached_tokens();
        let written = u.cache_write_tokens();
        UsageOut {
            input_tokens: u.prompt_tokens.saturating_sub(read.saturating_add(written)),
            output_tokens: u.completion_tokens,
            cache_read_input_tokens: read,
            cache_creation_input_tokens: written,
            cost: u.cost,
            cost_details: u.cost_details,
        }
    }
}

/// A `message` object.
#[derive(Serialize)]
struct MessageOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: ContentOut<'a>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'a str>,
    usage: UsageOut,
}

/// A `message`'s `content`: the blocks the gateway writes, or an anthropic-kind
/// upstream's array as it sent it ([`AnthropicRaw`]).
#[derive(Serialize)]
#[serde(untagged)]
enum ContentOut<'a> {
    Blocks(Vec<Block<'a>>),
    Raw(&'a serde_json::value::RawValue),
}

/// `stop_reason` and `stop_sequence`: an anthropic-kind upstream's own, else those of
/// the chat `finish_reason`.
fn stop_of<'a>(
    native: Option<&'a NativeStop>,
    finish_reason: Option<&str>,
) -> (&'static str, Option<&'a str>) {
    match native {
        Some(n) => (n.reason, n.sequence.as_deref()),
        None => (stop_reason(finish_reason), None),
    }
}

/// The content blocks of a chat answer: thinking (with its signature), text, a
/// `tool_use` per tool call.
fn blocks(m: &crate::chat::ResponseMessage) -> Vec<Block<'_>> {
    let mut content = Vec::new();
    if m.reasoning.is_some() || m.reasoning_signature.is_some() {
        content.push(Block::Thinking {
            thinking: m.reasoning.as_deref().unwrap_or_default(),
            signature: m.reasoning_signature.as_deref().unwrap_or_default(),
        });
    }
    if let Some(text) = m.content.as_deref().filter(|t| !t.is_empty()) {
        content.push(Block::Text { text });
    }
    for call in m.tool_calls.iter().flatten() {
        content.push(Block::ToolUse {
            id: &call.id,
            name: &call.function.name,
            input: crate::providers::media::arguments_object(&call.function.arguments),
        });
    }
    content
}

/// The `message` body of a folded reply.
pub(crate) fn json_body(completion: &ChatCompletion, _request: &ChatRequest) -> Vec<u8> {
    let choice = completion.choices.first();
    // An anthropic-kind upstream's own blocks when it sent them; else the translation.
    let content = match choice.and_then(|c| c.message.anthropic_content.as_ref()) {
        Some(raw) => ContentOut::Raw(&raw.0),
        None => ContentOut::Blocks(choice.map_or_else(Vec::new, |c| blocks(&c.message))),
    };
    let (stop, sequence) = stop_of(
        choice.and_then(|c| c.message.native_stop.as_ref()),
        choice.and_then(|c| c.finish_reason.as_deref()),
    );
    let message = MessageOut {
        id: &completion.id,
        kind: "message",
        role: "assistant",
        model: &completion.model,
        content,
        stop_reason: Some(stop),
        stop_sequence: sequence,
        usage: UsageOut::of(completion.usage.as_ref()),
    };
    serde_json::to_vec(&message).unwrap_or_default()
}

/// `content_block_delta.delta` (the variants are named as Anthropic's `type`s).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::enum_variant_names)]
enum DeltaOut<'a> {
    TextDelta { text: &'a str },
    ThinkingDelta { thinking: &'a str },
    SignatureDelta { signature: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

/// `message_delta.delta`.
#[derive(Serialize)]
struct MessageDeltaOut<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

/// `error.error`.
#[derive(Serialize)]
struct ErrorOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

/// One stream event; its `type` is also the SSE event name.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: MessageOut<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: DeltaOut<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaOut<'a>,
        usage: UsageOut,
    },
    MessageStop,
    Error {
        error: ErrorOut<'a>,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Error { .. } => "error",
        }
    }

    /// `event: NAME\ndata: JSON\n\n`, appended to `out`.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serialising these types cannot fail (string keys, no maps of other keys).
        let _ = serde_json::to_writer(&mut *out, self);
        out.extend_from_slice(b"\n\n");
    }
}

/// `event: NAME\ndata: DATA\n\n` of an event kept as sent, appended to `out` (`data`
/// is one line of JSON: the adapter made it so).
fn write_event(name: &str, data: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// The content block a stream has open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    Thinking,
    /// A tool call, by its index among the choice's tool calls.
    Tool(u32),
}

/// Writes one stream's events: `message_start` before the first, a content block per
/// run of text, of reasoning, and per tool call, `message_delta` (stop reason and
/// usage with `cost`) and `message_stop` at the end.
pub(crate) struct Encoder {
    ctx: CallContext,
    model: Arc<str>,
    started: bool,
    /// The open block and its index.
    open: Option<(Open, u32)>,
    next_index: u32,
    finish_reason: Option<String>,
    /// An anthropic-kind upstream's own stop reason, when it sent one.
    native_stop: Option<NativeStop>,
    usage: Option<Usage>,
    ended: bool,
}

impl Encoder {
    /// An encoder for `endpoint`'s answer (`None` after an early commit's failure).
    pub(crate) fn new(
        ctx: CallContext,
        endpoint: Option<&crate::catalog::Endpoint>,
        _request: &Arc<ChatRequest>,
    ) -> Self {
        Encoder {
            ctx,
            model: endpoint.map_or_else(|| Arc::from(""), |e| e.model.clone()),
            started: false,
            open: None,
            next_index: 0,
            finish_reason: None,
            native_stop: None,
            usage: None,
            ended: false,
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = self.ctx.request_id().to_owned();
        Event::MessageStart {
            message: MessageOut {
                id: &id,
                kind: "message",
                role: "assistant",
                model: &self.model,
                content: ContentOut::Blocks(Vec::new()),
                stop_reason: None,
                stop_sequence: None,
                usage: UsageOut::default(),
            },
        }
        .write(out);
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((_, index)) = self.open.take() {
            Event::ContentBlockStop { index }.write(out);
        }
    }

    /// Makes `block` the open block (closing another), starting it with `shell`;
    /// its index.
    fn open(&mut self, block: Open, shell: Block<'_>, out: &mut Vec<u8>) -> u32 {
        if let Some((open, index)) = self.open {
            if open == block {
                return index;
            }
        }
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        Event::ContentBlockStart {
            index,
            content_block: shell,
        }
        .write(out);
        self.open = Some((block, index));
        index
    }

    /// One chunk's events, or `None` when there is nothing for this client in it.
    pub(crate) fn chunk(&mut self, chunk: &ChatChunk) -> Option<Bytes> {
        let mut out = Vec::new();
        self.start(&mut out);
        if let Some(u) = &chunk.usage {
            self.usage = Some(u.clone());
        }
        // Anthropic answers one choice: choice 0.
        for c in chunk.choices.iter().filter(|c| c.index == 0) {
            let d = &c.delta;
            if d.native_stop.is_some() {
                self.native_stop.clone_from(&d.native_stop);
            }
            // An anthropic-kind upstream's block event: as it sent it, instead of its
            // translation (the two are never mixed within one upstream's answer).
            if let Some(AnthropicRaw::Event(name, data)) = &d.anthropic {
                write_event(name, data.0.get(), &mut out);
                if let Some(f) = &c.finish_reason {
                    self.finish_reason = Some(f.clone());
                }
                continue;
            }
            // Thinking text, then its signature: both deltas of one thinking block.
            let thinking = [
                d.reasoning
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .map(|t| DeltaOut::ThinkingDelta { thinking: t }),
                d.signature
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .map(|s| DeltaOut::SignatureDelta { signature: s }),
            ];
            for delta in thinking.into_iter().flatten() {
                let block = Block::Thinking {
                    thinking: "",
                    signature: "",
                };
                let index = self.open(Open::Thinking, block, &mut out);
                Event::ContentBlockDelta { index, delta }.write(&mut out);
            }
            if let Some(t) = d.content.as_deref().filter(|t| !t.is_empty()) {
                let index = self.open(Open::Text, Block::Text { text: "" }, &mut out);
                Event::ContentBlockDelta {
                    index,
                    delta: DeltaOut::TextDelta { text: t },
                }
                .write(&mut out);
            }
            for tc in d.tool_calls.iter().flatten() {
                let f = tc.function.as_ref();
                let shell = Block::ToolUse {
                    id: tc.id.as_deref().unwrap_or_default(),
                    name: f.and_then(|f| f.name.as_deref()).unwrap_or_default(),
                    input: Value::Object(Default::default()),
                };
                let index = self.open(Open::Tool(tc.index), shell, &mut out);
                if let Some(args) = f.and_then(|f| f.arguments.as_deref()) {
                    if !args.is_empty() {
                        Event::ContentBlockDelta {
                            index,
                            delta: DeltaOut::InputJsonDelta { partial_json: args },
                        }
                        .write(&mut out);
                    }
                }
            }
            if let Some(f) = &c.finish_reason {
                self.finish_reason = Some(f.clone());
                self.close(&mut out);
            }
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// Closes the open block, then `message_delta` (stop reason, usage with `cost`)
    /// and `message_stop`: the last event of a complete stream.
    pub(crate) fn done(&mut self) -> Bytes {
        let mut out = Vec::new();
        if self.ended {
            return Bytes::new();
        }
        self.ended = true;
        self.start(&mut out);
        self.close(&mut out);
        let (stop, sequence) = stop_of(self.native_stop.as_ref(), self.finish_reason.as_deref());
        Event::MessageDelta {
            delta: MessageDeltaOut {
                stop_reason: stop,
                stop_sequence: sequence,
            },
            usage: UsageOut::of(self.usage.as_ref()),
        }
        .write(&mut out);
        Event::MessageStop.write(&mut out);
        Bytes::from(out)
    }

    /// An `error` event: the end of a stream cut by `e` (recorded in the context).
    pub(crate) fn error(&mut self, e: &GatewayError) -> Bytes {
        super::super::record_stream_error(&self.ctx, e);
        self.ended = true;
        let mut out = Vec::new();
        let message = e.to_string();
        Event::Error {
            error: ErrorOut {
                kind: super::error_type(e.status()),
                message: &message,
            },
        }
        .write(&mut out);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::{Delta, FunctionCallDelta, ToolCallDelta};
    use crate::config::Config;

    /// `(event name, data)` of each event in `text`.
    fn events(text: &str) -> Vec<(String, Value)> {
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(data["type"], name.as_str());
                (name, data)
            })
            .collect()
    }

    #[test]
    fn a_stream_of_thinking_text_and_tools_is_a_sequence_of_blocks() {
        let catalog = Catalog::from_config(&Config::demo());
        let ctx = CallContext::new();
        let req = Arc::new(ChatRequest::default());
        let mut e = Encoder::new(ctx.clone(), Some(&catalog.endpoints()[0]), &req);
        let mut text = String::new();
        let mut push = |e: &mut Encoder, c: ChatChunk| {
            if let Some(b) = e.chunk(&c) {
                text.push_str(std::str::from_utf8(&b).unwrap());
            }
        };
        push(
            &mut e,
            ChatChunk::delta(Delta {
                role: Some(crate::chat::Role::Assistant),
                content: Some(String::new()),
                ..Delta::default()
            }),
        );
        push(
            &mut e,
            ChatChunk::delta(Delta {
                reasoning: Some("hmm".into()),
                ..Delta::default()
            }),
        );
        push(
            &mut e,
            ChatChunk::delta(Delta {
                signature: Some("SIG".into()),
                ..Delta::default()
            }),
        );
        push(&mut e, ChatChunk::text("Hi"));
        for (i, args) in [(0, r#"{"a":"#), (0, "1}"), (1, "{}")] {
            push(
                &mut e,
                ChatChunk::delta(Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index: i,
                        id: Some(format!("call_{i}")),
                        kind: None,
                        function: Some(FunctionCallDelta {
                            name: Some("f".into()),
                            arguments: Some(args.into()),
                        }),
                    }]),
                    ..Delta::default()
                }),
            );
        }
        let mut last = ChatChunk::delta(Delta::default());
        last.choices[0].finish_reason = Some("tool_calls".into());
        push(&mut e, last);
        let mut usage = Usage::new(100, 7);
        usage.prompt_tokens_details = Some(crate::chat::PromptTokensDetails {
            cached_tokens: 60,
            cache_write_tokens: 10,
        });
        usage.cost = Some("0.0001".parse().unwrap());
        push(&mut e, ChatChunk::usage(usage));
        text.push_str(std::str::from_utf8(&e.done()).unwrap());
        let ev = events(&text);
        let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
            "{text}"
        );
        assert_eq!(ev[0].1["message"]["id"], ctx.request_id());
        assert_eq!(ev[1].1["content_block"]["type"], "thinking");
        assert_eq!(
            ev[3].1["delta"],
            serde_json::json!({"type": "signature_delta", "signature": "SIG"})
        );
        assert_eq!(ev[6].1["delta"]["text"], "Hi");
        assert_eq!(
            ev[8].1["content_block"],
            serde_json::json!({"type": "tool_use", "id": "call_0", "name": "f", "input": {}})
        );
        assert_eq!(ev[12].1["index"], 3);
        let md = &ev[15].1;
        assert_eq!(md["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            md["usage"],
            serde_json::json!({"input_tokens": 30, "output_tokens": 7,
            "cache_read_input_tokens": 60, "cache_creation_input_tokens": 10, "cost": 0.0001})
        );
        assert!(crate::normalize::stream_complete(text.as_bytes()));
    }

    #[test]
    fn an_error_is_an_error_event() {
        let mut e = Encoder::new(CallContext::new(), None, &Arc::new(ChatRequest::default()));
        let b = e.error(&GatewayError::UpstreamError("broke".into()));
        let ev = events(std::str::from_utf8(&b).unwrap());
        assert_eq!(
            ev[0].1,
            serde_json::json!({"type": "error", "error": {"type": "api_error", "message": "broke"}})
        );
    }
}
