//! The key's own routes (`GET /v1/key`, `/v1/credits`, `/v1/generation?id=`), the
//! admin API (`/admin/keys`, `/admin/keys/{id}`) and `/readyz` (SPEC §3).
//!
//! Client routes sit behind [`AuthLayer`]; what they show comes from the ledger (a
//! generation only to the key that made it: anyone else gets 404). The admin API
//! wants `Authorization: Bearer <token>` where the token is the value of the
//! environment variable `[admin].token_env` names, read when the gateway is built
//! and compared in constant time. Without that variable set, every `/admin/*` path
//! answers 404 (the API does not exist); with a wrong or missing token, 401.
//!
//! # Example
//! ```
//! use switchboard::{config::Config, gateway::Gateway};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut config = Config::demo();
//! config.store.url = "sqlite::memory:".into();
//! let gateway = Gateway::builder().config(config).build().unwrap();
//! let req = http::Request::get("/v1/credits")
//!     .header("authorization", "Bearer sk-demo")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! let res = gateway.router().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
//! assert_eq!(&body[..], br#"{"data":{"total_credits":1,"total_usage":0}}"#);
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::auth::AuthLayer;
use crate::error::{Body, GatewayError};
use crate::keys::{check_labels, KeyRecord, Labels, LimitReset};
use crate::money::{Money, MAX_CREDITS, MAX_RPM, MAX_TOKENS_PER_DAY};
use crate::store::{
    credits_after_top_up, hash_secret, new_secret, now_unix, KeyPatch, KeyStore, KeyView, Ledger,
    NewKey, SecretHash, StoredKey,
};

/// `GET /v1/key`'s `data`.
#[derive(Debug, Serialize)]
struct KeyInfo {
    name: String,
    usage: Money,
    limit: Option<Money>,
    /// What `limit` leaves: of the current period with `limit_reset`.
    limit_remaining: Option<Money>,
    credits_remaining: Money,
    rate_limit: Option<RateLimitInfo>,
    limit_reset: Option<LimitReset>,
    usage_daily: Money,
    usage_weekly: Money,
    usage_monthly: Money,
    expires_at: Option<String>,
}

/// `{"requests": rpm, "interval": "1m"}`.
#[derive(Debug, Serialize)]
struct RateLimitInfo {
    requests: u32,
    interval: &'static str,
}

/// `GET /v1/credits`'s `data`.
#[derive(Debug, Serialize)]
struct Credits {
    total_credits: Money,
    total_usage: Money,
}

/// What the account and admin handlers share.
#[derive(Clone)]
pub struct AccountState {
    /// Key records.
    pub keys: Arc<dyn KeyStore>,
    /// Balances and generations.
    pub ledger: Arc<dyn Ledger>,
    /// The auth cache, emptied after admin changes so they count at once here.
    pub auth: AuthLayer,
    /// SHA-256 of the admin token; `None` turns `/admin/*` off.
    pub admin_token: Option<SecretHash>,
    /// The environment variable that holds the admin token (`[admin].token_env`),
    /// named by the answer of an admin route while the API is off.
    pub admin_token_env: String,
    /// How long an admin request body may take to arrive
    /// (`[server].request_timeout_secs`).
    pub body_timeout: std::time::Duration,
}

impl std::fmt::Debug for AccountState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountState")
            .field("admin", &self.admin_token.is_some())
            .finish_non_exhaustive()
    }
}

/// `{"data": …}`, serialised straight from typed values: amounts are written from
/// their exact decimal digits (a `serde_json::Value` would round them through f64).
#[derive(Debug, Serialize)]
struct Data<T> {
    data: T,
}

fn json_response<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Runs blocking store work off the async threads.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, GatewayError> + Send + 'static,
) -> Result<R, GatewayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| GatewayError::Internal(format!("store task failed: {e}")))?
}

fn reply<T: Serialize>(r: Result<T, GatewayError>, status: StatusCode) -> Response<Body> {
    match r {
        Ok(v) => json_response(status, &Data { data: v }),
        Err(e) => e.into_response(),
    }
}

