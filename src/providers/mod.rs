//! The provider tier: one pooled HTTP client, and an [`Adapter`] per wire format.
//!
//! [`ProviderClient`] is the innermost `Service<ProviderCall>` of the stack. It picks
//! the adapter of the endpoint's provider kind, sends the translated request over one
//! shared hyper client (TLS with webpki roots, TCP_NODELAY, pooled), and turns the
//! answer into a [`ChunkStream`]: a non-stream answer is one complete chunk, an SSE
//! stream is decoded event by event with an idle timeout between events.
//!
//! Adding a provider means one module with its wire types implementing [`Adapter`],
//! and one line in [`ProviderClient::new`].
//!
//! # Example
//! ```
//! use switchboard::{catalog::Catalog, config::Config, context::{CallContext, ProviderCall}};
//! use switchboard::chat::{Aggregator, ChatRequest, Message, Role};
//! use switchboard::providers::ProviderClient;
//! use futures_util::TryStreamExt;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Catalog::from_config(&Config::demo());
//! let call = ProviderCall {
//!     endpoint: catalog.model("mock/echo").unwrap().endpoints[0].clone(),
//!     request: ChatRequest {
//!         model: "mock/echo".into(),
//!         messages: vec![Message::text(Role::User, "ping pong")],
//!         ..Default::default()
//!     }
//!     .into(),
//!     ctx: CallContext::new(),
//! };
//! let chunks: Vec<_> = ProviderClient::new().oneshot(call).await.unwrap().try_collect().await.unwrap();
//! let mut agg = Aggregator::default();
//! chunks.into_iter().for_each(|c| agg.push(c));
//! assert_eq!(agg.finish().choices[0].message.content.as_deref(), Some("ping pong"));
//! # }
//! ```

pub mod anthropic;
pub mod gemini;
pub mod http;
pub mod limits;
pub mod media;
pub mod mock;
pub mod openai;
pub mod redact;
pub mod sse;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::chat::ChatChunk;
use crate::config::ProviderKind;
use crate::context::{ChunkStream, ProviderCall};
use crate::error::{FailureKind, GatewayError, ProviderError};

