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
pub mod media;
pub mod mock;
pub mod openai;

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
/// [`ProviderClient::with_adapter`].
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
    http: http::HttpsClient,
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
            http: http::new_client(),
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
            return Box::pin(async move { Ok(mock::respond(&call)) });
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