/// `/key`, `/credits`, `/generation` (to nest under `/v1` and `/api/v1`).
pub fn client_routes(state: AccountState) -> Router {
    let auth = state.auth.clone();
    Router::new()
        .route("/key", get(get_key))
        .route("/credits", get(get_credits))
        .route("/generation", get(get_generation))
        .route_layer(auth)
        .with_state(state)
}

/// `/admin/keys` and `/admin/keys/{id}`.
pub fn admin_routes(state: AccountState) -> Router {
    Router::new()
        .route("/admin/keys", get(admin_list).post(admin_create))
        .route(
            "/admin/keys/{id}",
            get(admin_show).patch(admin_patch).delete(admin_delete),
        )
        .route("/admin/keys/{id}/rotate", axum::routing::post(admin_rotate))
        .with_state(state)
}

/// `GET /readyz`: 200 when the store answers, else 503.
pub async fn readyz(State(state): State<AccountState>) -> Response<Body> {
    let keys = state.keys.clone();
    match blocking(move || keys.ping().map_err(GatewayError::from)).await {
        Ok(()) => Response::new(Body::from("ready")),
        Err(e) => {
            let mut res = Response::new(Body::from(format!("not ready: {e}")));
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            res
        }
    }
}

async fn get_key(
    State(state): State<AccountState>,
    Extension(key): Extension<Arc<KeyRecord>>,
) -> Response<Body> {
    let ledger = state.ledger.clone();
    let id = key.id.clone();
    let r = blocking(move || Ok((ledger.balance(&id)?, ledger.usage(&id)?)))
        .await
        .map(|(b, periods)| {
            let held_against = key.limit_reset.map_or(b.spent, |r| periods.of(r));
            KeyInfo {
                name: key.name.clone(),
                usage: b.spent,
                limit: key.limit,
                limit_remaining: key.limit.map(|l| (l - held_against).max(Money::ZERO)),
                credits_remaining: b.credits - b.spent,
                rate_limit: key.rpm.map(|requests| RateLimitInfo {
                    requests,
                    interval: "1m",
                }),
                limit_reset: key.limit_reset,
                usage_daily: periods.daily,
                usage_weekly: periods.weekly,
                usage_monthly: periods.monthly,
                expires_at: key.expires_at.map(crate::clock::format_rfc3339),
            }
        });
    reply(r, StatusCode::OK)
}

async fn get_credits(
    State(state): State<AccountState>,
    Extension(key): Extension<Arc<KeyRecord>>,
) -> Response<Body> {
    let ledger = state.ledger.clone();
    let r = blocking(move || Ok(ledger.balance(&key.id)?))
        .await
        .map(|b| Credits {
            total_credits: b.credits,
            total_usage: b.spent,
        });
    reply(r, StatusCode::OK)
}

async fn get_generation(
    State(state): State<AccountState>,
    Extension(key): Extension<Arc<KeyRecord>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response<Body> {
    let Some(id) = q.get("id").filter(|s| !s.is_empty()).cloned() else {
        return GatewayError::InvalidRequest("`id` is required: GET /v1/generation?id=ID".into())
            .into_response();
    };
    let ledger = state.ledger.clone();
    let r = blocking(move || {
        match ledger.generation(&id)? {
            // Someone else's generation is as unknown as a missing one.
            Some(g) if g.key_id == key.id => Ok(g),
            _ => Err(GatewayError::NotFound(format!("no generation `{id}`"))),
        }
    })
    .await;
    reply(r, StatusCode::OK)
}

/// Checks the admin token of a request to any admin route (`/admin/keys`,
/// `/admin/usage`, `/admin/endpoints`, …): 404 when the admin API is off, 401 when
/// the token is missing or wrong. The one check every admin route calls: a new way
/// to present the token is added here, for all of them.
///
/// The token comes from `Authorization: Bearer`, else from the dashboard's cookie
/// ([`crate::dashboard::COOKIE`]); either way only the exact token passes.
pub fn admin_check(state: &AccountState, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(expected) = &state.admin_token else {
        return Err(GatewayError::NotFound(format!(
            "the admin API is off: set {} (see [admin].token_env) and restart",
            state.admin_token_env
        )));
    };
    let cookie;
    let given = match headers.get(header::AUTHORIZATION) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| {
                let v = v.trim();
                (v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ")).then(|| v[7..].trim())
            })
            .unwrap_or(""),
        None => {
            cookie = crate::dashboard::cookie_token(headers).unwrap_or_default();
            cookie.as_str()
        }
    };
    // Hashing first makes the comparison constant-time in the token's length too.
    if bool::from(hash_secret(given).ct_eq(expected)) && !given.is_empty() {
        Ok(())
    } else {
        Err(GatewayError::InvalidApiKey(
            "admin routes want `Authorization: Bearer <admin token>` (or the dashboard's login cookie)".into(),
        ))
    }
}

