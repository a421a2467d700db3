//! The operators' read-only JSON APIs of SPEC §9: `GET /admin/usage` (usage
//! aggregated from the request log, [`usage`]) and `GET /admin/endpoints` (every
//! endpoint's health now, [`endpoints`]).
//!
//! Both want the admin token, checked by the one
//! [`admin_check`](crate::accounts::admin_check) every admin route uses (404 while
//! the admin API is off, 401 without the token).
//!
//! # Example
//! ```
//! use switchboard::{config::Config, gateway::Gateway};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! std::env::set_var("SB_ADMIN_DOC_TOKEN", "doc-admin-token");
//! let mut config = Config::demo();
//! config.store.url = "sqlite::memory:".into();
//! config.logging.sink = "none".into();
//! config.admin.token_env = "SB_ADMIN_DOC_TOKEN".into();
//! let gateway = Gateway::builder().config(config).build().unwrap();
//! let req = http::Request::get("/admin/endpoints")
//!     .header("authorization", "Bearer doc-admin-token")
//!     .body(axum::body::Body::empty())
//!     .unwrap();
//! let res = gateway.router().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let body = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
//! let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(v["data"][0]["state"], "healthy");
//! # }
//! ```

pub mod endpoints;
pub mod usage;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::accounts::AccountState;
use crate::catalog::Catalog;
use crate::error::Body;
use crate::health::HealthRegistry;
use crate::logging::UsageSource;

/// What the `/admin/usage` and `/admin/endpoints` handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The admin token (through [`admin_check`](crate::accounts::admin_check)).
    pub accounts: AccountState,
    /// The request log's query side (`None`: the sink cannot answer).
    pub usage: Option<Arc<dyn UsageSource>>,
    /// `[logging].sink`, named when it cannot answer.
    pub log_sink: String,
    /// Every endpoint.
    pub catalog: Arc<Catalog>,
    /// Their health.
    pub health: Arc<dyn HealthRegistry>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("usage", &self.usage.is_some())
            .field("log_sink", &self.log_sink)
            .finish_non_exhaustive()
    }
}

/// `GET /admin/usage` and `GET /admin/endpoints`.
pub fn routes(state: AdminState) -> Router {
    Router::new()
        .route("/admin/usage", get(usage::get_usage))
        .route("/admin/endpoints", get(endpoints::get_endpoints))
        .with_state(state)
}

/// `{"data": …}`, serialised from typed values (amounts from their exact digits).
#[derive(Debug, Serialize)]
struct Data<T> {
    data: T,
}

fn json_ok<T: Serialize>(data: T) -> Response<Body> {
    let body = serde_json::to_vec(&Data { data }).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}
