//! OTLP protobuf, written straight from a span's parts into a byte buffer.
//!
//! The gateway's spans have a fixed shape (a request span, its attempts' spans), and
//! everything they carry is already in the request's record when they end. So they
//! are not built as OpenTelemetry SDK spans and then converted (the OTLP exporter
//! crate copies each attribute's key and value into generated structs, then encodes
//! those): each span is written once, in place, from borrowed [`SpanParts`]. The
//! lengths of the nested messages are computed first (protobuf prefixes each with
//! its length), then every field is written in order. Field numbers are those of
//! `opentelemetry/proto/trace/v1/trace.proto` and `common/v1/common.proto`; the tests
//! check what is written here against the `opentelemetry-proto` crate's own
//! conversion of the same span, decoded with its generated types.
//!
//! Written: ids, trace state, parent, name, kind, times, attributes, status and
//! flags. The gateway's spans have no events or links.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wire type of a varint field.
const VARINT: u8 = 0;
/// Wire type of a 64-bit field.
const FIXED64: u8 = 1;
/// Wire type of a length-delimited field.
const LEN: u8 = 2;
/// Wire type of a 32-bit field.
const FIXED32: u8 = 5;

/// `Span.flags`: the parent's remoteness is known (bit 8) …
const HAS_IS_REMOTE: u32 = 0x100;
/// … and the parent is remote (bit 9).
const IS_REMOTE: u32 = 0x200;

/// Bytes taken by `v` as a varint.
pub(crate) fn varint_len(v: u64) -> usize {
    // 1 byte per 7 bits, at least one.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends `v` as a varint.
pub(crate) fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Appends a field's key (every field number used here is below 16: one byte).
fn put_key(buf: &mut Vec<u8>, field: u8, wire: u8) {
    buf.push((field << 3) | wire);
}

/// Bytes taken by a length-delimited field of `len` bytes (key included).
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Appends the key and length of a length-delimited field; its `len` bytes follow.
pub(crate) fn put_len(buf: &mut Vec<u8>, field: u8, len: usize) {
    put_key(buf, field, LEN);
    put_varint(buf, len as u64);
}

/// An attribute's value, as the gateway's spans carry them (borrowed: nothing is
/// copied until it is written).
#[derive(Debug, Clone, Copy)]
pub enum Val<'a> {
    /// `string_value`.
    Str(&'a str),
    /// `int_value`.
    Int(i64),
    /// `double_value`.
    F64(f64),
    /// `array_value` of strings.
    Strs(&'a [&'a str]),
}

/// One attribute: a key and its value.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a>(pub &'static str, pub Val<'a>);

/// Bytes of a string `AnyValue` message.
fn str_any_len(s: &str) -> usize {
    len_field(s.len())
}

/// Bytes of one `AnyValue` message (without its own key and length).
fn any_len(v: &Val<'_>) -> usize {
    match v {
        Val::Str(s) => str_any_len(s),
        Val::Int(i) => 1 + varint_len(*i as u64),
        Val::F64(_) => 9,
        Val::Strs(a) => len_field(strs_len(a)),
    }
}

/// Bytes of an `ArrayValue` of strings.
fn strs_len(a: &[&str]) -> usize {
    a.iter().map(|s| len_field(str_any_len(s))).sum()
}