/// The largest admin request body; larger ones get 413.
pub const MAX_ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Reads an admin request body (after the token was checked): at most
/// [`MAX_ADMIN_BODY_BYTES`] (413), within the request deadline (408).
async fn read_admin_body(
    state: &AccountState,
    body: axum::body::Body,
) -> Result<Bytes, GatewayError> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, MAX_ADMIN_BODY_BYTES).collect();
    match tokio::time::timeout(state.body_timeout, limited).await {
        Err(_) => Err(crate::normalize::body_timed_out()),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge(format!(
                "an admin request body is at most {MAX_ADMIN_BODY_BYTES} bytes"
            )))
        }
        Ok(Err(e)) => Err(GatewayError::InvalidRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, GatewayError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        GatewayError::InvalidRequest(format!("invalid `{path}`: {}", e.into_inner()))
    })
}

/// Deserialises a present field (even `null`) as `Some(..)`, so `null` can clear it.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /admin/keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    credits_usd: Money,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    limit_usd: Option<Money>,
    #[serde(default)]
    rpm: Option<u32>,
    #[serde(default)]
    tokens_per_day: Option<u64>,
    #[serde(default)]
    models: Option<Vec<String>>,
    /// `"daily"`, `"weekly"` or `"monthly"`.
    #[serde(default)]
    limit_reset: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    expires_at: Option<String>,
    /// Free-form tags.
    #[serde(default)]
    labels: Labels,
}

/// `PATCH /admin/keys/{id}` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    limit_usd: Option<Option<Money>>,
    #[serde(default, deserialize_with = "present")]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "present")]
    tokens_per_day: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    models: Option<Option<Vec<String>>>,
    /// `"daily"`, `"weekly"`, `"monthly"`, or `null` for the key's lifetime.
    #[serde(default, deserialize_with = "present")]
    limit_reset: Option<Option<String>>,
    /// RFC 3339, or `null` for never.
    #[serde(default, deserialize_with = "present")]
    expires_at: Option<Option<String>>,
    /// Credits to add (a top-up), USD.
    #[serde(default)]
    top_up_usd: Option<Money>,
    /// The key's labels, all of them (replaces those it has).
    #[serde(default)]
    labels: Option<Labels>,
}

/// `POST /admin/keys/{id}/rotate` body (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the old secret keeps working, seconds (0: it stops at once).
    #[serde(default)]
    grace_secs: u64,
}

/// The longest grace period of a rotation: 30 days.
pub const MAX_GRACE_SECS: u64 = 30 * 86_400;

/// Gives key `id` a new secret (same id, balance, limits and usage) and returns it
/// with the key; the old secret keeps working for `grace_secs` after `now` (Unix
/// seconds), 0: it stops at once. `Ok(None)` when there is no such key; a deleted
/// key or a grace past [`MAX_GRACE_SECS`] is refused (400, saying why). The CLI and
/// the admin API both rotate through this.
pub fn rotate_key(
    keys: &dyn KeyStore,
    id: &str,
    grace_secs: u64,
    now: u64,
) -> Result<Option<(StoredKey, String)>, GatewayError> {
    if grace_secs > MAX_GRACE_SECS {
        return Err(GatewayError::InvalidRequest(format!(
            "grace_secs must be at most {MAX_GRACE_SECS} (30 days; got {grace_secs})"
        )));
    }
    match keys.get(id)? {
        None => return Ok(None),
        Some(k) if k.record.deleted() => return Err(deleted_key(id)),
        Some(_) => {}
    }
    let secret = new_secret();
    let grace_until = (grace_secs > 0).then(|| now.saturating_add(grace_secs));
    Ok(keys
        .rotate(id, hash_secret(&secret), grace_until)?
        .map(|k| (k, secret)))
}

