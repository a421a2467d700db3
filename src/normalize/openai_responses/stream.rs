//! A streamed reply as the Responses API's typed events: `event: TYPE` and a
//! `data:` object with its `type` and a `sequence_number` counting from 0.
//!
//! `response.created` and `response.in_progress` open the stream. Each output item
//! is opened when its first delta arrives and closed when another kind of item
//! starts or the stream ends: a `message` item with its `output_text` part
//! (`response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta`…, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`), a `reasoning` item
//! with one summary part (`response.reasoning_summary_part.added`,
//! `response.reasoning_summary_text.delta`…, `.done`), one `function_call` item per
//! tool call (`response.function_call_arguments.delta`…, `.done`). The end is
//! `response.completed` with the whole response (usage included; `status`
//! `incomplete` when the answer was cut); an error after the start is
//! `response.failed` with the response so far and its `error`.

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use super::response::{item_id, status_of, Head, Item, OutputText, SummaryText};
use crate::chat::{ChatChunk, ChatRequest, ToolCallDelta, Usage};
use crate::context::CallContext;
use crate::error::GatewayError;

/// One event's `data`: its `type`, `sequence_number`, and the fields of its kind.
#[derive(Serialize, Default)]
struct Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<&'a super::response::ResponseObject<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    item: Option<&'a Item>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<Part<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<[(); 0]>,
}

/// A part in `content_part` and `reasoning_summary_part` events.
#[derive(Serialize)]
#[serde(untagged)]
enum Part<'a> {
    Output(&'a OutputText),
    Summary(&'a SummaryText),
}

/// The kind of output item a delta extends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reasoning,
    Message,
    Call,
}

/// Writes one stream's events.
pub(crate) struct Encoder {
    ctx: CallContext,
    model: Arc<str>,
    provider: Option<Arc<str>>,
    request: Arc<ChatRequest>,
    /// The next event's `sequence_number`.
    seq: u64,
    started: bool,
    /// The output so far, in order.
    items: Vec<Item>,
    /// The item deltas go to, when one is open: its index in `items` and kind.
    open: Option<(usize, Kind)>,
    /// `(tool-call index, item index)` of each tool call seen.
    calls: Vec<(u32, usize)>,
    usage: Option<Usage>,
    finish: Option<String>,
}

impl Encoder {
    /// The encoder of one stream; `endpoint` is `None` when the stream ends before
    /// any endpoint served (the model is then the one asked for).
    pub(crate) fn new(
        ctx: CallContext,
        endpoint: Option<&crate::catalog::Endpoint>,
        request: &Arc<ChatRequest>,
    ) -> Self {
        let (model, provider) = match endpoint {
            Some(e) => (e.model.clone(), Some(e.provider.name.clone())),
            None => (Arc::from(request.model.as_str()), None),
        };
        Encoder {
            ctx,
            model,
            provider,
            request: request.clone(),
            seq: 0,
            started: false,
            items: Vec::new(),
            open: None,
            calls: Vec::new(),
            usage: None,
            finish: None,
        }
    }

    /// One chunk's events, or `None` when there is nothing in it for this client.
    pub(crate) fn chunk(&mut self, chunk: &ChatChunk) -> Option<Bytes> {
        let mut out = Vec::new();
        if let Some(u) = &chunk.usage {
            self.usage = Some(u.clone());
        }
        // One answer per response: choices other than the first are not this API's.
        for c in chunk.choices.iter().filter(|c| c.index == 0) {
            let d = &c.delta;
            if let Some(r) = d.reasoning.as_deref().filter(|r| !r.is_empty()) {
                self.reasoning_delta(r, &mut out);
            }
            if let Some(t) = d.content.as_deref().filter(|t| !t.is_empty()) {
                self.text_delta(t, &mut out);
            }
            for tc in d.tool_calls.iter().flatten() {
                self.call_delta(tc, &mut out);
            }
            if let Some(f) = &c.finish_reason {
                self.finish = Some(f.clone());
            }
        }
        (!out.is_empty()).then(|| Bytes::from(out))
    }

    /// The end of a complete stream: open items closed, then `response.completed`.
    pub(crate) fn done(&mut self) -> Bytes {
        let mut out = Vec::new();
        self.start(&mut out);
        let (status, _) = status_of(self.finish.as_deref());
        if status == "incomplete" {
            // The item the answer was cut in.
            if let Some((i, _)) = self.open {
                self.items[i].set_status("incomplete");
            }
        }
        self.close(&mut out);
        self.response_event("response.completed", false, None, &mut out);
        Bytes::from(out)
    }

