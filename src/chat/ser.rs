//! The JSON the HTTP edge writes for every response: a `chat.completion`, and the
//! `choices` and `usage` of each `chat.completion.chunk`, written directly.
//!
//! The output is byte for byte what `serde_json` writes for the types' `Serialize`
//! impls (the tests below compare the two on generated values). Why not serde:
//! `serde_json` escapes every field name at every response, and a `Money` goes
//! through a `RawValue` that parses the number's text again. Measured by callgrind
//! on the loadbench (BENCHMARKS.md, sixth session): see there.

use super::{
    ChatCompletion, ChunkChoice, Delta, FunctionCall, ResponseMessage, ToolCall, ToolCallDelta,
    Usage,
};
use crate::json::push_str;
use crate::money::Money;

/// Appends an integer.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `Some(s)` as a string and `None` as `null`.
fn push_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Appends OpenRouter's `reasoning_details` of a message or delta
/// ([`super::ReasoningDetails`]): one `reasoning.text` entry, index 0, with the
/// text and the signature that are there.
fn push_reasoning_details(out: &mut Vec<u8>, text: Option<&str>, signature: Option<&str>) {
    out.extend_from_slice(b"[{\"type\":\"reasoning.text\"");
    push_field_str(out, b",\"text\":", text);
    push_field_str(out, b",\"signature\":", signature);
    out.extend_from_slice(b",\"index\":0}]");
}

/// Appends `,"name":` and the string, when there is one (`skip_serializing_if`).
fn push_field_str(out: &mut Vec<u8>, field: &[u8], s: Option<&str>) {
    if let Some(s) = s {
        out.extend_from_slice(field);
        push_str(out, s);
    }
}

/// Appends `money` as a JSON number with its exact decimal digits.
fn push_money(out: &mut Vec<u8>, money: Money) {
    let mut buf = [0u8; Money::TEXT_MAX];
    out.extend_from_slice(money.text(&mut buf).as_bytes());
}

impl Usage {
    /// Appends the JSON `serde_json` writes for this `Usage`.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"prompt_tokens\":");
        push_u64(out, self.prompt_tokens);
        out.extend_from_slice(b",\"completion_tokens\":");
        push_u64(out, self.completion_tokens);
        out.extend_from_slice(b",\"total_tokens\":");
        push_u64(out, self.total_tokens);
        if let Some(cost) = self.cost {
            out.extend_from_slice(b",\"cost\":");
            push_money(out, cost);
        }
        if let Some(d) = &self.prompt_tokens_details {
            out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
            push_u64(out, d.cached_tokens);
            if d.cache_write_tokens != 0 {
                out.extend_from_slice(b",\"cache_write_tokens\":");
                push_u64(out, d.cache_write_tokens);
            }
            out.push(b'}');
        }
        if let Some(d) = &self.completion_tokens_details {
            out.extend_from_slice(b",\"completion_tokens_details\":{\"reasoning_tokens\":");
            push_u64(out, d.reasoning_tokens);
            out.push(b'}');
        }
        if let Some(c) = &self.cost_details {
            out.extend_from_slice(b",\"cost_details\":{\"prompt\":");
            push_money(out, c.prompt);
            out.extend_from_slice(b",\"cached_prompt\":");
            push_money(out, c.cached_prompt);
            out.extend_from_slice(b",\"cache_write\":");
            push_money(out, c.cache_write);
            out.extend_from_slice(b",\"completion\":");
            push_money(out, c.completion);
            out.push(b'}');
        }
        out.push(b'}');
    }
}

/// Appends `items` as a JSON array, each written by `write`.
fn push_list<T>(out: &mut Vec<u8>, items: &[T], write: impl Fn(&T, &mut Vec<u8>)) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(item, out);
    }
    out.push(b']');
}

impl ChunkChoice {
    /// Appends the JSON array `serde_json` writes for `choices`.
    pub(crate) fn write_json_list(choices: &[ChunkChoice], out: &mut Vec<u8>) {
        push_list(out, choices, ChunkChoice::write_json);
    }

    fn write_json(&self, out: &mut Vec<u8>) {
        push_choice(
            out,
            self.index,
            b",\"delta\":",
            self.finish_reason.as_deref(),
            |out| self.delta.write_json(out),
        );
    }
}

/// Appends a choice of a completion or a chunk: `{"index":…,` `field` (the
/// `message` or the `delta`, written by `body`) `,"finish_reason":…}`.
fn push_choice(
    out: &mut Vec<u8>,
    index: u32,
    field: &[u8],
    finish_reason: Option<&str>,
    body: impl FnOnce(&mut Vec<u8>),
) {
    out.extend_from_slice(b"{\"index\":");
    push_u64(out, u64::from(index));
    out.extend_from_slice(field);
    body(out);
    out.extend_from_slice(b",\"finish_reason\":");
    push_opt_str(out, finish_reason);
    out.push(b'}');
}