/// The 400 of a change to a deleted key.
fn deleted_key(id: &str) -> GatewayError {
    GatewayError::InvalidRequest(format!(
        "key `{id}` is deleted: it cannot be changed or rotated (create a new key)"
    ))
}

/// `limit_reset` and `expires_at` as given to the admin API or the CLI, parsed
/// (`expires_at` to Unix seconds); `Err` says what is wrong with which.
pub fn parse_period_and_expiry(
    limit_reset: Option<&str>,
    expires_at: Option<&str>,
) -> Result<(Option<LimitReset>, Option<u64>), String> {
    let reset = limit_reset
        .map(str::parse::<LimitReset>)
        .transpose()
        .map_err(|e| format!("limit_reset: {e}"))?;
    let expires = expires_at
        .map(crate::clock::parse_rfc3339)
        .transpose()
        .map_err(|e| format!("expires_at: {e}"))?;
    Ok((reset, expires))
}

/// The checks shared by the CLI and the admin API; `Err` says what is wrong.
pub fn validate_new_key(new: &NewKey) -> Result<(), String> {
    if !new.credits.within(MAX_CREDITS) {
        return Err(format!(
            "credits must be from 0 to {MAX_CREDITS} USD (got {})",
            new.credits
        ));
    }
    validate_limits(new.limit, new.rpm, new.tokens_per_day)?;
    check_labels(&new.labels)?;
    if new
        .models
        .as_ref()
        .is_some_and(|m| m.iter().any(|p| p.trim().is_empty()))
    {
        return Err("models patterns must not be empty".into());
    }
    Ok(())
}

/// The bounds of a key's `limit_usd`, `rpm` and `tokens_per_day` (see
/// [`money`](crate::money)'s constants); `Err` says which is out of range.
pub fn validate_limits(
    limit: Option<Money>,
    rpm: Option<u32>,
    tokens_per_day: Option<u64>,
) -> Result<(), String> {
    if let Some(l) = limit.filter(|l| !l.within(MAX_CREDITS)) {
        return Err(format!(
            "limit_usd must be from 0 to {MAX_CREDITS} USD (got {l})"
        ));
    }
    if let Some(r) = rpm.filter(|r| *r == 0 || *r > MAX_RPM) {
        return Err(format!(
            "rpm must be from 1 to {MAX_RPM} (got {r}; leave it out for no limit)"
        ));
    }
    if let Some(t) = tokens_per_day.filter(|t| *t > MAX_TOKENS_PER_DAY) {
        return Err(format!(
            "tokens_per_day must be at most {MAX_TOKENS_PER_DAY} (got {t}; leave it out for no limit)"
        ));
    }
    Ok(())
}

// The admin handlers take the body unread (`axum::body::Body`, not `Bytes`, which
// axum would read before the handler runs): the token is checked first, so a client
// without it never gets a byte of its body read.
async fn admin_create(
    State(state): State<AccountState>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    let body = match read_admin_body(&state, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let b: CreateBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let (limit_reset, expires_at) =
        match parse_period_and_expiry(b.limit_reset.as_deref(), b.expires_at.as_deref()) {
            Ok(v) => v,
            Err(m) => return GatewayError::InvalidRequest(m).into_response(),
        };
    let new = NewKey {
        name: b.name.unwrap_or_else(|| "key".into()),
        credits: b.credits_usd,
        limit: b.limit_usd,
        rpm: b.rpm,
        tokens_per_day: b.tokens_per_day,
        models: b.models,
        limit_reset,
        expires_at,
        labels: b.labels,
    };
    if let Err(m) = validate_new_key(&new) {
        return GatewayError::InvalidRequest(m).into_response();
    }
    let keys = state.keys.clone();
    let r = blocking(move || {
        let secret = new_secret();
        let key = keys.create(hash_secret(&secret), new)?;
        Ok(KeyView {
            secret: Some(secret),
            ..key.view()
        })
    })
    .await;
    reply(r, StatusCode::CREATED)
}

async fn admin_list(
    State(state): State<AccountState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    // Deleted keys only with `?all=true`.
    let all = q.get("all").is_some_and(|v| v == "true" || v == "1");
    let (keys, ledger) = (state.keys.clone(), state.ledger.clone());
    let r = blocking(move || {
        keys.list()?
            .iter()
            .filter(|k| all || !k.record.deleted())
            .map(|k| Ok(k.view_with(ledger.usage(&k.record.id)?)))
            .collect::<Result<Vec<_>, GatewayError>>()
    })
    .await;
    reply(r, StatusCode::OK)
}

fn no_key(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("no key `{id}`"))
}

