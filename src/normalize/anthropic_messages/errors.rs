//! `AnthropicErrorsLayer`: errors in Anthropic's shape on the `/messages` paths,
//! wherever they were made (SPEC §7.1).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, Either, MapOk};
use futures_util::TryFutureExt;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::{Layer, Service};

use crate::error::{Body, GatewayError};

/// The largest error body rewritten (the gateway's own are a few hundred bytes).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Anthropic's error `type` for an HTTP status (SPEC §7.1): 400 and 413
/// `invalid_request_error`, 401 `authentication_error`, 402 `billing_error`, 403
/// `permission_error`, 404 `not_found_error`, 429 `rate_limit_error`, 5xx
/// `api_error`; other 4xx `invalid_request_error`.
pub fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`.
pub(crate) fn error_body(status: StatusCode, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": "error",
        "error": {"type": error_type(status), "message": message},
    }))
    .unwrap_or_default()
}

/// A [`GatewayError`] as an Anthropic-shaped response (status and `Retry-After` as
/// [`GatewayError::into_response`] sets them).
pub(crate) fn error_response(e: GatewayError) -> Response<Body> {
    let status = e.status();
    let message = e.to_string();
    let mut res = e.into_response();
    *res.body_mut() = Body::from(error_body(status, &message));
    res.headers_mut().remove(header::CONTENT_LENGTH);
    res
}

/// Whether a request path is one of the Anthropic Messages endpoints.
pub(crate) fn is_messages_path(path: &str) -> bool {
    let path = path.trim_end_matches('/');
    path.ends_with("/messages") || path.ends_with("/messages/count_tokens")
}

/// Rewrites the SPEC §3.2 error bodies (`{"error":{"message","type","code"}}`) of
/// requests to `…/messages` and `…/messages/count_tokens` into Anthropic's shape,
/// `{"type":"error","error":{"type","message"}}`, keeping the status and headers
/// (`Retry-After`…). Other paths and successful answers pass untouched; an error
/// body is read only when there is one (the cold path).
///
/// # Example
/// ```
/// use switchboard::error::GatewayError;
/// use switchboard::normalize::AnthropicErrorsLayer;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(AnthropicErrorsLayer::new())
///     .service(service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(GatewayError::InvalidApiKey("unknown key".into()).into_response())
///     }));
/// let res = svc.clone().oneshot(http::Request::post("/v1/messages").body(String::new()).unwrap()).await.unwrap();
/// assert_eq!(res.status(), 401);
/// let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
/// let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(v, serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": "unknown key"}}));
///
/// // Other paths keep the OpenAI shape.
/// let res = svc.oneshot(http::Request::post("/v1/chat/completions").body(String::new()).unwrap()).await.unwrap();
/// let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
/// let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
/// assert_eq!(v["error"]["code"], "invalid_api_key");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct AnthropicErrorsLayer;

impl AnthropicErrorsLayer {
    /// The layer.
    pub fn new() -> Self {
        AnthropicErrorsLayer
    }
}

impl<S> Layer<S> for AnthropicErrorsLayer {
    type Service = AnthropicErrors<S>;
    fn layer(&self, inner: S) -> AnthropicErrors<S> {
        AnthropicErrors { inner }
    }
}

/// The service of [`AnthropicErrorsLayer`].
#[derive(Debug, Clone)]
pub struct AnthropicErrors<S> {
    inner: S,
}

impl<S> AnthropicErrors<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        AnthropicErrors { inner }
    }

    /// An [`AnthropicErrorsLayer`].
    pub fn layer() -> AnthropicErrorsLayer {
        AnthropicErrorsLayer
    }
}

impl<S, B, RB> Service<Request<B>> for AnthropicErrors<S>
where
    S: Service<Request<B>, Response = Response<RB>, Error = Infallible>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<crate::error::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    // Other paths (chat completions, the hot path) get no allocation of their own.
    type Future = Either<
        MapOk<S::Future, fn(Response<RB>) -> Response<Body>>,
        BoxFuture<'static, Result<Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let anthropic = is_messages_path(req.uri().path());
        let fut = self.inner.call(req);
        if !anthropic {
            return Either::Left(fut.map_ok(as_body::<RB> as fn(Response<RB>) -> Response<Body>));
        }
        Either::Right(Box::pin(async move {
            let res = fut.await?;
            if res.status().as_u16() < 400 {
                return Ok(res.map(Body::new));
            }
            Ok(rewrite(res).await)
        }))
    }
}

fn as_body<RB>(res: Response<RB>) -> Response<Body>
where
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<crate::error::BoxError>,
{
    res.map(Body::new)
}

/// An error response in Anthropic's shape; a body that is not a SPEC §3.2 error
/// (already Anthropic's, or not JSON) is kept as it was.
#[cold]
async fn rewrite<RB>(res: Response<RB>) -> Response<Body>
where
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<crate::error::BoxError>,
{
    let (mut parts, body) = res.into_parts();
    let bytes = match http_body_util::Limited::new(body, MAX_ERROR_BODY)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            let body = error_body(parts.status, "the gateway could not read its error answer");
            return Response::from_parts(parts, Body::from(body));
        }
    };
    let message = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
        v.get("error")?.get("code").is_some().then(|| {
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
    });
    let Some(message) = message else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = error_body(parts.status, &message);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tower::{service_fn, ServiceExt};

    async fn through(path: &str, e: GatewayError) -> (Response<Body>, Value) {
        let svc = AnthropicErrorsLayer::new().layer(service_fn(move |_r: Request<String>| {
            let e = e.clone();
            async move { Ok::<_, Infallible>(e.into_response()) }
        }));
        let res = svc
            .oneshot(Request::post(path).body(String::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            Response::from_parts(parts, Body::empty()),
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[tokio::test]
    async fn every_status_gets_its_type_and_keeps_its_headers() {
        let cases = [
            (
                GatewayError::InvalidRequest("x".into()),
                "invalid_request_error",
            ),
            (
                GatewayError::PayloadTooLarge("x".into()),
                "invalid_request_error",
            ),
            (
                GatewayError::InvalidApiKey("x".into()),
                "authentication_error",
            ),
            (
                GatewayError::InsufficientCredits("x".into()),
                "billing_error",
            ),
            (GatewayError::Forbidden("x".into()), "permission_error"),
            (GatewayError::ModelNotFound("x".into()), "not_found_error"),
            (GatewayError::NotFound("x".into()), "not_found_error"),
            (GatewayError::UpstreamError("x".into()), "api_error"),
            (GatewayError::NoHealthyProvider("x".into()), "api_error"),
            (GatewayError::UpstreamTimeout("x".into()), "api_error"),
            (GatewayError::Internal("x".into()), "api_error"),
        ];
        for (e, kind) in cases {
            let status = e.status();
            for path in ["/v1/messages", "/api/v1/messages/count_tokens", "/messages"] {
                let (res, v) = through(path, e.clone()).await;
                assert_eq!(res.status(), status);
                assert_eq!(
                    v,
                    serde_json::json!({"type": "error", "error": {"type": kind, "message": "x"}}),
                    "{path} {status}"
                );
            }
        }
        let (res, v) = through(
            "/v1/messages",
            GatewayError::RateLimited {
                message: "slow down".into(),
                retry_after: Some(Duration::from_secs(7)),
            },
        )
        .await;
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["retry-after"], "7");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let (_, v) = through("/v1/chat/completions", GatewayError::Forbidden("x".into())).await;
        assert_eq!(v["error"]["code"], "forbidden");
    }
}
