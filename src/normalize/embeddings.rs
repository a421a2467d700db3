//! `POST /v1/embeddings` (SPEC §7.3): the OpenAI embeddings request as a
//! [`ChatRequest`] with no messages, and the `list` of vectors it answers with.
//!
//! The request's `input` (a string, an array of strings, an array of token ids, or an
//! array of arrays of token ids), `dimensions` and `encoding_format` become
//! [`EmbeddingsInput`] in [`Inbound`](crate::chat::Inbound); `model`, `models`,
//! `provider` and `user` fill the request's own fields, so route, credit, fallback
//! and metering serve it as any other call. Embeddings never stream (`stream: true`
//! is a 400); other fields are accepted and not sent on. The answer is one
//! [`ChatChunk`](crate::chat::ChatChunk) carrying the vectors, folded here into
//! `{"object":"list","data":[{"object":"embedding","index","embedding"}],…}` with
//! each number written as the shortest text of its `f32`, or the vector as base64
//! of little-endian `f32`s.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::chat::{ChatCompletion, ChatRequest, Dialect, EmbeddingInput, EmbeddingsInput, Inbound};
use crate::error::GatewayError;
use crate::json::push_str;
use crate::normalize::fields::invalid as bad;

/// The most inputs one request may carry (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;

use crate::providers::limits::{
    MAX_EMBEDDING_DIMENSIONS as MAX_DIMENSIONS, MAX_EMBEDDING_FLOATS as MAX_FLOATS,
};

const INPUT_SHAPES: &str = "`input` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids";

/// Parses and checks a request body.
pub(super) fn parse(bytes: &[u8], _headers: &http::HeaderMap) -> Result<ChatRequest, GatewayError> {
    let body: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            bad(format!("the body is not valid JSON: {e}"))
        } else {
            bad("the body must be a JSON object")
        }
    })?;
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        Some(Value::String(_)) | None => return Err(bad("`model` is required")),
        Some(_) => return Err(bad("invalid `model`: expected a string")),
    };
    let models = match body.get("models").filter(|v| !v.is_null()) {
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|_| bad("invalid `models`: expected an array of model ids"))?,
        ),
        None => None,
    };
    let provider = match body.get("provider").filter(|v| !v.is_null()) {
        Some(v) => Some(
            serde_json::from_value(v.clone())
                .map_err(|e| bad(format!("invalid `provider`: {e}")))?,
        ),
        None => None,
    };
    let user = match body.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => return Err(bad("invalid `user`: expected a string")),
    };
    match body.get("stream") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(bad(
                "`stream` is not supported by /v1/embeddings: embeddings are answered whole",
            ))
        }
        Some(_) => return Err(bad("invalid `stream`: expected a boolean")),
    }
    let dimensions = match body.get("dimensions") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n @ 1..) if n <= u64::from(MAX_DIMENSIONS) => Some(n as u32),
            _ => {
                return Err(bad(format!(
                    "`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}"
                )))
            }
        },
    };
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => return Err(bad("`encoding_format` must be \"float\" or \"base64\"")),
    };
    let inputs = parse_input(body.get("input"))?;
    if let Some(d) = dimensions {
        if inputs.len() as u64 * u64::from(d) > MAX_FLOATS {
            return Err(bad(format!(
                "{} inputs of {d} dimensions is more than {MAX_FLOATS} numbers in one answer: send fewer inputs per request",
                inputs.len()
            )));
        }
    }
    Ok(ChatRequest {
        model,
        models,
        provider,
        user,
        inbound: Inbound {
            dialect: Dialect::Embeddings,
            embeddings: Some(Arc::new(EmbeddingsInput {
                inputs,
                dimensions,
                base64,
            })),
            ..Inbound::default()
        },
        ..ChatRequest::default()
    })
}

