//! One error type for the whole gateway, mapped 1:1 to the codes of SPEC §3.2.
//!
//! [`GatewayError`] is what every typed layer returns; [`GatewayError::into_response`]
//! is the one place that turns it into the OpenAI-shaped JSON body. One upstream
//! attempt's failure is a [`ProviderError`], and [`ProviderError::class`] is the one
//! retriability classifier shared by fallback, health and metrics (SPEC §5).
//!
//! # Example
//! ```
//! use switchboard::error::{GatewayError, ProviderError, FailureClass};
//! use http::StatusCode;
//!
//! let e = GatewayError::ModelNotFound("no model `x/y`".into());
//! assert_eq!(e.status(), StatusCode::NOT_FOUND);
//! assert_eq!(e.code(), "model_not_found");
//!
//! let overloaded = ProviderError::status("anthropic", 529, "Overloaded");
//! assert_eq!(overloaded.class(), FailureClass::Retriable);
//! let bad = ProviderError::status("openai", 400, "bad tool schema");
//! assert_eq!(bad.class(), FailureClass::Client);
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

/// The response body type of every HTTP-tier layer.
pub type Body = axum::body::Body;

/// Tower's conventional boxed error (what `Buffer`, `Timeout` and `tower_test` yield).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything a client can be told went wrong (SPEC §3.2).
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// 400: malformed JSON, missing/empty `messages`, bad types or roles.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401: no key, unknown key.
    #[error("{0}")]
    InvalidApiKey(String),
    /// 402: the key's balance or limit cannot cover the request's reserve.
    #[error("{0}")]
    InsufficientCredits(String),
    /// 403: key disabled, or model outside its allow-list.
    #[error("{0}")]
    Forbidden(String),
    /// 404: unknown model id.
    #[error("{0}")]
    ModelNotFound(String),
    /// 404: the `provider` preferences leave no endpoint.
    #[error("{0}")]
    NoEndpoints(String),
    /// 404: unknown path (or resource).
    #[error("{0}")]
    NotFound(String),
    /// 405: known path, wrong method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 413: body over `max_body_bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429: key limit hit, or every attempt rate-limited upstream.
    #[error("{message}")]
    RateLimited {
        /// What was exceeded.
        message: String,
        /// When to come back; sent as `Retry-After` in whole seconds.
        retry_after: Option<Duration>,
    },
    /// 502: every allowed attempt failed; the message lists them.
    #[error("{0}")]
    UpstreamError(String),
    /// 503: every candidate endpoint is degraded.
    #[error("{0}")]
    NoHealthyProvider(String),
    /// 504: the last attempt timed out.
    #[error("{0}")]
    UpstreamTimeout(String),
    /// One upstream attempt failed (before fallback turns attempts into a final error).
    #[error("{0}")]
    Provider(ProviderError),
    /// 500: a bug or a broken store.
    #[error("{0}")]
    Internal(String),
    /// 408: the client did not send its request (body) within
    /// `[server].request_timeout_secs`. Not in SPEC §3.2's table (`request_timeout`).
    #[error("{0}")]
    RequestTimeout(String),
    /// 503: the gateway has `[server].max_connections` open; a new connection is
    /// refused. Not in SPEC §3.2's table (`overloaded`).
    #[error("{0}")]
    Overloaded(String),
    /// 503: the shared store (PostgreSQL) does not answer; nothing is served that
    /// might not be charged (SPEC §6).
    #[error("{0}")]
    StoreUnavailable(String),
    /// 422: an `Idempotency-Key` used again with a different request (SPEC §8.2).
    #[error("{0}")]
    IdempotencyKeyReused(String),
    /// 503: the gateway is stopping and `[server].shutdown_grace_secs` ran out before
    /// this request finished ([`crate::drain`]); a stream gets it as its mid-stream
    /// error. Not in SPEC §3.2's table (`server_shutting_down`).
    #[error("{0}")]
    ShuttingDown(String),
}