impl Delta {
    fn write_json(&self, out: &mut Vec<u8>) {
        // Every field may be skipped: the comma goes before all but the first written.
        let start = out.len() + 1;
        out.push(b'{');
        let field = |out: &mut Vec<u8>, name: &[u8]| {
            if out.len() > start {
                out.push(b',');
            }
            out.extend_from_slice(name);
        };
        if let Some(role) = self.role {
            field(out, b"\"role\":");
            push_str(out, role.as_str());
        }
        if let Some(content) = &self.content {
            field(out, b"\"content\":");
            push_str(out, content);
        }
        if let Some(reasoning) = &self.reasoning {
            field(out, b"\"reasoning\":");
            push_str(out, reasoning);
        }
        if self.reasoning.is_some() || self.signature.is_some() {
            field(out, b"\"reasoning_details\":");
            push_reasoning_details(out, self.reasoning.as_deref(), self.signature.as_deref());
        }
        if let Some(calls) = &self.tool_calls {
            field(out, b"\"tool_calls\":");
            push_list(out, calls, ToolCallDelta::write_json);
        }
        out.push(b'}');
    }
}

impl ToolCallDelta {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"index\":");
        push_u64(out, u64::from(self.index));
        push_field_str(out, b",\"id\":", self.id.as_deref());
        push_field_str(out, b",\"type\":", self.kind.as_deref());
        if let Some(f) = &self.function {
            out.extend_from_slice(b",\"function\":{");
            let start = out.len();
            if let Some(name) = &f.name {
                out.extend_from_slice(b"\"name\":");
                push_str(out, name);
            }
            if let Some(arguments) = &f.arguments {
                if out.len() > start {
                    out.push(b',');
                }
                out.extend_from_slice(b"\"arguments\":");
                push_str(out, arguments);
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
}

impl ChatCompletion {
    /// Appends the JSON `serde_json` writes for this completion.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"id\":");
        push_str(out, &self.id);
        out.extend_from_slice(b",\"object\":");
        push_str(out, &self.object);
        out.extend_from_slice(b",\"created\":");
        push_u64(out, self.created);
        out.extend_from_slice(b",\"model\":");
        push_str(out, &self.model);
        push_field_str(out, b",\"provider\":", self.provider.as_deref());
        out.extend_from_slice(b",\"choices\":");
        push_list(out, &self.choices, |c, out| {
            push_choice(
                out,
                c.index,
                b",\"message\":",
                c.finish_reason.as_deref(),
                |out| c.message.write_json(out),
            )
        });
        if let Some(usage) = &self.usage {
            out.extend_from_slice(b",\"usage\":");
            usage.write_json(out);
        }
        out.push(b'}');
    }
}

impl ResponseMessage {
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"role\":");
        push_str(out, self.role.as_str());
        out.extend_from_slice(b",\"content\":");
        push_opt_str(out, self.content.as_deref());
        push_field_str(out, b",\"reasoning\":", self.reasoning.as_deref());
        if self.reasoning.is_some() || self.reasoning_signature.is_some() {
            out.extend_from_slice(b",\"reasoning_details\":");
            push_reasoning_details(
                out,
                self.reasoning.as_deref(),
                self.reasoning_signature.as_deref(),
            );
        }
        if let Some(calls) = &self.tool_calls {
            out.extend_from_slice(b",\"tool_calls\":");
            push_list(out, calls, ToolCall::write_json);
        }
        out.push(b'}');
    }
}

impl ToolCall {
    fn write_json(&self, out: &mut Vec<u8>) {
        let FunctionCall { name, arguments } = &self.function;
        out.extend_from_slice(b"{\"id\":");
        push_str(out, &self.id);
        out.extend_from_slice(b",\"type\":");
        push_str(out, &self.kind);
        out.extend_from_slice(b",\"function\":{\"name\":");
        push_str(out, name);
        out.extend_from_slice(b",\"arguments\":");
        push_str(out, arguments);
        out.extend_from_slice(b"}}");
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        Choice, CompletionTokensDetails, CostDetails, FunctionCallDelta, PromptTokensDetails, Role,
    };
    use super::*;
    use rand::{Rng, SeedableRng};

    use crate::json::testing::odd;

    fn maybe<R: Rng, T>(rng: &mut R, f: impl FnOnce(&mut R) -> T) -> Option<T> {
        if rng.random() {
            Some(f(rng))
        } else {
            None
        }
    }

    fn role(rng: &mut impl Rng) -> Role {
        [
            Role::System,
            Role::Developer,
            Role::User,
            Role::Assistant,
            Role::Tool,
        ][rng.random_range(0..5)]
    }

    /// Small and edge-of-range numbers (zero, one, the largest).
    fn number(rng: &mut impl Rng) -> u64 {
        match rng.random_range(0..4) {
            0 => 0,
            1 => rng.random_range(0..1000),
            2 => u64::MAX,
            _ => rng.random(),
        }
    }