/// `input` in any of its four shapes, as one list.
fn parse_input(input: Option<&Value>) -> Result<Vec<EmbeddingInput>, GatewayError> {
    let items = match input {
        None | Some(Value::Null) => return Err(bad("`input` is required")),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(bad("`input` must not be an empty string"))
        }
        Some(Value::String(s)) => return Ok(vec![EmbeddingInput::Text(s.clone())]),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(bad(INPUT_SHAPES)),
    };
    if items.is_empty() {
        return Err(bad("`input` must not be empty"));
    }
    match &items[0] {
        // An array of token ids: one input.
        Value::Number(_) => {
            if items.len() > MAX_TOKENS_PER_INPUT {
                return Err(bad(format!(
                    "`input` has {} token ids (at most {MAX_TOKENS_PER_INPUT})",
                    items.len()
                )));
            }
            return Ok(vec![EmbeddingInput::Tokens(tokens(items, "input")?)]);
        }
        Value::String(_) | Value::Array(_) => {}
        _ => return Err(bad(INPUT_SHAPES)),
    }
    if items.len() > MAX_INPUTS {
        return Err(bad(format!(
            "`input` has {} items (at most {MAX_INPUTS} per request)",
            items.len()
        )));
    }
    let strings = items[0].is_string();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        match item {
            Value::String(s) if strings => {
                if s.is_empty() {
                    return Err(bad(format!("`{at}` must not be an empty string")));
                }
                out.push(EmbeddingInput::Text(s.clone()));
            }
            Value::Array(ids) if !strings => {
                if ids.is_empty() {
                    return Err(bad(format!("`{at}` must not be an empty array")));
                }
                if ids.len() > MAX_TOKENS_PER_INPUT {
                    return Err(bad(format!(
                        "`{at}` has {} token ids (at most {MAX_TOKENS_PER_INPUT})",
                        ids.len()
                    )));
                }
                out.push(EmbeddingInput::Tokens(tokens(ids, &at)?));
            }
            _ => return Err(bad(format!("`{at}`: {INPUT_SHAPES}, not a mix of them"))),
        }
    }
    Ok(out)
}

/// The most token ids one input may hold (no embedding model reads more).
pub const MAX_TOKENS_PER_INPUT: usize = 1 << 20;

/// Token ids: integers from 0 to 2³² − 1.
fn tokens(ids: &[Value], at: &str) -> Result<Vec<u32>, GatewayError> {
    ids.iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "`{at}[{j}]` must be a token id (an integer from 0 to {})",
                        u32::MAX
                    ))
                })
        })
        .collect()
}

