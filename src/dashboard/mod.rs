//! `GET /dashboard`: the operators' page (SPEC §9), its login, and
//! `GET /admin/requests` (the recent requests it lists, [`recent`]).
//!
//! The page is one HTML shell, one stylesheet and one script, all compiled into the
//! binary (`src/dashboard/assets/`) and served from here: nothing is fetched from
//! elsewhere. Its data comes from the admin JSON routes (`/admin/usage`,
//! `/admin/endpoints`, `/admin/keys`, `/admin/requests`), which accept the admin
//! token from the [`COOKIE`] this module sets as well as from `Authorization:
//! Bearer`. Without a valid cookie, `GET /dashboard` is a login form; `POST
//! /dashboard/login` checks the token (the admin check of [`crate::accounts`]),
//! sets the cookie (`HttpOnly; SameSite=Strict; Path=/`) and sends the browser
//! back to `/dashboard`; `POST /dashboard/logout` clears it. The cookie has no
//! `Secure` flag: the gateway does not know whether the browser reached it over
//! TLS; behind a TLS proxy, add it there (docs/operations.md).
//!
//! Every page carries a Content-Security-Policy without inline script or style, so
//! data can never run as code; the script builds its DOM with `textContent`.
//!
//! # Example
//! ```
//! use switchboard::{config::Config, gateway::Gateway};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut config = Config::demo();
//! config.store.url = "sqlite::memory:".into();
//! config.admin.token_env = "DASHBOARD_DOCTEST_TOKEN".into();
//! std::env::set_var("DASHBOARD_DOCTEST_TOKEN", "admin-secret");
//! let gateway = Gateway::builder().config(config).build().unwrap();
//! // Without the cookie: the login form, under a strict CSP.
//! let req = http::Request::get("/dashboard").body(axum::body::Body::empty()).unwrap();
//! let res = gateway.router().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert!(res.headers()["content-security-policy"].to_str().unwrap().contains("default-src 'self'"));
//! let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
//! assert!(std::str::from_utf8(&body).unwrap().contains("name=\"token\""));
//! # }
//! ```

pub mod recent;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde::Deserialize;

use crate::accounts::{admin_check, AccountState};
use crate::error::{Body, GatewayError};
pub use recent::{RecentRequest, RecentSource};

/// The name of the cookie that holds the admin token.
pub const COOKIE: &str = "switchboard_admin";

/// The largest login form body.
const MAX_LOGIN_BODY: usize = 8 * 1024;

/// The Content-Security-Policy of every dashboard page: only the gateway's own
/// script, style and connections; no inline code, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const SHELL: &str = include_str!("assets/dashboard.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// What the dashboard's routes share.
#[derive(Clone, Debug)]
pub struct DashboardState {
    /// The admin token's hash and the stores (the admin check).
    pub accounts: AccountState,
    /// Where the recent requests are read.
    pub recent: Arc<RecentSource>,
}

/// `/dashboard`, `/dashboard/login`, `/dashboard/logout`, `/dashboard/app.js`,
/// `/dashboard/app.css` and `/admin/requests`.
pub fn routes(state: DashboardState) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .route(
            "/dashboard/app.js",
            get(|| async { asset(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { asset(APP_CSS, "text/css; charset=utf-8") }),
        )
        .route("/admin/requests", get(requests))
        .with_state(state)
}

/// The admin token of a request's [`COOKIE`], if it has one (percent-decoded).
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| percent_decode(value.trim().trim_matches('"'), false))
}

