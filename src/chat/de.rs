//! Hand-written `Deserialize` for the request types whose derived impls buffer.
//!
//! serde's derive buffers a `#[serde(flatten)]` struct and an `#[serde(untagged)]`
//! enum: every value is first read into a generic tree, then read again from it.
//! `ChatRequest` (flattened `extra`) holds `Message`s (flattened `extra`) whose
//! `Content` is untagged, so a message's text was copied three times before it
//! landed in its `String`. These visitors read each field straight into its type
//! and put only the fields the schema does not model into `extra`, as the derived
//! impls did. They keep the derive's rules: a known field given twice is an error,
//! `model`, `messages` and `role` are required, `null` is "absent" for the optional
//! fields.
//!
//! Measured (`cargo bench --bench hot_paths -- --quick request/parse`): see
//! BENCHMARKS.md, fifth session.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{ChatRequest, Content, ContentPart, Message, Stop};

/// A map key, borrowed from the input when it can be.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// `T` read from a JSON object only.
///
/// serde's derived `Deserialize` of a struct also accepts an array (the fields by
/// position), so `[]` is a valid value of any struct whose fields all have defaults:
/// `"stream_options": []` was taken for `{}`. Through this, an array is the type
/// error it should be ("invalid type: sequence, expected an object").
pub(super) struct ObjectOnly<T>(pub(super) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// For `#[serde(deserialize_with)]`: an optional field that must be an object.
pub(super) fn object_or_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<ObjectOnly<T>>::deserialize(d)?.map(|o| o.0))
}

/// Reads an object-only field (see [`ObjectOnly`]) into `slot`, once.
fn once_object<'de, A, T>(
    map: &mut A,
    slot: &mut Option<Option<T>>,
    name: &'static str,
) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value::<Option<ObjectOnly<T>>>()?.map(|o| o.0));
    Ok(())
}

/// Reads the next value into `slot`; a second value for the same field is an error.
fn once<'de, A, T>(map: &mut A, slot: &mut Option<T>, name: &'static str) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// Keeps an unmodelled field (the last value wins, as in a JSON object).
fn keep<'de, A: MapAccess<'de>>(
    map: &mut A,
    extra: &mut Map<String, Value>,
    key: Key<'de>,
) -> Result<(), A::Error> {
    let value: Value = map.next_value()?;
    extra.insert(key.0.into_owned(), value);
    Ok(())
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RequestVisitor;
        impl<'de> Visitor<'de> for RequestVisitor {
            type Value = ChatRequest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chat request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatRequest, A::Error> {
                let (mut model, mut messages) = (None, None);
                let (mut models, mut provider, mut max_tokens, mut max_completion_tokens) =
                    (None, None, None, None);
                let (mut temperature, mut top_p, mut stop, mut tools) = (None, None, None, None);
                let (mut tool_choice, mut response_format, mut seed, mut user) =
                    (None, None, None, None);
                let mut reasoning = None;
                let (mut stream, mut stream_options, mut reasoning_effort, mut usage) =
                    (None, None, None, None);
                let mut n = None;
                let mut extra = Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "model" => once(&mut map, &mut model, "model")?,
                        "messages" => once(&mut map, &mut messages, "messages")?,
                        "models" => once(&mut map, &mut models, "models")?,
                        "provider" => once_object(&mut map, &mut provider, "provider")?,
                        "max_tokens" => once(&mut map, &mut max_tokens, "max_tokens")?,
                        "max_completion_tokens" => once(
                            &mut map,
                            &mut max_completion_tokens,
                            "max_completion_tokens",
                        )?,
                        "n" => once(&mut map, &mut n, "n")?,
                        "temperature" => once(&mut map, &mut temperature, "temperature")?,
                        "top_p" => once(&mut map, &mut top_p, "top_p")?,
                        "stop" => once(&mut map, &mut stop, "stop")?,
                        "tools" => once(&mut map, &mut tools, "tools")?,
                        "tool_choice" => once(&mut map, &mut tool_choice, "tool_choice")?,
                        "response_format" => {
                            once(&mut map, &mut response_format, "response_format")?
                        }
                        "seed" => once(&mut map, &mut seed, "seed")?,
                        "user" => once(&mut map, &mut user, "user")?,
                        "stream" => once(&mut map, &mut stream, "stream")?,
                        "stream_options" => {
                            once_object(&mut map, &mut stream_options, "stream_options")?
                        }
                        "reasoning_effort" => {
                            once(&mut map, &mut reasoning_effort, "reasoning_effort")?
                        }
                        "usage" => once_object(&mut map, &mut usage, "usage")?,
                        "reasoning" => once_object(&mut map, &mut reasoning, "reasoning")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(ChatRequest {
                    model: model.ok_or_else(|| de::Error::missing_field("model"))?,
                    messages: messages.ok_or_else(|| de::Error::missing_field("messages"))?,
                    models: models.flatten(),
                    provider: provider.flatten(),
                    max_tokens: max_tokens.flatten(),
                    max_completion_tokens: max_completion_tokens.flatten(),
                    n: n.flatten(),
                    temperature: temperature.flatten(),
                    top_p: top_p.flatten(),
                    stop: stop.flatten(),
                    tools: tools.flatten(),
                    tool_choice: tool_choice.flatten(),
                    response_format: response_format.flatten(),
                    seed: seed.flatten(),
                    user: user.flatten(),
                    stream: stream.unwrap_or(false),
                    stream_options: stream_options.flatten(),
                    reasoning_effort: reasoning_effort.flatten(),
                    usage: usage.flatten(),
                    reasoning: reasoning.flatten(),
                    inbound: Default::default(),
                    extra,
                })
            }
        }
        d.deserialize_map(RequestVisitor)
    }
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MessageVisitor;
        impl<'de> Visitor<'de> for MessageVisitor {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let (mut role, mut content, mut name, mut tool_calls, mut tool_call_id) =
                    (None, None, None, None, None);
                let mut extra = Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "role" => once(&mut map, &mut role, "role")?,
                        "content" => once(&mut map, &mut content, "content")?,
                        "name" => once(&mut map, &mut name, "name")?,
                        "tool_calls" => once(&mut map, &mut tool_calls, "tool_calls")?,
                        "tool_call_id" => once(&mut map, &mut tool_call_id, "tool_call_id")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(Message {
                    role: role.ok_or_else(|| de::Error::missing_field("role"))?,
                    content: content.flatten(),
                    name: name.flatten(),
                    tool_calls: tool_calls.flatten(),
                    tool_call_id: tool_call_id.flatten(),
                    extra,
                })
            }
        }
        d.deserialize_map(MessageVisitor)
    }
}

/// A sequence read as a `Vec<T>` from inside a visitor.
fn vec_of<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(mut seq: A) -> Result<Vec<T>, A::Error> {
    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
    while let Some(item) = seq.next_element::<T>()? {
        out.push(item);
    }
    Ok(out)
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = Content;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Content, A::Error> {
                vec_of::<A, ContentPart>(seq).map(Content::Parts)
            }
        }
        d.deserialize_any(ContentVisitor)
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StopVisitor;
        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Stop, E> {
                Ok(Stop::One(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Stop, E> {
                Ok(Stop::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Stop, A::Error> {
                vec_of::<A, String>(seq).map(Stop::Many)
            }
        }
        d.deserialize_any(StopVisitor)
    }
}