/// Translates between the internal schema and one provider's wire format.
///
/// Implement it to add a provider that speaks HTTP; register it with
/// [`ProviderClient::with_adapter`]. The client does the rest: the pooled connection,
/// timeouts, error statuses (through [`error_message`](Adapter::error_message)), SSE
/// framing and the idle timeout between events. (A provider that is not HTTP at all,
/// or answers in-process, is simply a `Service<ProviderCall>` of your own in place of
/// the client: see `examples/custom_gateway.rs`.)
///
/// # Example
/// A private provider, "acme": `POST {base_url}/generate` with `{"model","prompt"}`
/// answers `{"text","tokens_in","tokens_out"}`, and streams `data: {"text"}` events
/// ending in `data: END`. It takes the place of the `openai` kind here, so a
/// `kind = "openai"` provider in the config speaks acme's format.
/// ```
/// use bytes::Bytes;
/// use futures_util::TryStreamExt;
/// use switchboard::chat::{ChatChunk, ChatRequest, Message, Role, Usage};
/// use switchboard::config::{Config, ProviderKind};
/// use switchboard::context::{CallContext, ProviderCall};
/// use switchboard::error::{FailureKind, ProviderError};
/// use switchboard::providers::{api_key, protocol_error, Adapter, Decoded, ProviderClient, StreamDecoder};
/// use tower::ServiceExt;
///
/// struct Acme;
///
/// impl Adapter for Acme {
///     fn build_request(&self, call: &ProviderCall, _stream: bool) -> Result<http::Request<Bytes>, ProviderError> {
///         let prompt: Vec<String> = call.request.messages.iter()
///             .filter_map(|m| m.content.as_ref().map(|c| c.text().into_owned()))
///             .collect();
///         let body = serde_json::json!({"model": call.endpoint.upstream_model, "prompt": prompt.join("\n")});
///         http::Request::post(format!("{}/generate", call.endpoint.provider.base_url))
///             .header("authorization", format!("Bearer {}", api_key(call)?))
///             .header("content-type", "application/json")
///             .body(Bytes::from(body.to_string()))
///             .map_err(|e| protocol_error(call, e))
///     }
///
///     fn parse_response(&self, call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError> {
///         let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| protocol_error(call, e))?;
///         let mut chunk = ChatChunk::text(v["text"].as_str().unwrap_or_default());
///         chunk.choices[0].finish_reason = Some("stop".into());
///         chunk.usage = Some(Usage::new(v["tokens_in"].as_u64().unwrap_or(0), v["tokens_out"].as_u64().unwrap_or(0)));
///         Ok(chunk)
///     }
///
///     fn stream_decoder(&self, _call: &ProviderCall) -> Box<dyn StreamDecoder> {
///         Box::new(AcmeStream)
///     }
/// }
///
/// struct AcmeStream;
///
/// impl StreamDecoder for AcmeStream {
///     fn decode(&mut self, _event: &str, data: &str) -> Result<Decoded, ProviderError> {
///         if data == "END" {
///             return Ok(Decoded::Done);
///         }
///         let v: serde_json::Value = serde_json::from_str(data)
///             .map_err(|e| ProviderError::new("acme", FailureKind::Protocol, e.to_string()))?;
///         Ok(Decoded::Chunk(ChatChunk::text(v["text"].as_str().unwrap_or_default())))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// // A stand-in for acme's server on 127.0.0.1.
/// let acme = axum::Router::new().route("/generate", axum::routing::post(
///     |headers: http::HeaderMap, body: String| async move {
///         assert_eq!(headers["authorization"], "Bearer acme-secret");
///         let req: serde_json::Value = serde_json::from_str(&body).unwrap();
///         assert_eq!(req["model"], "small-1");
///         axum::Json(serde_json::json!({"text": "hi from acme", "tokens_in": 2, "tokens_out": 3}))
///     },
/// ));
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
/// let base = format!("http://{}", listener.local_addr().unwrap());
/// tokio::spawn(async move { axum::serve(listener, acme).await.unwrap() });
///
/// let config = Config::from_toml(&format!(r#"
///     [[providers]]
///     name = "acme"
///     kind = "openai"
///     base_url = "{base}"
///     api_key = "acme-secret"
///     [[models]]
///     id = "acme/small"
///     tokenizer = "o200k_base"
///     [[models.endpoints]]
///     provider = "acme"
///     upstream_model = "small-1"
///     prompt_usd_per_mtok = 1.0
///     completion_usd_per_mtok = 1.0
/// "#)).unwrap();
/// let catalog = switchboard::catalog::Catalog::from_config(&config);
/// let client = ProviderClient::new().with_adapter(ProviderKind::OpenAi, Acme);
/// let call = ProviderCall {
///     endpoint: catalog.model("acme/small").unwrap().endpoints[0].clone(),
///     request: ChatRequest {
///         model: "acme/small".into(),
///         messages: vec![Message::text(Role::User, "hello")],
///         ..Default::default()
///     }
///     .into(),
///     ctx: CallContext::new(),
/// };
/// let chunks: Vec<ChatChunk> = client.oneshot(call).await.unwrap().try_collect().await.unwrap();
/// assert_eq!(chunks[0].choices[0].delta.content.as_deref(), Some("hi from acme"));
/// assert_eq!(chunks[0].usage.as_ref().unwrap().completion_tokens, 3);
///
/// // The stream decoder on its own:
/// let mut decoder = AcmeStream;
/// assert!(matches!(decoder.decode("", r#"{"text":"hi"}"#), Ok(Decoded::Chunk(c)) if c.is_content()));
/// assert!(matches!(decoder.decode("", "END"), Ok(Decoded::Done)));
/// # }
/// ```
pub trait Adapter: Send + Sync + 'static {
    /// The upstream request: absolute URL, headers (the provider's key included), body.
    fn build_request(
        &self,
        call: &ProviderCall,
        stream: bool,
    ) -> Result<::http::Request<Bytes>, ProviderError>;

    /// A complete non-stream answer as one chunk (content, tool calls, finish, usage).
    fn parse_response(&self, call: &ProviderCall, body: &[u8]) -> Result<ChatChunk, ProviderError>;

    /// A decoder for one SSE stream.
    fn stream_decoder(&self, call: &ProviderCall) -> Box<dyn StreamDecoder>;

    /// The provider's message from an error body (default: `error.message` or the text).
    fn error_message(&self, body: &[u8]) -> String {
        default_error_message(body)
    }
}

/// Turns one stream's SSE events into chunks; holds that stream's state.
pub trait StreamDecoder: Send {
    /// Decodes one event (`event` is the SSE event name, empty when none).
    fn decode(&mut self, event: &str, data: &str) -> Result<Decoded, ProviderError>;
}

/// What one SSE event decoded to.
// Not boxed: the chunk moves once per event, and a box would be an allocation per chunk.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Decoded {
    /// A chunk to pass on.
    Chunk(ChatChunk),
    /// Nothing to pass on (pings, bookkeeping events).
    Skip,
    /// The stream's end marker.
    Done,
}

/// Finds a readable message in an error body: `{"error":{"message"}}`,
/// `{"error":"…"}`, `[{"error":…}]` (Gemini streams), `{"message"}`, or the text itself.
pub fn default_error_message(body: &[u8]) -> String {
    fn find(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::Array(items) => items.iter().find_map(find),
            serde_json::Value::Object(m) => match m.get("error") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(e @ serde_json::Value::Object(_)) => find(e),
                _ => m
                    .get("message")
                    .and_then(|s| s.as_str())
                    .map(str::to_string),
            },
            _ => None,
        }
    }
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .as_ref()
        .and_then(find)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let mut end = text.len().min(500);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].to_string()
        })
}