    /// The end of a stream cut by `e` after it started: `response.failed` with the
    /// output so far (recorded in the context).
    pub(crate) fn error(&mut self, e: &GatewayError) -> Bytes {
        super::super::record_stream_error(&self.ctx, e);
        let mut out = Vec::new();
        self.start(&mut out);
        if let Some((i, _)) = self.open.take() {
            self.items[i].set_status("incomplete");
        }
        self.response_event("response.failed", false, Some(e), &mut out);
        Bytes::from(out)
    }

    /// Appends one event, numbered.
    fn emit(&mut self, event: Event<'_>, out: &mut Vec<u8>) {
        write_event(event, self.seq, out);
        self.seq += 1;
    }

    /// `response.created` and `response.in_progress`, once.
    fn start(&mut self, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        self.response_event("response.created", true, None, out);
        self.response_event("response.in_progress", true, None, out);
    }

    /// An event carrying the whole response as it stands.
    fn response_event(
        &mut self,
        kind: &str,
        in_progress: bool,
        error: Option<&GatewayError>,
        out: &mut Vec<u8>,
    ) {
        let seq = self.seq;
        self.seq += 1;
        let head = Head {
            id: self.ctx.request_id(),
            created_at: self.ctx.created(),
            model: &self.model,
            provider: self.provider.as_deref(),
            request: &self.request,
        };
        let usage = if in_progress {
            None
        } else {
            self.usage.as_ref()
        };
        let object = head.object(
            &self.items,
            usage,
            self.finish.as_deref(),
            in_progress,
            error,
        );
        let event = Event {
            kind,
            response: Some(&object),
            ..Event::default()
        };
        write_event(event, seq, out);
    }

    /// The item deltas of `kind` go to: the open one if it is of that kind, else a
    /// new one (the open one closed first).
    fn item_for(&mut self, kind: Kind, out: &mut Vec<u8>) -> usize {
        self.start(out);
        if let Some((i, k)) = self.open {
            if k == kind && kind != Kind::Call {
                return i;
            }
        }
        self.close(out);
        let index = self.items.len();
        let rid = self.ctx.request_id().to_owned();
        let item = match kind {
            Kind::Reasoning => Item::Reasoning {
                id: item_id("rs", &rid, index),
                summary: Vec::new(),
            },
            Kind::Message => Item::Message {
                id: item_id("msg", &rid, index),
                status: "in_progress",
                role: "assistant",
                content: Vec::new(),
            },
            // Filled in by `call_delta`.
            Kind::Call => Item::FunctionCall {
                id: item_id("fc", &rid, index),
                call_id: String::new(),
                name: String::new(),
                arguments: String::new(),
                status: "in_progress",
            },
        };
        self.items.push(item);
        self.open = Some((index, kind));
        if kind != Kind::Call {
            self.item_added(index, out);
        }
        index
    }

    fn item_added(&mut self, index: usize, out: &mut Vec<u8>) {
        let item = self.items[index].clone();
        self.emit(
            Event {
                kind: "response.output_item.added",
                output_index: Some(index),
                item: Some(&item),
                ..Event::default()
            },
            out,
        );
        let id = item.id().to_owned();
        match item {
            Item::Message { .. } => {
                let part = OutputText::new(String::new());
                self.emit(
                    Event {
                        kind: "response.content_part.added",
                        item_id: Some(&id),
                        output_index: Some(index),
                        content_index: Some(0),
                        part: Some(Part::Output(&part)),
                        ..Event::default()
                    },
                    out,
                );
                if let Item::Message { content, .. } = &mut self.items[index] {
                    content.push(part);
                }
            }
            Item::Reasoning { .. } => {
                let part = SummaryText::new(String::new());
                self.emit(
                    Event {
                        kind: "response.reasoning_summary_part.added",
                        item_id: Some(&id),
                        output_index: Some(index),
                        summary_index: Some(0),
                        part: Some(Part::Summary(&part)),
                        ..Event::default()
                    },
                    out,
                );
                if let Item::Reasoning { summary, .. } = &mut self.items[index] {
                    summary.push(part);
                }
            }
            Item::FunctionCall { .. } => {}
        }
    }