async fn admin_show(
    State(state): State<AccountState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    let (keys, ledger) = (state.keys.clone(), state.ledger.clone());
    let r = blocking(move || match keys.get(&id)? {
        Some(k) => Ok(k.view_with(ledger.usage(&id)?)),
        None => Err(no_key(&id)),
    })
    .await;
    reply(r, StatusCode::OK)
}

async fn admin_patch(
    State(state): State<AccountState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    let body = match read_admin_body(&state, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let b: PatchBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if b.rpm == Some(Some(0)) {
        return GatewayError::InvalidRequest("rpm must be at least 1 (null for no limit)".into())
            .into_response();
    }
    if let Err(m) = validate_limits(
        b.limit_usd.flatten(),
        b.rpm.flatten(),
        b.tokens_per_day.flatten(),
    ) {
        return GatewayError::InvalidRequest(m).into_response();
    }
    if let Some(Err(m)) = b.labels.as_ref().map(check_labels) {
        return GatewayError::InvalidRequest(format!("labels: {m}")).into_response();
    }
    if let Some(Err(m)) = b.top_up_usd.map(|t| credits_after_top_up(Money::ZERO, t)) {
        return GatewayError::InvalidRequest(format!("top_up_usd: {m}")).into_response();
    }
    let (limit_reset, expires_at) = match parse_period_and_expiry(
        b.limit_reset.as_ref().and_then(|r| r.as_deref()),
        b.expires_at.as_ref().and_then(|e| e.as_deref()),
    ) {
        Ok(v) => v,
        Err(m) => return GatewayError::InvalidRequest(m).into_response(),
    };
    let patch = KeyPatch {
        name: b.name,
        disabled: b.disabled,
        limit: b.limit_usd,
        rpm: b.rpm,
        tokens_per_day: b.tokens_per_day,
        models: b.models,
        limit_reset: b.limit_reset.map(|given| given.and(limit_reset)),
        expires_at: b.expires_at.map(|given| given.and(expires_at)),
        labels: b.labels,
        delete_at: None,
    };
    let (keys, ledger) = (state.keys.clone(), state.ledger.clone());
    let r = blocking(move || {
        // Every check before any write: the top-up's bound first (the ledger checks it
        // again in the transaction that writes it), then the top-up, then the record.
        let Some(key) = keys.get(&id)? else {
            return Err(no_key(&id));
        };
        if key.record.deleted() {
            return Err(deleted_key(&id));
        }
        if let Some(amount) = b.top_up_usd {
            credits_after_top_up(key.credits, amount)
                .map_err(|m| GatewayError::InvalidRequest(format!("top_up_usd: {m}")))?;
            if ledger.top_up(&id, amount)?.is_none() {
                return Err(no_key(&id));
            }
        }
        if keys.update(&id, &patch)?.is_none() {
            return Err(no_key(&id));
        }
        match keys.get(&id)? {
            Some(k) => Ok(k.view_with(ledger.usage(&id)?)),
            None => Err(no_key(&id)),
        }
    })
    .await;
    // The change counts at once in this process.
    state.auth.invalidate_all();
    reply(r, StatusCode::OK)
}

/// `DELETE /admin/keys/{id}`: the key stops working at once (401 "key deleted");
/// its row, ledger rows and balance stay for the books, and `GET` still shows it.
async fn admin_delete(
    State(state): State<AccountState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    let (keys, ledger) = (state.keys.clone(), state.ledger.clone());
    let patch = KeyPatch {
        delete_at: Some(now_unix()),
        ..KeyPatch::default()
    };
    let r = blocking(move || match keys.update(&id, &patch)? {
        Some(k) => Ok(k.view_with(ledger.usage(&id)?)),
        None => Err(no_key(&id)),
    })
    .await;
    state.auth.invalidate_all();
    reply(r, StatusCode::OK)
}

/// `POST /admin/keys/{id}/rotate` (body optional: `{"grace_secs": N}`): a new
/// secret, shown once in the answer, for the same key ([`rotate_key`]).
async fn admin_rotate(
    State(state): State<AccountState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Response<Body> {
    if let Err(e) = admin_check(&state, &headers) {
        return e.into_response();
    }
    let body = match read_admin_body(&state, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let b: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        match parse(&body) {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        }
    };
    let (keys, ledger) = (state.keys.clone(), state.ledger.clone());
    let r = blocking(
        move || match rotate_key(&*keys, &id, b.grace_secs, now_unix())? {
            Some((k, secret)) => Ok(KeyView {
                secret: Some(secret),
                ..k.view_with(ledger.usage(&id)?)
            }),
            None => Err(no_key(&id)),
        },
    )
    .await;
    // The old secret's cached record goes now (its grace, if any, is in the record
    // found next).
    state.auth.invalidate_all();
    reply(r, StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::config::Config;
    use crate::gateway::Gateway;

    /// A gateway with the admin API on (token `admin-token-accounts-tests`) and a
    /// request deadline of 30 s.
    fn gateway() -> Gateway {
        std::env::set_var("SB_ACCOUNTS_TESTS_ADMIN", "admin-token-accounts-tests");
        let mut config = Config::demo();
        config.store.url = "sqlite::memory:".into();
        config.logging.sink = "none".into();
        config.admin.token_env = "SB_ACCOUNTS_TESTS_ADMIN".into();
        config.server.request_timeout_secs = 30;
        Gateway::builder().config(config).build().unwrap()
    }

    /// A body that sends `head` and then nothing more, ever.
    fn stalled(head: &'static [u8]) -> axum::body::Body {
        let s = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(head))])
            .chain(futures_util::stream::pending());
        axum::body::Body::from_stream(s)
    }

    async fn call(
        gw: &Gateway,
        method: &str,
        token: Option<&str>,
        body: axum::body::Body,
    ) -> (u16, serde_json::Value) {
        let mut req = http::Request::builder()
            .method(method)
            .uri(if method == "POST" {
                "/admin/keys"
            } else {
                "/admin/keys/key_x"
            })
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let res = tokio::time::timeout(
            Duration::from_secs(3600),
            gw.router().oneshot(req.body(body).unwrap()),
        )
        .await
        .expect("the admin API answers")
        .unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn the_admin_token_is_checked_before_the_body_is_read() {
        let gw = gateway();
        for method in ["POST", "PATCH"] {
            for token in [None, Some("wrong")] {
                let started = tokio::time::Instant::now();
                let (status, v) = call(&gw, method, token, stalled(b"{\"credits_usd\":")).await;
                assert_eq!(
                    (status, v["error"]["code"].as_str()),
                    (401, Some("invalid_api_key")),
                    "{method} {token:?}"
                );
                assert_eq!(
                    started.elapsed(),
                    Duration::ZERO,
                    "{method}: answered without waiting for the body"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admin_bodies_are_bounded_in_size_and_time_with_json_errors() {
        let gw = gateway();
        let token = Some("admin-token-accounts-tests");
        for method in ["POST", "PATCH"] {
            let big = axum::body::Body::from(vec![b' '; super::MAX_ADMIN_BODY_BYTES + 1]);
            let (status, v) = call(&gw, method, token, big).await;
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (413, Some("payload_too_large")),
                "{method} {v}"
            );

            let started = tokio::time::Instant::now();
            let (status, v) = call(&gw, method, token, stalled(b"{\"credits_usd\":")).await;
            assert_eq!(
                (status, v["error"]["code"].as_str()),
                (408, Some("request_timeout")),
                "{method} {v}"
            );
            assert_eq!(started.elapsed(), Duration::from_secs(30), "{method}");
        }
        // A good body still works.
        let (status, v) = call(
            &gw,
            "POST",
            token,
            axum::body::Body::from(r#"{"credits_usd":1}"#),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
}
