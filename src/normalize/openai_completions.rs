//! `POST /v1/completions`: OpenAI's legacy completions API (prompt in, text out),
//! for older clients, served as chat.
//!
//! The body is read into the one [`ChatRequest`] every layer serves: `prompt` (a
//! string, or an array of one string) becomes one user message, and every other
//! field (`model`, `max_tokens`, `temperature`, `top_p`, `n`, `stop`, `stream`,
//! `stream_options`, `seed`, `user`, OpenRouter's `models` / `provider`, and
//! pass-through fields) is read exactly as chat completions reads it, so its errors
//! name the same paths. `max_tokens` has no default of its own: unset, the model's
//! `max_output_tokens` bounds the answer, as in chat (OpenAI's legacy default of 16
//! would cut most answers short). Several prompts, token-id prompts, `suffix`,
//! `echo: true`, `logprobs` and a `best_of` other than `n` are refused with a 400
//! naming the field; chat-only fields (`messages`, `tools`, `tool_choice`,
//! `functions`, `function_call`) are refused with a pointer to
//! `/v1/chat/completions`.
//!
//! Every provider kind is reached through its chat API, OpenAI-kind upstreams
//! included (`{base_url}/chat/completions`): fallback can cross provider kinds and
//! metering has one path, at the price that completions-only upstream models (such
//! as `gpt-3.5-turbo-instruct`) are not reachable through it.
//!
//! The answer is a `text_completion` object, `choices[].text` with `logprobs: null`,
//! and `usage` with `cost` as in chat; a stream is `text_completion` chunks ending in
//! `data: [DONE]`, with a usage chunk (`choices: []`) when asked for, and the error
//! chunk of SPEC §3.2 in this shape when the stream breaks after it started.
//!
//! # Example
//! ```
//! use switchboard::normalize::NormalizeLayer;
//! use switchboard::context::{ChatCall, ChatReply};
//! use switchboard::error::GatewayError;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(NormalizeLayer::new())
//!     .service(service_fn(|call: ChatCall| async move {
//!         // The prompt arrives as one user message.
//!         assert_eq!(call.request.messages[0].content.as_ref().unwrap().text(), "Say hi");
//!         Err::<ChatReply, _>(GatewayError::ModelNotFound(format!("no `{}`", call.request.model)))
//!     }));
//! let req = http::Request::post("/v1/completions")
//!     .body(r#"{"model":"x","prompt":"Say hi"}"#.to_string())
//!     .unwrap();
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 404);
//!
//! // One prompt per request.
//! let two = http::Request::post("/v1/completions")
//!     .body(r#"{"model":"x","prompt":["a","b"]}"#.to_string())
//!     .unwrap();
//! assert_eq!(svc.oneshot(two).await.unwrap().status(), 400);
//! # }
//! ```

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};

use super::fields::{field, invalid as bad, wrong};
use super::{record_stream_error, DONE_EVENT};
use crate::chat::{ChatChunk, ChatCompletion, ChatRequest, Dialect};
use crate::context::CallContext;
use crate::error::GatewayError;
use crate::json::push_str;

/// Fields of chat completions that the completions API does not have.
const CHAT_ONLY: &[&str] = &[
    "messages",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
];

/// Parses and checks a completions body into a chat request.
pub(super) fn parse(bytes: &[u8]) -> Result<ChatRequest, GatewayError> {
    let mut body: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            bad(format!("the body is not valid JSON: {e}"))
        } else {
            bad("the body must be a JSON object")
        }
    })?;
    for name in CHAT_ONLY {
        if body.contains_key(*name) {
            return Err(bad(format!(
                "`{name}` is not part of the completions API: send chat requests to /v1/chat/completions"
            )));
        }
    }
    let prompt = prompt(field(&body, "prompt"))?;
    unsupported(&body)?;
    for name in ["prompt", "suffix", "echo", "logprobs", "best_of"] {
        body.remove(name);
    }
    body.insert(
        "messages".into(),
        serde_json::json!([{"role": "user", "content": prompt}]),
    );
    // The rest is a chat body: read by the chat parser, whose errors name the field.
    let chat = serde_json::to_vec(&body).map_err(|e| bad(format!("invalid request: {e}")))?;
    let mut req = super::openai_chat::parse_request(&chat)?;
    req.inbound.dialect = Dialect::Completions;
    Ok(req)
}