    fn text_delta(&mut self, delta: &str, out: &mut Vec<u8>) {
        let index = self.item_for(Kind::Message, out);
        if let Item::Message { content, .. } = &mut self.items[index] {
            if let Some(part) = content.first_mut() {
                part.text.push_str(delta);
            }
        }
        let id = self.items[index].id().to_owned();
        self.emit(
            Event {
                kind: "response.output_text.delta",
                item_id: Some(&id),
                output_index: Some(index),
                content_index: Some(0),
                delta: Some(delta),
                logprobs: Some([]),
                ..Event::default()
            },
            out,
        );
    }

    fn reasoning_delta(&mut self, delta: &str, out: &mut Vec<u8>) {
        let index = self.item_for(Kind::Reasoning, out);
        if let Item::Reasoning { summary, .. } = &mut self.items[index] {
            if let Some(part) = summary.first_mut() {
                part.text.push_str(delta);
            }
        }
        let id = self.items[index].id().to_owned();
        self.emit(
            Event {
                kind: "response.reasoning_summary_text.delta",
                item_id: Some(&id),
                output_index: Some(index),
                summary_index: Some(0),
                delta: Some(delta),
                ..Event::default()
            },
            out,
        );
    }

    /// A tool-call fragment: the call's item opened at its first fragment (with its
    /// id and name), its argument text as deltas. A fragment of a call whose item was
    /// already closed (an upstream interleaving calls) still extends it, so the
    /// final response holds every call whole.
    fn call_delta(&mut self, tc: &ToolCallDelta, out: &mut Vec<u8>) {
        let known = self.calls.iter().find(|(i, _)| *i == tc.index).map(|c| c.1);
        let (index, new) = match known {
            Some(index) => (index, false),
            None => {
                let index = self.item_for(Kind::Call, out);
                self.calls.push((tc.index, index));
                (index, true)
            }
        };
        let f = tc.function.as_ref();
        if let Item::FunctionCall { call_id, name, .. } = &mut self.items[index] {
            if let Some(id) = tc.id.as_deref() {
                if call_id.is_empty() {
                    id.clone_into(call_id);
                }
            }
            if let Some(n) = f.and_then(|f| f.name.as_deref()) {
                name.push_str(n);
            }
        }
        if new {
            if let Item::FunctionCall { id, call_id, .. } = &mut self.items[index] {
                if call_id.is_empty() {
                    // Every call has an id the client can answer by.
                    call_id.clone_from(id);
                }
            }
            self.item_added(index, out);
        }
        let Some(args) = f
            .and_then(|f| f.arguments.as_deref())
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        if let Item::FunctionCall { arguments, .. } = &mut self.items[index] {
            arguments.push_str(args);
        }
        let id = self.items[index].id().to_owned();
        self.emit(
            Event {
                kind: "response.function_call_arguments.delta",
                item_id: Some(&id),
                output_index: Some(index),
                delta: Some(args),
                ..Event::default()
            },
            out,
        );
    }

    /// Closes the open item: its `.done` events, then `response.output_item.done`.
    fn close(&mut self, out: &mut Vec<u8>) {
        let Some((index, _)) = self.open.take() else {
            return;
        };
        if let Item::Message { status, .. } | Item::FunctionCall { status, .. } =
            &mut self.items[index]
        {
            if *status == "in_progress" {
                *status = "completed";
            }
        }
        let item = self.items[index].clone();
        let id = item.id();
        match &item {
            Item::Message { content, .. } => {
                if let Some(part) = content.first() {
                    self.emit(
                        Event {
                            kind: "response.output_text.done",
                            item_id: Some(id),
                            output_index: Some(index),
                            content_index: Some(0),
                            text: Some(&part.text),
                            logprobs: Some([]),
                            ..Event::default()
                        },
                        out,
                    );
                    self.emit(
                        Event {
                            kind: "response.content_part.done",
                            item_id: Some(id),
                            output_index: Some(index),
                            content_index: Some(0),
                            part: Some(Part::Output(part)),
                            ..Event::default()
                        },
                        out,
                    );
                }
            }
            Item::Reasoning { summary, .. } => {
                if let Some(part) = summary.first() {
                    self.emit(
                        Event {
                            kind: "response.reasoning_summary_text.done",
                            item_id: Some(id),
                            output_index: Some(index),
                            summary_index: Some(0),
                            text: Some(&part.text),
                            ..Event::default()
                        },
                        out,
                    );
                    self.emit(
                        Event {
                            kind: "response.reasoning_summary_part.done",
                            item_id: Some(id),
                            output_index: Some(index),
                            summary_index: Some(0),
                            part: Some(Part::Summary(part)),
                            ..Event::default()
                        },
                        out,
                    );
                }
            }
            Item::FunctionCall {
                name, arguments, ..
            } => {
                self.emit(
                    Event {
                        kind: "response.function_call_arguments.done",
                        item_id: Some(id),
                        output_index: Some(index),
                        name: Some(name),
                        arguments: Some(arguments),
                        ..Event::default()
                    },
                    out,
                );
            }
        }
        self.emit(
            Event {
                kind: "response.output_item.done",
                output_index: Some(index),
                item: Some(&item),
                ..Event::default()
            },
            out,
        );
    }
}