/// Marks an admin JSON answer as not to be stored or sniffed (axum `map_response`).
pub async fn no_store(mut res: axum::response::Response) -> axum::response::Response {
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

fn secured(mut res: Response<Body>) -> Response<Body> {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut res = Response::new(Body::from(text));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secured(res)
}

fn html(status: StatusCode, text: String) -> Response<Body> {
    let mut res = Response::new(Body::from(text));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secured(res)
}

/// The login form with a message (static text of ours, never request data).
fn login_form(status: StatusCode, message: &str) -> Response<Body> {
    let text = LOGIN.replace("<!--message-->", message);
    html(status, text)
}

async fn page(State(state): State<DashboardState>, headers: HeaderMap) -> Response<Body> {
    match admin_check(&state.accounts, &headers) {
        Ok(()) => html(StatusCode::OK, SHELL.to_owned()),
        Err(GatewayError::NotFound(_)) => login_form(
            StatusCode::NOT_FOUND,
            "<p class=\"error\">The admin API is off: set the variable <code>[admin].token_env</code> names and restart.</p>",
        ),
        Err(_) => login_form(StatusCode::OK, ""),
    }
}

async fn login(State(state): State<DashboardState>, body: axum::body::Body) -> Response<Body> {
    let bytes = match tokio::time::timeout(
        state.accounts.body_timeout,
        axum::body::to_bytes(body, MAX_LOGIN_BODY),
    )
    .await
    {
        Ok(Ok(b)) => b,
        _ => {
            return login_form(
                StatusCode::BAD_REQUEST,
                "<p class=\"error\">The form could not be read.</p>",
            )
        }
    };
    let token = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|form| {
            form.split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == "token")
                .and_then(|(_, v)| percent_decode(v, true))
        })
        .unwrap_or_default();
    let mut as_bearer = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        as_bearer.insert(header::AUTHORIZATION, v);
    }
    match admin_check(&state.accounts, &as_bearer) {
        Ok(()) => {
            let cookie = format!(
                "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                percent_encode(&token)
            );
            redirect(Some(cookie))
        }
        Err(GatewayError::NotFound(_)) => login_form(
            StatusCode::NOT_FOUND,
            "<p class=\"error\">The admin API is off.</p>",
        ),
        Err(_) => login_form(
            StatusCode::UNAUTHORIZED,
            "<p class=\"error\">That is not the admin token.</p>",
        ),
    }
}

async fn logout() -> Response<Body> {
    redirect(Some(format!(
        "{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
    )))
}

/// `303 See Other` to `/dashboard`, setting `cookie`.
fn redirect(cookie: Option<String>) -> Response<Body> {
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SEE_OTHER;
    res.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        res.headers_mut().insert(header::SET_COOKIE, c);
    }
    secured(res)
}

#[derive(Debug, Deserialize)]
struct RequestsQuery {
    limit: Option<String>,
}

async fn requests(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<RequestsQuery>,
) -> Response<Body> {
    if let Err(e) = admin_check(&state.accounts, &headers) {
        return e.into_response();
    }
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => recent::DEFAULT_LIMIT,
        Some(Ok(n)) if (1..=recent::MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return GatewayError::InvalidRequest(format!(
                "`limit` is a whole number from 1 to {}",
                recent::MAX_LIMIT
            ))
            .into_response()
        }
    };
    let source = state.recent.clone();
    let r = tokio::task::spawn_blocking(move || source.recent(limit))
        .await
        .unwrap_or_else(|e| Err(GatewayError::Internal(format!("log task failed: {e}"))));
    match r {
        Ok(rows) => {
            #[derive(serde::Serialize)]
            struct Data {
                data: Vec<RecentRequest>,
            }
            let body = serde_json::to_vec(&Data { data: rows }).unwrap_or_default();
            let mut res = Response::new(Body::from(body));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            res
        }
        Err(e) => e.into_response(),
    }
}

/// Whether `b` may stand in a cookie value as itself (RFC 6265 `cookie-octet`,
/// minus `%`, our escape).
fn cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if cookie_octet(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decoding (`+` as a space in a form); `None` when it is not UTF-8.
fn percent_decode(s: &str, form: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(bytes[i + 1]) * 16 + hex(bytes[i + 2]));
                i += 3;
                continue;
            }
            b'+' if form => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_values_round_trip_through_the_escape() {
        for token in ["plain-token_123", "with space;semi,comma\"quote%25 ü", ""] {
            let enc = percent_encode(token);
            assert!(enc.bytes().all(|b| cookie_octet(b) || b == b'%'), "{enc}");
            let mut h = HeaderMap::new();
            h.insert(
                header::COOKIE,
                HeaderValue::from_str(&format!("other=1; {COOKIE}={enc}; x=2")).unwrap(),
            );
            assert_eq!(cookie_token(&h).as_deref(), Some(token));
        }
        assert_eq!(percent_decode("a+b%2Bc", true).as_deref(), Some("a b+c"));
        assert_eq!(percent_decode("a%", false).as_deref(), Some("a%"));
    }
}