impl GatewayError {
    /// The HTTP status of SPEC §3.2.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            InvalidRequest(_) => StatusCode::BAD_REQUEST,
            InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            InsufficientCredits(_) => StatusCode::PAYMENT_REQUIRED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            ModelNotFound(_) | NoEndpoints(_) | NotFound(_) => StatusCode::NOT_FOUND,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            UpstreamError(_) => StatusCode::BAD_GATEWAY,
            NoHealthyProvider(_) => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Provider(e) => e.client_status(),
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IdempotencyKeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ShuttingDown(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The `error.code` of SPEC §3.2.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            InvalidRequest(_) => "invalid_request",
            InvalidApiKey(_) => "invalid_api_key",
            InsufficientCredits(_) => "insufficient_credits",
            Forbidden(_) => "forbidden",
            ModelNotFound(_) => "model_not_found",
            NoEndpoints(_) => "no_endpoints",
            NotFound(_) => "not_found",
            MethodNotAllowed(_) => "method_not_allowed",
            PayloadTooLarge(_) => "payload_too_large",
            RateLimited { .. } => "rate_limited",
            UpstreamError(_) => "upstream_error",
            NoHealthyProvider(_) => "no_healthy_provider",
            UpstreamTimeout(_) => "upstream_timeout",
            Provider(e) => match e.client_status() {
                StatusCode::GATEWAY_TIMEOUT => "upstream_timeout",
                StatusCode::TOO_MANY_REQUESTS => "rate_limited",
                StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
                StatusCode::BAD_GATEWAY => "upstream_error",
                _ => "invalid_request",
            },
            Internal(_) => "internal_error",
            RequestTimeout(_) => "request_timeout",
            Overloaded(_) => "overloaded",
            StoreUnavailable(_) => "store_unavailable",
            IdempotencyKeyReused(_) => "idempotency_key_reused",
            ShuttingDown(_) => "server_shutting_down",
        }
    }

    /// The OpenAI error class (`error.type`).
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::PAYMENT_REQUIRED => "insufficient_quota",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// `Retry-After`, where one applies.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => *retry_after,
            GatewayError::Provider(e) if e.client_status() == StatusCode::TOO_MANY_REQUESTS => {
                e.retry_after
            }
            _ => None,
        }
    }

    /// The `{"message","type","code"}` object.
    pub fn to_json(&self) -> Value {
        json!({"message": self.to_string(), "type": self.kind(), "code": self.code()})
    }

    /// The SPEC-shaped response: status, JSON body, and `Retry-After` when set.
    pub fn into_response(self) -> http::Response<Body> {
        let body = serde_json::to_vec(&json!({ "error": self.to_json() }))
            .unwrap_or_else(|_| b"{}".to_vec());
        let mut res = http::Response::new(Body::from(Bytes::from(body)));
        *res.status_mut() = self.status();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up so a client never comes back too early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        res
    }
}

impl GatewayError {
    /// Recovers a `GatewayError` from a boxed error (tower middleware boxes errors);
    /// tower's `Elapsed` becomes 504, anything else 500.
    pub fn from_boxed(e: BoxError) -> Self {
        let e = match e.downcast::<GatewayError>() {
            Ok(g) => return *g,
            Err(e) => e,
        };
        let e = match e.downcast::<ProviderError>() {
            Ok(p) => return GatewayError::Provider(*p),
            Err(e) => e,
        };
        if e.is::<tower::timeout::error::Elapsed>() {
            return GatewayError::UpstreamTimeout("the request timed out".into());
        }
        GatewayError::Internal(e.to_string())
    }
}

impl From<ProviderError> for GatewayError {
    fn from(e: ProviderError) -> Self {
        GatewayError::Provider(e)
    }
}

/// How one failed attempt should be handled: the shared classifier of SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Transient: 408, 429, 5xx, connect errors, timeouts, broken or stalled streams,
    /// in-band errors. Try another endpoint, or this one after backoff; counts
    /// against the endpoint's health.
    Retriable,
    /// The gateway's own key or catalogue is at fault (upstream 401/402/403/404,
    /// a provider with no key): fail over, but it says nothing of the request.
    Failover,
    /// The request itself is at fault (400, 413, 422…): goes back to the client.
    Client,
}

/// What went wrong with one upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The upstream answered with an error status.
    Status(u16),
    /// No connection could be made.
    Connect,
    /// No first byte within the provider's `timeout_secs`.
    Timeout,
    /// A stream was silent for `stream_idle_timeout_secs`.
    StreamIdle,
    /// A stream (or body) broke off before its end.
    StreamBroken,
    /// An in-band error event in a stream.
    InBand,
    /// The upstream answered something that is not its wire format.
    Protocol,
    /// The gateway cannot call this provider (e.g. its key is not set).
    NotConfigured,
}

impl FailureKind {
    /// A short label for metrics, attempt records and `GET /admin/endpoints`:
    /// `"503"`, `"timeout"`, `"connect_error"`, ….
    pub fn label(self) -> String {
        match self {
            FailureKind::Status(s) => s.to_string(),
            FailureKind::Connect => "connect_error".into(),
            FailureKind::Timeout => "timeout".into(),
            FailureKind::StreamIdle => "stream_idle".into(),
            FailureKind::StreamBroken => "stream_broken".into(),
            FailureKind::InBand => "stream_error".into(),
            FailureKind::Protocol => "bad_response".into(),
            FailureKind::NotConfigured => "not_configured".into(),
        }
    }

    /// The kind a [`label`](Self::label) names (how instances tell each other what
    /// degraded an endpoint); `None` for anything else.
    pub fn from_label(label: &str) -> Option<Self> {
        Some(match label {
            "connect_error" => FailureKind::Connect,
            "timeout" => FailureKind::Timeout,
            "stream_idle" => FailureKind::StreamIdle,
            "stream_broken" => FailureKind::StreamBroken,
            "stream_error" => FailureKind::InBand,
            "bad_response" => FailureKind::Protocol,
            "not_configured" => FailureKind::NotConfigured,
            status => {
                let code: u16 = status.parse().ok()?;
                if !(100..=999).contains(&code) || status.len() != 3 {
                    return None;
                }
                FailureKind::Status(code)
            }
        })
    }
}