/// `prompt`: a string, or an array of exactly one string.
fn prompt(v: Option<&Value>) -> Result<String, GatewayError> {
    match v {
        None => Err(bad("`prompt` is required: the text to complete")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(bad("`prompt` must not be an empty array")),
            [Value::String(s)] => Ok(s.clone()),
            [Value::Number(_), ..] | [Value::Array(_), ..] => Err(bad(
                "`prompt` as token ids is not supported: send the prompt as a string",
            )),
            [Value::String(_), ..] => Err(bad(format!(
                "`prompt` holds {} prompts; one prompt per request is supported: send each as its own request (`n` asks for several completions of one prompt)",
                items.len()
            ))),
            [other, ..] => Err(wrong("prompt[0]", "a string", other)),
        },
        Some(other) => Err(wrong("prompt", "a string or an array of one string", other)),
    }
}

/// `suffix`, `echo`, `logprobs` and `best_of`: accepted only where they ask for
/// nothing chat cannot do.
fn unsupported(body: &Map<String, Value>) -> Result<(), GatewayError> {
    match field(body, "suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(bad(
                "`suffix` (text inserted after the completion) is not supported: leave it out",
            ))
        }
        Some(other) => return Err(wrong("suffix", "a string", other)),
    }
    match field(body, "echo") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(bad(
                "`echo: true` is not supported: put the prompt in front of the text yourself",
            ))
        }
        Some(other) => return Err(wrong("echo", "a boolean", other)),
    }
    if field(body, "logprobs").is_some() {
        return Err(bad("`logprobs` is not supported: leave it out (or null)"));
    }
    if let Some(v) = field(body, "best_of") {
        let n = match field(body, "n") {
            None => Some(1),
            Some(n) => n.as_u64(),
        };
        match v.as_u64() {
            Some(b) if Some(b) == n => {}
            Some(_) => return Err(bad(
                "`best_of` other than `n` is not supported: leave it out, or set it equal to `n`",
            )),
            None => return Err(wrong("best_of", "an integer", v)),
        }
    }
    Ok(())
}

/// Appends a `finish_reason` value: the reason, or `null`.
fn push_finish(out: &mut Vec<u8>, reason: Option<&str>) {
    match reason {
        Some(r) => push_str(out, r),
        None => out.extend_from_slice(b"null"),
    }
}

/// The `text_completion` body of a folded reply.
pub(super) fn json_body(completion: &ChatCompletion) -> Vec<u8> {
    let text_len: usize = completion
        .choices
        .iter()
        .map(|c| c.message.content.as_ref().map_or(0, String::len))
        .sum();
    let mut out = Vec::with_capacity(384 + text_len + text_len / 8);
    out.extend_from_slice(b"{\"id\":");
    push_str(&mut out, &completion.id);
    out.extend_from_slice(b",\"object\":\"text_completion\",\"created\":");
    out.extend_from_slice(itoa::Buffer::new().format(completion.created).as_bytes());
    out.extend_from_slice(b",\"model\":");
    push_str(&mut out, &completion.model);
    if let Some(p) = &completion.provider {
        out.extend_from_slice(b",\"provider\":");
        push_str(&mut out, p);
    }
    out.extend_from_slice(b",\"choices\":[");
    for (i, c) in completion.choices.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"text\":");
        push_str(&mut out, c.message.content.as_deref().unwrap_or(""));
        out.extend_from_slice(b",\"index\":");
        out.extend_from_slice(itoa::Buffer::new().format(c.index).as_bytes());
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        push_finish(&mut out, c.finish_reason.as_deref());
        out.push(b'}');
    }
    out.push(b']');
    if let Some(u) = &completion.usage {
        out.extend_from_slice(b",\"usage\":");
        u.write_json(&mut out);
    }
    out.push(b'}');
    out
}

/// Writes a streamed reply as `text_completion` chunks, stamped with the request's
/// id, model and provider.
pub(crate) struct Encoder {
    ctx: CallContext,
    model: Arc<str>,
    provider: Arc<str>,
    wants_usage: bool,
    /// `data: {"id":…,"object":"text_completion","created":…,"model":…,"provider":…,`
    /// the same in every chunk: encoded once.
    prefix: Vec<u8>,
}

impl Encoder {
    /// The encoder of one stream; `endpoint` is `None` when it ends before any
    /// endpoint committed.
    pub(super) fn new(
        ctx: CallContext,
        endpoint: Option<&crate::catalog::Endpoint>,
        request: &ChatRequest,
    ) -> Encoder {
        let (model, provider): (Arc<str>, Arc<str>) = match endpoint {
            Some(e) => (e.model.clone(), e.provider.name.clone()),
            None => (Arc::from(""), Arc::from("")),
        };
        let mut prefix = Vec::with_capacity(160);
        prefix.extend_from_slice(b"data: {\"id\":");
        push_str(&mut prefix, ctx.request_id());
        prefix.extend_from_slice(b",\"object\":\"text_completion\",\"created\":");
        prefix.extend_from_slice(itoa::Buffer::new().format(ctx.created()).as_bytes());
        prefix.extend_from_slice(b",\"model\":");
        push_str(&mut prefix, &model);
        prefix.extend_from_slice(b",\"provider\":");
        push_str(&mut prefix, &provider);
        prefix.push(b',');
        Encoder {
            wants_usage: request.wants_stream_usage(),
            ctx,
            model,
            provider,
            prefix,
        }
    }