    fn usage(rng: &mut impl Rng) -> Usage {
        let cost = match rng.random_range(0..6) {
            0 => None,
            1 => Some(Money::ZERO),
            2 => Some(Money::from_pico(i64::MIN)),
            3 => Some(Money::from_pico(i64::MAX)),
            4 => Some(Money::from_pico(rng.random_range(-10_000_000..10_000_000))),
            _ => Some(Money::from_pico(rng.random())),
        };
        Usage {
            prompt_tokens: number(rng),
            completion_tokens: number(rng),
            total_tokens: number(rng),
            cost,
            prompt_tokens_details: maybe(rng, |r| PromptTokensDetails {
                cached_tokens: r.random(),
                cache_write_tokens: if r.random() { 0 } else { r.random() },
            }),
            completion_tokens_details: maybe(rng, |r| CompletionTokensDetails {
                reasoning_tokens: r.random(),
            }),
            cost_details: maybe(rng, |r| {
                let mut m = || Money::from_pico(r.random_range(-10_000_000..i64::MAX));
                CostDetails {
                    prompt: m(),
                    cached_prompt: m(),
                    cache_write: m(),
                    completion: m(),
                }
            }),
        }
    }

    fn chunk_choice(rng: &mut impl Rng) -> ChunkChoice {
        let calls = (0..rng.random_range(0..3))
            .map(|_| ToolCallDelta {
                index: rng.random(),
                id: maybe(rng, |r| odd(r, 8)),
                kind: maybe(rng, |r| odd(r, 8)),
                function: maybe(rng, |r| FunctionCallDelta {
                    name: maybe(r, |r| odd(r, 8)),
                    arguments: maybe(r, |r| odd(r, 20)),
                }),
            })
            .collect();
        ChunkChoice {
            index: rng.random(),
            delta: Delta {
                role: rng.random::<bool>().then(|| role(rng)),
                content: maybe(rng, |r| odd(r, 30)),
                reasoning: maybe(rng, |r| odd(r, 10)),
                tool_calls: rng.random::<bool>().then_some(calls),
                signature: maybe(rng, |r| odd(r, 12)),
                ..Delta::default()
            },
            finish_reason: maybe(rng, |r| odd(r, 8)),
        }
    }

    fn completion(rng: &mut impl Rng) -> ChatCompletion {
        let choices = (0..rng.random_range(0..3))
            .map(|_| {
                let calls = (0..rng.random_range(0..3))
                    .map(|_| ToolCall {
                        id: odd(rng, 8),
                        kind: odd(rng, 8),
                        function: FunctionCall {
                            name: odd(rng, 8),
                            arguments: odd(rng, 20),
                        },
                    })
                    .collect();
                Choice {
                    index: rng.random(),
                    message: ResponseMessage {
                        role: role(rng),
                        content: maybe(rng, |r| odd(r, 40)),
                        reasoning: maybe(rng, |r| odd(r, 10)),
                        tool_calls: rng.random::<bool>().then_some(calls),
                        reasoning_signature: maybe(rng, |r| odd(r, 12)),
                        anthropic_content: None,
                        native_stop: None,
                    },
                    finish_reason: maybe(rng, |r| odd(r, 8)),
                }
            })
            .collect();
        ChatCompletion {
            id: odd(rng, 30),
            object: odd(rng, 16),
            created: number(rng),
            model: odd(rng, 16),
            provider: maybe(rng, |r| odd(r, 8)),
            choices,
            usage: rng.random::<bool>().then(|| usage(rng)),
            embeddings: None,
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    #[test]
    fn a_completion_is_the_bytes_serde_json_writes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..3000 {
            let c = completion(&mut rng);
            let mut ours = Vec::new();
            c.write_json(&mut ours);
            assert_eq!(text(&ours), serde_json::to_string(&c).unwrap());
        }
    }

    #[test]
    fn chunk_choices_and_usage_are_the_bytes_serde_json_writes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for _ in 0..3000 {
            let choices: Vec<ChunkChoice> = (0..rng.random_range(0..3))
                .map(|_| chunk_choice(&mut rng))
                .collect();
            let mut ours = Vec::new();
            ChunkChoice::write_json_list(&choices, &mut ours);
            assert_eq!(text(&ours), serde_json::to_string(&choices).unwrap());
            let u = usage(&mut rng);
            ours.clear();
            u.write_json(&mut ours);
            assert_eq!(text(&ours), serde_json::to_string(&u).unwrap());
        }
    }

    #[test]
    fn money_text_is_its_display() {
        for pico in [
            0,
            1,
            -1,
            10,
            1_000_000_000_000,
            -1_500_000_000_000,
            150_000,
            i64::MIN,
            i64::MAX,
        ] {
            let m = Money::from_pico(pico);
            let mut buf = [0u8; Money::TEXT_MAX];
            let mut out = Vec::new();
            push_money(&mut out, m);
            assert_eq!(m.text(&mut buf), text(&out));
            assert_eq!(text(&out), serde_json::to_string(&m).unwrap());
        }
    }
}
