//! `RouteLayer`: turns the requested model(s) into the plan of endpoints to try.
//!
//! Resolves `model` (a `:floor` / `:nitro` suffix is accepted), then the `models`
//! fallback list, checks the key's allow-list (403) and answers 404
//! `model_not_found` for unknown ids. The plan is every endpoint of each model, in
//! order; health filtering and ordering happen in the next layers.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use switchboard::{catalog::Catalog, config::Config, route::RouteLayer};
//! use switchboard::context::{CallContext, ChatCall};
//! use switchboard::chat::{ChatRequest, Message, Role};
//! use switchboard::error::GatewayError;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let catalog = Arc::new(Catalog::from_config(&Config::demo()));
//! let svc = ServiceBuilder::new()
//!     .layer(RouteLayer::new(catalog))
//!     .service(service_fn(|call: ChatCall| async move {
//!         // The inner service sees the plan.
//!         Err::<switchboard::context::ChatReply, _>(GatewayError::Internal(call.plan[0].label()))
//!     }));
//! let req = ChatRequest {
//!     model: "mock/echo".into(),
//!     messages: vec![Message::text(Role::User, "hi")],
//!     ..Default::default()
//! };
//! let err = svc.oneshot(ChatCall::new(req, CallContext::new())).await.unwrap_err();
//! assert_eq!(err.to_string(), "mock/echo@mock");
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use tower::{Layer, Service};

use crate::catalog::{Catalog, Endpoint};
use crate::context::{ChatCall, ChatReply};
use crate::error::GatewayError;

/// Model variants a request may name with a suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `:floor`: cheapest endpoint first.
    Floor,
    /// `:nitro`: highest observed throughput first.
    Nitro,
}

/// Splits `id:variant` into the model id and its variant.
pub fn split_variant(model: &str) -> Result<(&str, Option<Variant>), GatewayError> {
    match model.rsplit_once(':') {
        None => Ok((model, None)),
        Some((id, "floor")) => Ok((id, Some(Variant::Floor))),
        Some((id, "nitro")) => Ok((id, Some(Variant::Nitro))),
        Some((_, other)) => Err(GatewayError::InvalidRequest(format!(
            "unknown model variant `:{other}` in `{model}` (use :floor or :nitro)"
        ))),
    }
}

/// Builds [`Route`] services.
#[derive(Debug, Clone)]
pub struct RouteLayer {
    catalog: Arc<Catalog>,
}

impl RouteLayer {
    /// Routes against `catalog`.
    pub fn new(catalog: Arc<Catalog>) -> Self {
        RouteLayer { catalog }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;
    fn layer(&self, inner: S) -> Route<S> {
        Route::new(inner, self.catalog.clone())
    }
}

/// Fills [`ChatCall::plan`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Route<S> {
    inner: S,
    catalog: Arc<Catalog>,
}

impl<S> Route<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, catalog: Arc<Catalog>) -> Self {
        Route { inner, catalog }
    }

    /// A [`RouteLayer`].
    pub fn layer(catalog: Arc<Catalog>) -> RouteLayer {
        RouteLayer::new(catalog)
    }
}

/// Resolves a call's models into its plan.
pub fn plan(catalog: &Catalog, call: &ChatCall) -> Result<Vec<Arc<Endpoint>>, GatewayError> {
    let req = &call.request;
    let key = call.ctx.key();
    let mut plan: Vec<Arc<Endpoint>> = Vec::new();
    let names =
        std::iter::once(req.model.as_str()).chain(req.models.iter().flatten().map(String::as_str));
    for (i, name) in names.enumerate() {
        let (id, _variant) = split_variant(name)?;
        let model = catalog.model(id).ok_or_else(|| {
            GatewayError::ModelNotFound(format!(
                "no model `{id}`; GET /v1/models lists the models of this gateway"
            ))
        })?;
        if let Some(key) = key {
            if !key.allows_model(id) {
                if i == 0 {
                    return Err(GatewayError::Forbidden(format!(
                        "key `{}` may not use model `{id}`",
                        key.name
                    )));
                }
                continue;
            }
        }
        for e in &model.endpoints {
            if !plan.iter().any(|p| Arc::ptr_eq(p, e)) {
                plan.push(e.clone());
            }
        }
    }
    Ok(plan)
}

impl<S> Service<ChatCall> for Route<S>
where
    S: Service<ChatCall, Response = ChatReply, Error = GatewayError>,
{
    type Response = ChatReply;
    type Error = GatewayError;
    type Future = Either<Ready<Result<ChatReply, GatewayError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: ChatCall) -> Self::Future {
        call.ctx
            .update(|s| s.requested_model.clone_from(&call.request.model));
        match plan(&self.catalog, &call) {
            Ok(p) => {
                call.plan = p;
                Either::Right(self.inner.call(call))
            }
            Err(e) => Either::Left(future::ready(Err(e))),
        }
    }
}