/// Appends one `AnyValue` message's fields.
fn put_any(buf: &mut Vec<u8>, v: &Val<'_>) {
    match v {
        Val::Str(s) => {
            put_len(buf, 1, s.len());
            buf.extend_from_slice(s.as_bytes());
        }
        Val::Int(i) => {
            put_key(buf, 3, VARINT);
            put_varint(buf, *i as u64);
        }
        Val::F64(f) => {
            put_key(buf, 4, FIXED64);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        Val::Strs(a) => {
            put_len(buf, 5, strs_len(a));
            for s in *a {
                put_len(buf, 1, str_any_len(s));
                put_len(buf, 1, s.len());
                buf.extend_from_slice(s.as_bytes());
            }
        }
    }
}

/// Bytes of a `KeyValue` message.
fn kv_len(a: &Attr<'_>) -> usize {
    len_field(a.0.len()) + len_field(any_len(&a.1))
}

/// Appends `a` as the `KeyValue` message of field `field`.
pub fn put_kv(buf: &mut Vec<u8>, field: u8, a: &Attr<'_>) {
    put_len(buf, field, kv_len(a));
    put_len(buf, 1, a.0.len());
    buf.extend_from_slice(a.0.as_bytes());
    put_len(buf, 2, any_len(&a.1));
    put_any(buf, &a.1);
}

/// Bytes of [`put_kv`] for `a`.
fn kv_field_len(a: &Attr<'_>) -> usize {
    len_field(kv_len(a))
}

/// Nanoseconds since the Unix epoch of `t` (0 before it).
pub fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `Span.kind`: server (the request).
pub const SERVER: u64 = 2;
/// `Span.kind`: client (an upstream attempt).
pub const CLIENT: u64 = 3;

/// `Status.code`: unset.
pub const UNSET: u64 = 0;
/// `Status.code`: error.
pub const ERROR: u64 = 2;

/// One span, borrowed from wherever its parts live.
#[derive(Debug, Clone, Copy)]
pub struct SpanParts<'a> {
    /// The trace it belongs to.
    pub trace_id: [u8; 16],
    /// Its own id.
    pub span_id: [u8; 8],
    /// Its parent's id, and whether that parent is remote (the client's).
    pub parent: Option<([u8; 8], bool)>,
    /// The W3C `tracestate` it carries (empty: none).
    pub trace_state: &'a str,
    /// Its name, the concatenation of these pieces.
    pub name: &'a [&'a str],
    /// [`SERVER`] or [`CLIENT`] (or another `SpanKind` number).
    pub kind: u64,
    /// Start and end, nanoseconds since the Unix epoch.
    pub start: u64,
    /// See `start`.
    pub end: u64,
    /// Its attributes, in order.
    pub attrs: &'a [Attr<'a>],
    /// `Status.code` ([`UNSET`], [`ERROR`], …) and its message.
    pub status: (u64, &'a str),
    /// The W3C trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Bytes of a `Status` message (proto3: a zero code and an empty message omitted).
fn status_len(code: u64, message: &str) -> usize {
    let m = if message.is_empty() {
        0
    } else {
        len_field(message.len())
    };
    let c = if code == 0 { 0 } else { 1 + varint_len(code) };
    m + c
}

/// Appends `span` as one `Span` message in field `field` of its parent (for a
/// `ScopeSpans`, field 2, `repeated Span spans`).
pub fn put_span(buf: &mut Vec<u8>, field: u8, span: &SpanParts<'_>) {
    let name_len: usize = span.name.iter().map(|p| p.len()).sum();
    let (code, message) = span.status;
    // The parent's remoteness is always known here (bit 8), and set when remote.
    let mut flags = u32::from(span.flags) | HAS_IS_REMOTE;
    if span.parent.is_some_and(|(_, remote)| remote) {
        flags |= IS_REMOTE;
    }

    let mut len = len_field(16) + len_field(8);
    if !span.trace_state.is_empty() {
        len += len_field(span.trace_state.len());
    }
    if span.parent.is_some() {
        len += len_field(8);
    }
    if name_len > 0 {
        len += len_field(name_len);
    }
    len += 1 + varint_len(span.kind);
    len += 2 * 9;
    len += span.attrs.iter().map(kv_field_len).sum::<usize>();
    len += len_field(status_len(code, message));
    len += 2 + 4; // flags: field 16 takes a two-byte key

    put_len(buf, field, len);
    put_len(buf, 1, 16);
    buf.extend_from_slice(&span.trace_id);
    put_len(buf, 2, 8);
    buf.extend_from_slice(&span.span_id);
    if !span.trace_state.is_empty() {
        put_len(buf, 3, span.trace_state.len());
        buf.extend_from_slice(span.trace_state.as_bytes());
    }
    if let Some((parent, _)) = &span.parent {
        put_len(buf, 4, 8);
        buf.extend_from_slice(parent);
    }
    if name_len > 0 {
        put_len(buf, 5, name_len);
        for p in span.name {
            buf.extend_from_slice(p.as_bytes());
        }
    }
    put_key(buf, 6, VARINT);
    put_varint(buf, span.kind);
    put_key(buf, 7, FIXED64);
    buf.extend_from_slice(&span.start.to_le_bytes());
    put_key(buf, 8, FIXED64);
    buf.extend_from_slice(&span.end.to_le_bytes());
    for a in span.attrs {
        put_kv(buf, 9, a);
    }
    // Always present (an unset status as an empty message), as the SDK's exporter does.
    put_len(buf, 15, status_len(code, message));
    if !message.is_empty() {
        put_len(buf, 2, message.len());
        buf.extend_from_slice(message.as_bytes());
    }
    if code != 0 {
        put_key(buf, 3, VARINT);
        put_varint(buf, code);
    }
    // Field 16, fixed32: key (16 << 3 | 5) = 133, a two-byte varint.
    put_varint(buf, (16 << 3) | u64::from(FIXED32));
    buf.extend_from_slice(&flags.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry::{InstrumentationScope, KeyValue, StringValue, Value};
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span};
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
    use prost::Message;

    use super::*;

    /// The SDK's form of `parts`, which the reference conversion takes.
    fn sdk_span(p: &SpanParts<'_>) -> SpanData {
        let state = if p.trace_state.is_empty() {
            TraceState::default()
        } else {
            p.trace_state.parse().unwrap()
        };
        let value = |v: &Val<'_>| match v {
            Val::Str(s) => Value::from(s.to_string()),
            Val::Int(i) => Value::I64(*i),
            Val::F64(f) => Value::F64(*f),
            Val::Strs(a) => Value::Array(
                a.iter()
                    .map(|s| StringValue::from(s.to_string()))
                    .collect::<Vec<_>>()
                    .into(),
            ),
        };
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                false,
                state,
            ),
            parent_span_id: p
                .parent
                .map_or(SpanId::INVALID, |(id, _)| SpanId::from_bytes(id)),
            parent_span_is_remote: p.parent.is_some_and(|(_, remote)| remote),
            span_kind: match p.kind {
                SERVER => SpanKind::Server,
                CLIENT => SpanKind::Client,
                _ => SpanKind::Internal,
            },
            name: Cow::Owned(p.name.concat()),
            start_time: UNIX_EPOCH + Duration::from_nanos(p.start),
            end_time: UNIX_EPOCH + Duration::from_nanos(p.end),
            attributes: p
                .attrs
                .iter()
                .map(|a| KeyValue::new(a.0, value(&a.1)))
                .collect(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: match p.status {
                (ERROR, m) => Status::error(m.to_string()),
                (1, _) => Status::Ok,
                _ => Status::Unset,
            },
            instrumentation_scope: InstrumentationScope::builder("switchboard").build(),
        }
    }

    /// What is written here decodes to what the `opentelemetry-proto` crate's own
    /// conversion makes of the same span, for every kind of value and field.
    #[test]
    fn spans_decode_as_the_reference_conversion_makes_them() {
        let long = "x".repeat(300);
        let attrs = [
            Attr("gen_ai.operation.name", Val::Str("chat")),
            Attr("gen_ai.usage.input_tokens", Val::Int(12)),
            Attr("negative", Val::Int(-3)),
            Attr("big", Val::Int(i64::MAX)),
            Attr("switchboard.cost_usd", Val::F64(0.0000078)),
            Attr("empty", Val::Str("")),
            Attr("long", Val::Str(&long)),
            Attr("gen_ai.response.finish_reasons", Val::Strs(&["stop", ""])),
            Attr("none", Val::Strs(&[])),
        ];
        let base = SpanParts {
            trace_id: [0x4b; 16],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent: None,
            trace_state: "",
            name: &["chat", " ", "gpt-4o-mini"],
            kind: SERVER,
            start: 1_765_000_000_123_456_789,
            end: 1_765_000_000_223_456_789,
            attrs: &attrs,
            status: (UNSET, ""),
            flags: 1,
        };
        let cases = [
            base,
            SpanParts {
                parent: Some(([7; 8], true)),
                trace_state: "vendor=a1,other=b2",
                ..base
            },
            SpanParts {
                parent: Some(([7; 8], false)),
                kind: CLIENT,
                status: (ERROR, "timeout"),
                ..base
            },
            SpanParts {
                name: &[],
                attrs: &[],
                status: (ERROR, ""),
                flags: 0,
                ..base
            },
            SpanParts {
                status: (1, ""),
                start: 0,
                end: u64::MAX,
                ..base
            },
        ];
        for parts in cases {
            let mut buf = Vec::new();
            put_span(&mut buf, 2, &parts);
            let decoded = ScopeSpans::decode(buf.as_slice()).expect("valid protobuf");
            assert_eq!(
                decoded.spans,
                vec![Span::from(sdk_span(&parts))],
                "{parts:?}"
            );
        }
    }

    #[test]
    fn varints_take_the_bytes_they_are_counted_for() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(
                prost::encoding::decode_varint(&mut buf.as_slice()).unwrap(),
                v
            );
        }
    }
}
