//! `POST /v1/messages/count_tokens`: a Messages body's prompt counted with the model's
//! tokenizer, free of charge (SPEC §7.1).

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response};

use super::errors::error_response;
use super::parse::{parse, Require};
use crate::catalog::Catalog;
use crate::error::{Body, BoxError, GatewayError};
use crate::keys::KeyRecord;

/// The `count_tokens` endpoint: behind the auth layer (which puts the caller's
/// [`KeyRecord`] in the request's extensions), it resolves the model in the catalog
/// (404 unknown, 403 outside the key's allow-list) and answers
/// `{"input_tokens": N}`, counted as metering counts a prompt
/// ([`crate::metering::prompt_tokens`]). No upstream call, no charge, no generation
/// record. Errors are Anthropic-shaped.
#[derive(Debug, Clone)]
pub struct CountTokens {
    catalog: Arc<Catalog>,
    max_body_bytes: usize,
    body_timeout: Duration,
}

impl CountTokens {
    /// The endpoint over `catalog`, reading bodies of at most `max_body_bytes` within
    /// `body_timeout`.
    pub fn new(catalog: Arc<Catalog>, max_body_bytes: usize, body_timeout: Duration) -> Self {
        CountTokens {
            catalog,
            max_body_bytes,
            body_timeout,
        }
    }

    /// Answers one request.
    pub async fn handle<B>(self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        match self.count(req).await {
            Ok(n) => {
                let mut res = Response::new(Body::from(format!("{{\"input_tokens\":{n}}}")));
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                res
            }
            Err(e) => error_response(e),
        }
    }

    async fn count<B>(&self, req: Request<B>) -> Result<u64, GatewayError>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let key = req.extensions().get::<Arc<KeyRecord>>().cloned();
        let (parts, body) = req.into_parts();
        let bytes = tokio::time::timeout(
            self.body_timeout,
            super::super::read_body(body, self.max_body_bytes),
        )
        .await
        .map_err(|_| super::super::body_timed_out())??;
        let request = parse(&bytes, &parts.headers, Require::Nothing)?;
        let (id, _variant) = crate::route::split_variant(&request.model)?;
        let model = self.catalog.model(id).ok_or_else(|| {
            GatewayError::ModelNotFound(format!(
                "no model `{id}`; GET /v1/models lists the models of this gateway"
            ))
        })?;
        if let Some(key) = key {
            if !key.allows_model(id) {
                return Err(GatewayError::Forbidden(format!(
                    "key `{}` may not use model `{id}`",
                    key.name
                )));
            }
        }
        Ok(crate::metering::prompt_tokens(&model.tokenizer, &request))
    }
}