/// Parses one SSE event's JSON data; `Ok(None)` for an empty event (keep-alives), a
/// `Protocol` failure for anything that is not JSON of the expected shape.
pub fn parse_event<T: serde::de::DeserializeOwned>(
    provider: &Arc<str>,
    data: &str,
) -> Result<Option<T>, ProviderError> {
    let data = data.trim();
    if data.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(data).map(Some).map_err(|e| {
        ProviderError::new(
            provider.clone(),
            FailureKind::Protocol,
            format!("bad event: {e}"),
        )
    })
}

/// The provider's key, or the `NotConfigured` failure that makes fallback move on.
pub fn api_key(call: &ProviderCall) -> Result<&str, ProviderError> {
    let p = &call.endpoint.provider;
    p.api_key.as_deref().ok_or_else(|| {
        let hint = match &p.api_key_env {
            Some(var) => format!("its API key variable `{var}` is not set"),
            None => "it has no API key configured".to_string(),
        };
        ProviderError::new(p.name.clone(), FailureKind::NotConfigured, hint)
    })
}

/// The provider's key when it has one: `Ok(None)` for a keyless provider (no
/// `api_key`, no `api_key_env`: a local server, sent no key header), the
/// `NotConfigured` failure when its `api_key_env` variable is not set.
pub fn optional_api_key(call: &ProviderCall) -> Result<Option<&str>, ProviderError> {
    let p = &call.endpoint.provider;
    if p.api_key.is_none() && p.api_key_env.is_none() {
        return Ok(None);
    }
    api_key(call).map(Some)
}

/// A protocol failure: the upstream answered something that is not its wire format.
pub fn protocol_error(call: &ProviderCall, what: impl std::fmt::Display) -> ProviderError {
    ProviderError::new(
        call.endpoint.provider.name.clone(),
        FailureKind::Protocol,
        what.to_string(),
    )
}

/// The innermost service: calls the endpoint's provider and yields its chunks.
#[derive(Clone)]
pub struct ProviderClient {
    /// Shared: a hyper client is a large struct of builders and `Arc`s, and the
    /// client is cloned into every attempt.
    http: Arc<http::HttpsClient>,
    adapters: Arc<HashMap<ProviderKind, Arc<dyn Adapter>>>,
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("adapters", &self.adapters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for ProviderClient {
    fn default() -> Self {
        Self::new()
    }
}

impl ProviderClient {
    /// A client with every built-in adapter and a fresh connection pool.
    pub fn new() -> Self {
        let mut adapters: HashMap<ProviderKind, Arc<dyn Adapter>> = HashMap::new();
        adapters.insert(ProviderKind::OpenAi, Arc::new(openai::OpenAiAdapter));
        adapters.insert(
            ProviderKind::Anthropic,
            Arc::new(anthropic::AnthropicAdapter),
        );
        adapters.insert(ProviderKind::Gemini, Arc::new(gemini::GeminiAdapter));
        ProviderClient {
            http: Arc::new(http::new_client()),
            adapters: Arc::new(adapters),
        }
    }

    /// Replaces the adapter used for `kind`.
    pub fn with_adapter(mut self, kind: ProviderKind, adapter: impl Adapter) -> Self {
        Arc::make_mut(&mut self.adapters).insert(kind, Arc::new(adapter));
        self
    }
}

impl tower::Service<ProviderCall> for ProviderClient {
    type Response = ChunkStream;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<ChunkStream, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: ProviderCall) -> Self::Future {
        let kind = call.endpoint.provider.kind;
        if kind == ProviderKind::Mock {
            return Box::pin(mock::call(call));
        }
        let adapter = self.adapters.get(&kind).cloned();
        let client = self.http.clone();
        Box::pin(async move {
            let adapter = adapter.ok_or_else(|| {
                GatewayError::Internal(format!(
                    "no adapter registered for kind `{}`",
                    kind.as_str()
                ))
            })?;
            http::send(&client, adapter, call).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::default_error_message;

    #[test]
    fn error_messages_are_found_in_every_shape() {
        assert_eq!(
            default_error_message(br#"{"error":{"message":"bad key","type":"x"}}"#),
            "bad key"
        );
        assert_eq!(
            default_error_message(
                br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            "Overloaded"
        );
        assert_eq!(
            default_error_message(br#"[{"error":{"code":429,"message":"quota"}}]"#),
            "quota"
        );
        assert_eq!(default_error_message(b"plain text\n"), "plain text");
    }
}