/// One upstream attempt's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    /// Provider name.
    pub provider: Arc<str>,
    /// What happened.
    pub kind: FailureKind,
    /// The provider's own message, kept for the client.
    pub message: String,
    /// The upstream's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// A failure of `kind` with a message.
    pub fn new(
        provider: impl Into<Arc<str>>,
        kind: FailureKind,
        message: impl Into<String>,
    ) -> Self {
        ProviderError {
            provider: provider.into(),
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// An error status from the upstream.
    pub fn status(provider: impl Into<Arc<str>>, status: u16, message: impl Into<String>) -> Self {
        ProviderError::new(provider, FailureKind::Status(status), message)
    }

    /// Sets the upstream's `Retry-After`.
    pub fn with_retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }

    /// The shared retriability classifier (SPEC §5).
    pub fn class(&self) -> FailureClass {
        match self.kind {
            FailureKind::Status(s) => match s {
                408 | 429 => FailureClass::Retriable,
                401..=404 => FailureClass::Failover,
                400..=499 => FailureClass::Client,
                _ => FailureClass::Retriable,
            },
            FailureKind::NotConfigured => FailureClass::Failover,
            _ => FailureClass::Retriable,
        }
    }

    /// Whether the attempt ran out of time (first byte or stream idle).
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, FailureKind::Timeout | FailureKind::StreamIdle)
    }

    /// Whether the upstream throttled us.
    pub fn is_rate_limit(&self) -> bool {
        self.kind == FailureKind::Status(429)
    }

    /// A short label for metrics and attempt records: `"503"`, `"timeout"`, ….
    pub fn label(&self) -> String {
        self.kind.label()
    }

    /// The status a client sees when this is the request's last failure.
    pub fn client_status(&self) -> StatusCode {
        if self.is_timeout() {
            return StatusCode::GATEWAY_TIMEOUT;
        }
        match (self.class(), &self.kind) {
            (_, FailureKind::Status(429)) => StatusCode::TOO_MANY_REQUESTS,
            (FailureClass::Client, FailureKind::Status(s)) => {
                StatusCode::from_u16(*s).unwrap_or(StatusCode::BAD_REQUEST)
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            FailureKind::Status(s) => write!(f, "provider `{}` returned {s}", self.provider)?,
            FailureKind::Connect => write!(f, "provider `{}` could not be reached", self.provider)?,
            FailureKind::Timeout => write!(f, "provider `{}` timed out", self.provider)?,
            FailureKind::StreamIdle => write!(f, "provider `{}` stream stalled", self.provider)?,
            FailureKind::StreamBroken => {
                write!(f, "provider `{}` stream broke off", self.provider)?
            }
            FailureKind::InBand => write!(f, "provider `{}` sent an error event", self.provider)?,
            FailureKind::Protocol => {
                write!(f, "provider `{}` sent an unreadable answer", self.provider)?
            }
            FailureKind::NotConfigured => write!(f, "provider `{}` is not usable", self.provider)?,
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_come_back_from_their_labels() {
        let kinds = [
            FailureKind::Status(503),
            FailureKind::Status(429),
            FailureKind::Connect,
            FailureKind::Timeout,
            FailureKind::StreamIdle,
            FailureKind::StreamBroken,
            FailureKind::InBand,
            FailureKind::Protocol,
            FailureKind::NotConfigured,
        ];
        for k in kinds {
            assert_eq!(FailureKind::from_label(&k.label()), Some(k), "{k:?}");
        }
        for bad in ["", "5031", "50", "+50", "099", "x", "Timeout"] {
            assert_eq!(FailureKind::from_label(bad), None, "{bad}");
        }
    }

    #[test]
    fn classification_follows_spec_section_5() {
        let class = |s| ProviderError::status("p", s, "").class();
        for s in [408, 429, 500, 502, 503, 529] {
            assert_eq!(class(s), FailureClass::Retriable, "{s}");
        }
        for s in [401, 402, 403, 404] {
            assert_eq!(class(s), FailureClass::Failover, "{s}");
        }
        for s in [400, 413, 422] {
            assert_eq!(class(s), FailureClass::Client, "{s}");
        }
        let t = ProviderError::new("p", FailureKind::Timeout, "");
        assert_eq!(t.class(), FailureClass::Retriable);
        assert_eq!(GatewayError::from(t).status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn client_fault_keeps_the_upstream_status_and_message() {
        let e = GatewayError::from(ProviderError::status("openai", 422, "bad schema"));
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("bad schema"));
    }

    #[test]
    fn rate_limit_response_has_whole_second_retry_after() {
        let res = GatewayError::RateLimited {
            message: "slow down".into(),
            retry_after: Some(Duration::from_millis(1500)),
        }
        .into_response();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "2");
    }
}