    /// One chunk's event, or `None` when it has no text, no finish and no usage for
    /// this client (role-only and reasoning deltas).
    pub(super) fn chunk(&mut self, chunk: &ChatChunk) -> Option<Bytes> {
        let usage = chunk.usage.as_ref().filter(|_| self.wants_usage);
        let choices: Vec<_> = chunk
            .choices
            .iter()
            .filter(|c| {
                c.finish_reason.is_some()
                    || c.delta.content.as_deref().is_some_and(|t| !t.is_empty())
            })
            .collect();
        if choices.is_empty() && usage.is_none() {
            return None;
        }
        let mut out = Vec::with_capacity(self.prefix.len() + 160);
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"\"choices\":[");
        for (i, c) in choices.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"text\":");
            push_str(&mut out, c.delta.content.as_deref().unwrap_or(""));
            out.extend_from_slice(b",\"index\":");
            out.extend_from_slice(itoa::Buffer::new().format(c.index).as_bytes());
            out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
            push_finish(&mut out, c.finish_reason.as_deref());
            out.push(b'}');
        }
        out.push(b']');
        if let Some(u) = usage {
            out.extend_from_slice(b",\"usage\":");
            u.write_json(&mut out);
        }
        out.extend_from_slice(b"}\n\n");
        Some(Bytes::from(out))
    }

    /// The end of a complete stream.
    pub(super) fn done(&mut self) -> Bytes {
        Bytes::from_static(DONE_EVENT)
    }

    /// An error chunk followed by `[DONE]` (SPEC §3.2, in this API's shape).
    pub(super) fn error(&mut self, e: &GatewayError) -> Bytes {
        record_stream_error(&self.ctx, e);
        let chunk = serde_json::json!({
            "id": self.ctx.request_id(),
            "object": "text_completion",
            "created": self.ctx.created(),
            "model": &*self.model,
            "provider": &*self.provider,
            "error": e.to_json(),
            "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": "error"}],
        });
        let mut out = BytesMut::with_capacity(256);
        out.put_slice(b"data: ");
        out.put_slice(chunk.to_string().as_bytes());
        out.put_slice(b"\n\n");
        out.put_slice(DONE_EVENT);
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::chat::{Aggregator, Delta, Role, Usage};
    use crate::config::Config;

    fn err(body: &str) -> String {
        let e = parse(body.as_bytes()).expect_err(body);
        assert_eq!(e.code(), "invalid_request", "{body}");
        e.to_string()
    }

    #[test]
    fn a_prompt_becomes_one_user_message_and_the_rest_reads_as_chat() {
        let r = parse(
            br#"{"model":"m","prompt":["Say hi"],"max_tokens":5,"n":2,"stop":"\n","temperature":0.5,
                 "seed":7,"user":"u","stream":true,"stream_options":{"include_usage":true},
                 "echo":false,"suffix":null,"best_of":2,"logprobs":null,"logit_bias":{}}"#,
        )
        .unwrap();
        assert_eq!(r.inbound.dialect, Dialect::Completions);
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.messages[0].role, Role::User);
        assert_eq!(r.messages[0].content.as_ref().unwrap().text(), "Say hi");
        assert_eq!(
            (r.max_tokens, r.n, r.seed, r.user.as_deref()),
            (Some(5), Some(2), Some(7), Some("u"))
        );
        assert!(r.stream && r.wants_stream_usage());
        assert_eq!(r.stop.unwrap().to_vec(), ["\n"]);
        // Handled fields are gone; unknown ones pass through as in chat.
        assert_eq!(r.extra.keys().collect::<Vec<_>>(), ["logit_bias"]);
        // No default bound of its own: the model's, as in chat.
        let r = parse(br#"{"model":"m","prompt":""}"#).unwrap();
        assert_eq!(r.max_tokens, None);
    }

    #[test]
    fn what_it_cannot_serve_is_a_400_naming_the_field() {
        for (body, names) in [
            (r#"{"model":"m"}"#, "`prompt` is required"),
            (r#"{"model":"m","prompt":7}"#, "`prompt` must be"),
            (r#"{"model":"m","prompt":[]}"#, "`prompt` must not be"),
            (r#"{"model":"m","prompt":["a","b"]}"#, "holds 2 prompts"),
            (r#"{"model":"m","prompt":[1,2]}"#, "token ids"),
            (r#"{"model":"m","prompt":[[1]]}"#, "token ids"),
            (r#"{"model":"m","prompt":[true]}"#, "`prompt[0]`"),
            (r#"{"model":"m","prompt":"x","suffix":"y"}"#, "`suffix`"),
            (r#"{"model":"m","prompt":"x","echo":true}"#, "`echo: true`"),
            (r#"{"model":"m","prompt":"x","logprobs":2}"#, "`logprobs`"),
            (r#"{"model":"m","prompt":"x","best_of":3}"#, "`best_of`"),
            (
                r#"{"model":"m","prompt":"x","messages":[]}"#,
                "/v1/chat/completions",
            ),
            (r#"{"model":"m","prompt":"x","tools":[]}"#, "`tools`"),
            (
                r#"{"model":"m","prompt":"x","max_tokens":"8"}"#,
                "`max_tokens`",
            ),
            (r#"{"model":"m","prompt":"x","n":0}"#, "`n`"),
            (r#"{"prompt":"x"}"#, "model"),
            ("[1]", "JSON object"),
            ("{", "not valid JSON"),
        ] {
            let e = err(body);
            assert!(e.contains(names), "{body}: {e}");
        }
    }

    fn endpoint() -> Arc<crate::catalog::Endpoint> {
        Catalog::from_config(&Config::demo()).endpoints()[0].clone()
    }

    #[test]
    fn the_json_answer_is_a_text_completion() {
        let mut agg = Aggregator::default();
        for i in 0..2 {
            let mut c = ChatChunk::delta(Delta {
                role: Some(Role::Assistant),
                content: Some(format!("text {i}")),
                ..Delta::default()
            });
            c.choices[0].index = i;
            c.choices[0].finish_reason = Some("stop".into());
            agg.push(c);
        }
        agg.push(ChatChunk::usage(Usage::new(3, 4)));
        let mut completion = agg.finish();
        completion.id = "gen-1".into();
        completion.model = "mock/echo".into();
        completion.provider = Some("mock".into());
        let v: Value = serde_json::from_slice(&json_body(&completion)).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["id"], "gen-1");
        assert_eq!(v["provider"], "mock");
        assert_eq!(v["choices"][1]["text"], "text 1");
        assert_eq!(v["choices"][1]["index"], 1);
        assert_eq!(v["choices"][0]["logprobs"], Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["usage"]["total_tokens"], 7);
    }

    #[test]
    fn stream_chunks_carry_text_usage_when_asked_and_errors_in_shape() {
        let req = parse(
            br#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        let ep = endpoint();
        let mut enc = Encoder::new(CallContext::new(), Some(&ep), &req);
        let role = ChatChunk::delta(Delta {
            role: Some(Role::Assistant),
            content: Some(String::new()),
            ..Delta::default()
        });
        assert!(enc.chunk(&role).is_none(), "role-only chunks say nothing");
        let event = |b: Bytes| -> Value {
            let t = std::str::from_utf8(&b).unwrap();
            serde_json::from_str(
                t.strip_prefix("data: ")
                    .unwrap()
                    .strip_suffix("\n\n")
                    .unwrap(),
            )
            .unwrap()
        };
        let v = event(enc.chunk(&ChatChunk::text("hel")).unwrap());
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], &*ep.model);
        assert_eq!(v["choices"][0]["text"], "hel");
        assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
        let v = event(enc.chunk(&ChatChunk::usage(Usage::new(1, 2))).unwrap());
        assert_eq!(v["choices"], serde_json::json!([]));
        assert_eq!(v["usage"]["completion_tokens"], 2);
        assert_eq!(&enc.done()[..], DONE_EVENT);

        let e = enc.error(&GatewayError::UpstreamError("broke".into()));
        let text = std::str::from_utf8(&e).unwrap();
        let (first, rest) = text.split_once("\n\n").unwrap();
        assert_eq!(rest, "data: [DONE]\n\n");
        let v: Value = serde_json::from_str(first.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["error"]["code"], "upstream_error");
        assert_eq!(v["choices"][0]["finish_reason"], "error");
        assert_eq!(v["choices"][0]["text"], "");

        // Usage not asked for: the usage chunk is not written.
        let req = parse(br#"{"model":"m","prompt":"x","stream":true}"#).unwrap();
        let mut enc = Encoder::new(CallContext::new(), Some(&ep), &req);
        assert!(enc.chunk(&ChatChunk::usage(Usage::new(1, 2))).is_none());
    }
}
