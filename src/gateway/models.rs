//! `GET /v1/models` and `GET /v1/models/{id}`: the catalog as OpenRouter lists it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{Path, State};
use http::Response;
use serde_json::{json, Value};

use super::Stack;
use crate::auth::AuthLayer;
use crate::catalog::Model;
use crate::error::{Body, GatewayError};

/// The `/v1/models` object of one model, priced at its cheapest endpoint.
pub fn model_json(m: &Model) -> Value {
    let cheapest = m
        .endpoints
        .iter()
        .min_by_key(|e| e.pricing.prompt.pico_per_token() + e.pricing.completion.pico_per_token());
    let (prompt, completion) = cheapest.map_or(("0".into(), "0".into()), |e| {
        (
            e.pricing.prompt.per_token_usd(),
            e.pricing.completion.per_token_usd(),
        )
    });
    let owned_by = m.id.split_once('/').map_or("switchboard", |(o, _)| o);
    json!({
        "id": m.id.as_ref(),
        "object": "model",
        "created": 0,
        "owned_by": owned_by,
        "type": m.kind.as_str(),
        "context_length": m.context_length,
        "pricing": {"prompt": prompt, "completion": completion},
    })
}

/// What `/v1/models` reads: the catalog, and the auth cache for an optional key.
#[derive(Clone)]
pub(super) struct ModelsState {
    /// The current stack, for its catalog.
    pub(super) stack: Arc<ArcSwap<Stack>>,
    pub(super) auth: AuthLayer,
}

/// The key a `/v1/models` request comes with: `None` without one (the whole catalog
/// is public, as on OpenRouter), its record when valid, else the error of any other
/// client route (401 unknown or expired, 403 disabled): a client that sends a wrong
/// key learns it here too.
async fn models_key(
    state: &ModelsState,
    headers: &http::HeaderMap,
) -> Result<Option<Arc<crate::keys::KeyRecord>>, GatewayError> {
    match crate::auth::secret_of(headers) {
        None => Ok(None),
        Some(secret) => state.auth.authenticate(Some(secret)).await.map(Some),
    }
}

/// The request's key (if it sent one) and the current catalog, or the error answer.
async fn key_and_catalog(
    state: &ModelsState,
    headers: &http::HeaderMap,
) -> Result<
    (
        Option<Arc<crate::keys::KeyRecord>>,
        Arc<crate::catalog::Catalog>,
    ),
    Response<Body>,
> {
    let key = models_key(state, headers)
        .await
        .map_err(|e| e.into_response())?;
    Ok((key, state.stack.load_full().catalog.clone()))
}

/// `GET /v1/models`: the whole catalog, or with a key only the models its
/// allow-list permits.
pub(super) async fn list_models(
    State(state): State<ModelsState>,
    headers: http::HeaderMap,
) -> Response<Body> {
    let (key, catalog) = match key_and_catalog(&state, &headers).await {
        Ok(both) => both,
        Err(res) => return res,
    };
    let data: Vec<Value> = catalog
        .models()
        .iter()
        .filter(|m| key.as_ref().is_none_or(|k| k.allows_model(&m.id)))
        .map(|m| model_json(m))
        .collect();
    json_ok(&json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: one model; with a key whose allow-list leaves it out,
/// 403 `forbidden`, as a chat request for it would get (the catalog is public
/// without a key, so there is nothing to hide by answering 404).
pub(super) async fn get_model(
    State(state): State<ModelsState>,
    Path(id): Path<String>,
    headers: http::HeaderMap,
) -> Response<Body> {
    let (key, catalog) = match key_and_catalog(&state, &headers).await {
        Ok(both) => both,
        Err(res) => return res,
    };
    match catalog.model(&id) {
        Some(m) => match key {
            Some(k) if !k.allows_model(&m.id) => GatewayError::Forbidden(format!(
                "key `{}` may not use model `{id}` (its allow-list, `models`, leaves it out)",
                k.name
            ))
            .into_response(),
            _ => json_ok(&model_json(m)),
        },
        None => GatewayError::ModelNotFound(format!("no model `{id}`")).into_response(),
    }
}

/// A 200 `application/json` response.
fn json_ok(v: &Value) -> Response<Body> {
    let mut res = Response::new(Body::from(v.to_string()));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}