/// Writes `event` as SSE with `sequence_number` `seq`.
fn write_event(mut event: Event<'_>, seq: u64, out: &mut Vec<u8>) {
    event.sequence_number = seq;
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Serialising borrowed strings, numbers and `Value`s into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &event);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{Delta, Dialect, FunctionCallDelta};
    use serde_json::Value;

    fn encoder() -> Encoder {
        let mut request = ChatRequest {
            model: "mock/echo".into(),
            ..ChatRequest::default()
        };
        request.inbound.dialect = Dialect::OpenAiResponses;
        Encoder::new(CallContext::new(), None, &Arc::new(request))
    }

    /// `(type, data)` of each event, checking the framing and the numbering.
    fn events(bytes: &[Bytes]) -> Vec<Value> {
        let text: String = bytes
            .iter()
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect();
        let mut out: Vec<Value> = Vec::new();
        for block in text.split("\n\n").filter(|b| !b.is_empty()) {
            let (name, data) = block.split_once('\n').unwrap();
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(
                Some(v["type"].as_str().unwrap()),
                name.strip_prefix("event: ")
            );
            assert_eq!(v["sequence_number"], out.len());
            out.push(v);
        }
        out
    }

    fn kinds(ev: &[Value]) -> Vec<&str> {
        ev.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    #[test]
    fn an_error_before_any_chunk_still_opens_with_created() {
        let mut e = encoder();
        let ev = events(&[e.error(&GatewayError::UpstreamTimeout("slow".into()))]);
        assert_eq!(
            kinds(&ev),
            [
                "response.created",
                "response.in_progress",
                "response.failed"
            ]
        );
        let r = &ev[2]["response"];
        assert_eq!(r["status"], "failed");
        assert_eq!(r["model"], "mock/echo");
        assert_eq!(r["error"]["code"], "upstream_timeout");
        assert_eq!(r["error"]["message"], "slow");
    }

    #[test]
    fn an_empty_answer_completes_and_interleaved_calls_stay_whole() {
        let mut e = encoder();
        assert_eq!(
            kinds(&events(&[e.done()])),
            [
                "response.created",
                "response.in_progress",
                "response.completed"
            ]
        );

        let call = |index: u32, id: Option<&str>, args: &str| {
            ChatChunk::delta(Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index,
                    id: id.map(str::to_owned),
                    kind: None,
                    function: Some(FunctionCallDelta {
                        name: id.map(|_| "f".to_owned()),
                        arguments: Some(args.into()),
                    }),
                }]),
                ..Delta::default()
            })
        };
        let mut e = encoder();
        let mut out = Vec::new();
        for c in [
            ChatChunk::text("Calling."),
            call(0, Some("a"), "{\"x\":"),
            call(1, Some("b"), "{}"),
            call(0, None, "1}"),
        ] {
            out.extend(e.chunk(&c));
        }
        out.push(e.done());
        let ev = events(&out);
        let done = &ev.last().unwrap()["response"];
        assert_eq!(done["output"][0]["content"][0]["text"], "Calling.");
        assert_eq!(done["output"][1]["call_id"], "a");
        assert_eq!(done["output"][1]["arguments"], "{\"x\":1}");
        assert_eq!(done["output"][2]["arguments"], "{}");
        let added: Vec<&Value> = ev
            .iter()
            .filter(|e| e["type"] == "response.output_item.added")
            .map(|e| &e["output_index"])
            .collect();
        assert_eq!(added, [0, 1, 2]);
    }
}