/// The JSON body of a folded reply: `{"object":"list","data":[…],"model","id","usage"}`.
pub(super) fn json_body(completion: &ChatCompletion, request: &ChatRequest) -> Vec<u8> {
    let base64 = request
        .inbound
        .embeddings
        .as_ref()
        .is_some_and(|e| e.base64);
    let vectors: &[Vec<f32>] = completion.embeddings.as_deref().map_or(&[], |v| v);
    let floats: usize = vectors.iter().map(Vec::len).sum();
    let mut out =
        Vec::with_capacity(256 + vectors.len() * 48 + floats * if base64 { 6 } else { 12 });
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let mut ryu = ryu::Buffer::new();
    for (i, v) in vectors.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        out.extend_from_slice(itoa::Buffer::new().format(i).as_bytes());
        out.extend_from_slice(b",\"embedding\":");
        if base64 {
            let mut raw = Vec::with_capacity(v.len() * 4);
            for x in v {
                raw.extend_from_slice(&x.to_le_bytes());
            }
            out.push(b'"');
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(raw)
                    .as_bytes(),
            );
            out.push(b'"');
        } else {
            out.push(b'[');
            for (j, x) in v.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                // Upstream vectors are checked finite (providers::limits); never NaN.
                let x = if x.is_finite() { *x } else { 0.0 };
                out.extend_from_slice(ryu.format_finite(x).as_bytes());
            }
            out.push(b']');
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"model\":");
    push_str(&mut out, &completion.model);
    out.extend_from_slice(b",\"id\":");
    push_str(&mut out, &completion.id);
    out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
    let usage = completion.usage.as_ref();
    let prompt = usage.map_or(0, |u| u.prompt_tokens);
    out.extend_from_slice(itoa::Buffer::new().format(prompt).as_bytes());
    out.extend_from_slice(b",\"total_tokens\":");
    out.extend_from_slice(itoa::Buffer::new().format(prompt).as_bytes());
    out.extend_from_slice(b",\"cost\":");
    let cost = usage.and_then(|u| u.cost).unwrap_or_default();
    let mut buf = [0u8; crate::money::Money::TEXT_MAX];
    out.extend_from_slice(cost.text(&mut buf).as_bytes());
    out.extend_from_slice(b"}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Usage;

    fn parsed(body: &str) -> Result<ChatRequest, GatewayError> {
        parse(body.as_bytes(), &http::HeaderMap::new())
    }

    fn inputs(body: &str) -> Vec<EmbeddingInput> {
        let req = parsed(body).unwrap_or_else(|e| panic!("{body}: {e}"));
        assert!(req.messages.is_empty());
        assert_eq!(req.inbound.dialect, Dialect::Embeddings);
        req.inbound.embeddings.as_ref().unwrap().inputs.clone()
    }

    #[test]
    fn every_input_shape_parses() {
        use EmbeddingInput::{Text, Tokens};
        assert_eq!(inputs(r#"{"model":"m","input":"hi"}"#), [Text("hi".into())]);
        assert_eq!(
            inputs(r#"{"model":"m","input":["a","b"]}"#),
            [Text("a".into()), Text("b".into())]
        );
        assert_eq!(
            inputs(r#"{"model":"m","input":[1,2,3]}"#),
            [Tokens(vec![1, 2, 3])]
        );
        assert_eq!(
            inputs(r#"{"model":"m","input":[[1],[2,3]]}"#),
            [Tokens(vec![1]), Tokens(vec![2, 3])]
        );
        let req = parsed(
            r#"{"model":"m","input":"x","dimensions":4,"encoding_format":"base64","user":"u","models":["n"],"provider":{"only":["p"]}}"#,
        )
        .unwrap();
        let e = req.inbound.embeddings.as_ref().unwrap();
        assert_eq!((e.dimensions, e.base64), (Some(4), true));
        assert_eq!(req.user.as_deref(), Some("u"));
        assert_eq!(req.models.as_deref(), Some(&["n".to_string()][..]));
        assert!(req.provider.is_some());
    }

    #[test]
    fn bad_requests_are_400s_naming_the_field() {
        let many = format!(
            r#"{{"model":"m","input":[{}]}}"#,
            vec!["\"x\""; MAX_INPUTS + 1].join(",")
        );
        for (body, field) in [
            ("{", "JSON"),
            ("[]", "object"),
            (r#"{"input":"x"}"#, "`model`"),
            (r#"{"model":"m"}"#, "`input`"),
            (r#"{"model":"m","input":""}"#, "`input`"),
            (r#"{"model":"m","input":[]}"#, "`input`"),
            (r#"{"model":"m","input":["a",""]}"#, "`input[1]`"),
            (r#"{"model":"m","input":[[]]}"#, "`input[0]`"),
            (r#"{"model":"m","input":[1.5]}"#, "`input[0]`"),
            (r#"{"model":"m","input":[1,-2]}"#, "`input[1]`"),
            (r#"{"model":"m","input":[[1],[2.5]]}"#, "`input[1][0]`"),
            (r#"{"model":"m","input":["a",[1]]}"#, "`input[1]`"),
            (r#"{"model":"m","input":7}"#, "`input`"),
            (r#"{"model":"m","input":[{"a":1}]}"#, "`input`"),
            (many.as_str(), "`input`"),
            (
                r#"{"model":"m","input":"x","dimensions":0}"#,
                "`dimensions`",
            ),
            (
                r#"{"model":"m","input":"x","dimensions":"8"}"#,
                "`dimensions`",
            ),
            (
                r#"{"model":"m","input":"x","dimensions":70000}"#,
                "`dimensions`",
            ),
            (
                r#"{"model":"m","input":"x","encoding_format":"int8"}"#,
                "`encoding_format`",
            ),
            (r#"{"model":"m","input":"x","stream":true}"#, "`stream`"),
            (r#"{"model":"m","input":"x","user":1}"#, "`user`"),
        ] {
            let err = parsed(body).expect_err(body);
            assert_eq!(
                (err.status().as_u16(), err.code()),
                (400, "invalid_request"),
                "{body}"
            );
            assert!(err.to_string().contains(field), "{body}: {err}");
        }
    }

    #[test]
    fn the_body_is_a_list_of_vectors_as_floats_or_base64() {
        let mut completion = crate::chat::Aggregator::default().finish();
        completion.id = "gen-1".into();
        completion.model = "mock/embed".into();
        completion.embeddings = Some(Arc::new(vec![vec![0.5, -1.0e-7, 0.1], vec![1.0]]));
        let mut usage = Usage::new(5, 0);
        usage.cost = Some("0.0000005".parse().unwrap());
        completion.usage = Some(usage);
        let mut req = parsed(r#"{"model":"mock/embed","input":["a","b"]}"#).unwrap();
        let body = json_body(&completion, &req);
        let text = std::str::from_utf8(&body).unwrap();
        assert_eq!(
            text,
            r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-1e-7,0.1]},{"object":"embedding","index":1,"embedding":[1.0]}],"model":"mock/embed","id":"gen-1","usage":{"prompt_tokens":5,"total_tokens":5,"cost":0.0000005}}"#
        );
        req.inbound.embeddings = Some(Arc::new(EmbeddingsInput {
            base64: true,
            ..(**req.inbound.embeddings.as_ref().unwrap()).clone()
        }));
        let v: Value = serde_json::from_slice(&json_body(&completion, &req)).unwrap();
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let floats: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(floats, [0.5, -1.0e-7, 0.1]);
    }
}
