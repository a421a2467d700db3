//! `RouteLayer`: turns the requested model(s) into the plan of endpoints to try.
//!
//! Resolves `model` (a `:floor`, `:nitro` or `:thinking` suffix is accepted; `:thinking`
//! turns reasoning on, see [`with_thinking`]), then the `models`
//! fallback list, checks the key's allow-list (403) and answers 404
//! `model_not_found` for unknown ids, and 400 `invalid_request` for a model of the
//! wrong [type](check_type) (an embedding model on a chat endpoint, or a chat model
//! on `/v1/embeddings`). The plan is every endpoint of each model, in
//! order, less those the request's `provider` preferences rule out (`only`, `ignore`,
//! `order` with `allow_fallbacks: false`, `max_price`, `data_collection`,
//! `require_parameters`; 404 `no_endpoints` when none is left). Health filtering and
//! ordering (`order`, `sort`, `:floor`, `:nitro`, the weighted draw) happen in the
//! next layer, [`HealthFilterLayer`](crate::health::HealthFilterLayer).
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
//! let err = svc.clone().oneshot(ChatCall::new(req.clone(), CallContext::new())).await.unwrap_err();
//! assert_eq!(err.to_string(), "mock/echo@mock");
//!
//! // Preferences that leave no endpoint: 404 `no_endpoints`.
//! let picky = ChatRequest {
//!     provider: Some(serde_json::from_value(serde_json::json!({"only": ["openai"]})).unwrap()),
//!     ..req
//! };
//! let err = svc.oneshot(ChatCall::new(picky, CallContext::new())).await.unwrap_err();
//! assert_eq!((err.status().as_u16(), err.code()), (404, "no_endpoints"));
//! # }
//! ```

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either, Ready};
use tower::{Layer, Service};

use crate::catalog::{Catalog, Endpoint, Model, ModelType};
use crate::chat::{ChatRequest, DataCollection, Reasoning, DEFAULT_REASONING_EFFORT};
use crate::config::ProviderKind;
use crate::context::{ChatCall, ChatReply};
use crate::error::GatewayError;
use crate::money::Price;

/// Model variants a request may name with a suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `:floor`: cheapest endpoint first.
    Floor,
    /// `:nitro`: highest observed throughput first.
    Nitro,
    /// `:thinking`: reasoning on, at [`DEFAULT_REASONING_EFFORT`] unless the request
    /// asks for reasoning itself ([`with_thinking`]).
    Thinking,
}

/// Splits `id:variant` into the model id and its variant.
pub fn split_variant(model: &str) -> Result<(&str, Option<Variant>), GatewayError> {
    match model.rsplit_once(':') {
        None => Ok((model, None)),
        Some((id, "floor")) => Ok((id, Some(Variant::Floor))),
        Some((id, "nitro")) => Ok((id, Some(Variant::Nitro))),
        Some((id, "thinking")) => Ok((id, Some(Variant::Thinking))),
        Some((_, other)) => Err(GatewayError::InvalidRequest(format!(
            "unknown model variant `:{other}` in `{model}` (use :floor, :nitro or :thinking)"
        ))),
    }
}

/// The request a `:thinking` model asks for: reasoning turned on at
/// [`DEFAULT_REASONING_EFFORT`] (`exclude` kept) when the request says nothing of
/// reasoning itself; `None` when it stays as it is (another variant, or the request
/// already chose: an effort, a budget, or off). The caller clones only then.
pub fn with_thinking(req: &ChatRequest) -> Option<ChatRequest> {
    let Ok((_, Some(Variant::Thinking))) = split_variant(&req.model) else {
        return None;
    };
    if req.reasoning_wanted().is_some() {
        return None;
    }
    let mut thinking = req.clone();
    let r = thinking.reasoning.get_or_insert_with(Reasoning::default);
    r.enabled = Some(true);
    r.effort = Some(DEFAULT_REASONING_EFFORT.into());
    Some(thinking)
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

/// Why routing drops a candidate endpoint: what [`plan_each`] reports for each one it
/// leaves out. Plain data (no text is made on the request path); the route explain
/// ([`crate::explain`]) writes the sentence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    /// Its model is not in the key's allow-list.
    AllowList,
    /// Its provider is not in `provider.only`.
    Only,
    /// Its provider is in `provider.ignore`.
    Ignore,
    /// `provider.order` with `allow_fallbacks: false` does not name its provider.
    NotOrdered,
    /// A price above `provider.max_price` (USD per million tokens).
    MaxPrice {
        /// `prompt` (true) or `completion` (false).
        prompt: bool,
        /// The endpoint's price.
        price: Price,
        /// The request's ceiling.
        max: Price,
    },
    /// `data_collection: "deny"` and a provider configured to collect.
    DataCollection,
    /// `require_parameters` and a parameter its provider kind does not honour.
    RequireParameters(&'static str),
}

impl Exclusion {
    /// The preference that made it: the words of 404 `no_endpoints`.
    pub fn preference(self) -> &'static str {
        match self {
            Exclusion::AllowList => "the key's allow-list",
            Exclusion::Only => "provider.only",
            Exclusion::Ignore => "provider.ignore",
            Exclusion::NotOrdered => "provider.order with allow_fallbacks: false",
            Exclusion::MaxPrice { .. } => "provider.max_price",
            Exclusion::DataCollection => "provider.data_collection",
            Exclusion::RequireParameters(_) => "provider.require_parameters",
        }
    }
}

/// Resolves a call's models into its plan, then applies the `provider` preferences
/// (SPEC §3.1): `only`, `ignore`, `order` with `allow_fallbacks: false`, `max_price`,
/// `data_collection` and `require_parameters`. 404 `no_endpoints` when they leave none.
pub fn plan(catalog: &Catalog, call: &ChatCall) -> Result<Vec<Arc<Endpoint>>, GatewayError> {
    plan_each(catalog, call, |_, _| {})
}

/// [`plan`], telling `dropped` of every candidate endpoint it leaves out and why (the
/// route explain's view; [`RouteLayer`] passes a closure that does nothing). The
/// endpoints of a fallback model outside the key's allow-list are reported as
/// [`Exclusion::AllowList`]; for the first model that is 403 `forbidden`, after
/// reporting its endpoints.
pub fn plan_each(
    catalog: &Catalog,
    call: &ChatCall,
    mut dropped: impl FnMut(&Arc<Endpoint>, Exclusion),
) -> Result<Vec<Arc<Endpoint>>, GatewayError> {
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
        check_type(model, req)?;
        if let Some(key) = key {
            if !key.allows_model(id) {
                for e in &model.endpoints {
                    dropped(e, Exclusion::AllowList);
                }
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
    let Some(prefs) = req.provider.as_ref() else {
        return Ok(plan);
    };
    let ceiling = |v: Option<f64>, what: &str| -> Result<Option<Price>, GatewayError> {
        v.map(|f| {
            // The shortest decimal text of the float is the number the client wrote.
            format!("{f}").parse::<Price>().map_err(|e| {
                GatewayError::InvalidRequest(format!(
                    "provider.max_price.{what}: {e} (USD per million tokens, ≥ 0, ≤ 6 decimals)"
                ))
            })
        })
        .transpose()
    };
    let max_prompt = ceiling(prefs.max_price.as_ref().and_then(|m| m.prompt), "prompt")?;
    let max_completion = ceiling(
        prefs.max_price.as_ref().and_then(|m| m.completion),
        "completion",
    )?;
    let needed = requested_parameters(req);
    let named = |list: &Option<Vec<String>>, e: &Endpoint| {
        list.as_ref()
            .is_some_and(|l| l.iter().any(|n| n.as_str() == e.provider.name.as_ref()))
    };
    let above = |price: Price, max: Option<Price>, prompt: bool| {
        max.filter(|m| price > *m)
            .map(|max| Exclusion::MaxPrice { prompt, price, max })
    };
    let before = plan.len();
    let mut why: Vec<&str> = Vec::new();
    plan.retain(|e| {
        let reason = if prefs.only.is_some() && !named(&prefs.only, e) {
            Some(Exclusion::Only)
        } else if named(&prefs.ignore, e) {
            Some(Exclusion::Ignore)
        } else if !prefs.allow_fallbacks && prefs.order.is_some() && !named(&prefs.order, e) {
            Some(Exclusion::NotOrdered)
        } else if let Some(x) = above(e.pricing.prompt, max_prompt, true)
            .or_else(|| above(e.pricing.completion, max_completion, false))
        {
            Some(x)
        } else if prefs.data_collection == Some(DataCollection::Deny)
            && e.provider.data_collection == DataCollection::Allow
        {
            Some(Exclusion::DataCollection)
        } else if prefs.require_parameters {
            needed
                .iter()
                .copied()
                .find(|p| !supports(e.provider.kind, p))
                .map(Exclusion::RequireParameters)
        } else {
            None
        };
        if let Some(r) = reason {
            dropped(e, r);
            if !why.contains(&r.preference()) {
                why.push(r.preference());
            }
        }
        reason.is_none()
    });
    if plan.is_empty() && before > 0 {
        return Err(GatewayError::NoEndpoints(format!(
            "no endpoint of `{}` is left by {}; relax the request's provider preferences",
            req.model,
            why.join(", ")
        )));
    }
    Ok(plan)
}

/// 400 `invalid_request` when `model` does not serve the request's inbound API: an
/// embedding model on a chat endpoint (chat completions, messages, responses), or a
/// chat model on `/v1/embeddings` (SPEC §7.3).
pub fn check_type(model: &Model, req: &ChatRequest) -> Result<(), GatewayError> {
    match (model.kind, req.inbound.is_embeddings()) {
        (ModelType::Embedding, false) => Err(GatewayError::InvalidRequest(format!(
            "`{}` is an embedding model: call /v1/embeddings",
            model.id
        ))),
        (ModelType::Chat, true) => Err(GatewayError::InvalidRequest(format!(
            "`{}` is a chat model: call /v1/chat/completions, /v1/messages or /v1/responses, or use an embedding model here",
            model.id
        ))),
        _ => Ok(()),
    }
}

/// The optional request parameters a provider must support under
/// `require_parameters`: `tools`, `tool_choice`, `response_format`, `seed`, `stop`,
/// `temperature`, `top_p`, `reasoning_effort` (or OpenRouter's `reasoning`, or a
/// `:thinking` model), `max_tokens`, `n` (when above 1), and
/// `extra` for any field the schema does not model (passed through to OpenAI-kind
/// providers only).
pub fn requested_parameters(req: &ChatRequest) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut need = |cond: bool, name| {
        if cond {
            out.push(name)
        }
    };
    need(req.tools.as_ref().is_some_and(|t| !t.is_empty()), "tools");
    need(req.tool_choice.is_some(), "tool_choice");
    need(req.response_format.is_some(), "response_format");
    need(req.seed.is_some(), "seed");
    need(req.stop.is_some(), "stop");
    need(req.temperature.is_some(), "temperature");
    need(req.top_p.is_some(), "top_p");
    need(req.reasoning_wanted().is_some(), "reasoning_effort");
    need(
        req.max_tokens.is_some() || req.max_completion_tokens.is_some(),
        "max_tokens",
    );
    need(req.choices() > 1, "n");
    need(!req.extra.is_empty(), "extra");
    out
}

/// Whether a provider kind honours a request parameter (see
/// [`requested_parameters`]). OpenAI-kind providers take everything; Anthropic has no
/// `response_format`, `seed`, `n` or pass-through fields (it answers one choice);
/// Gemini no pass-through fields (reasoning becomes its `thinkingConfig`); the mock
/// honours `max_tokens`, `n`, `tools` and `tool_choice`.
pub fn supports(kind: ProviderKind, param: &str) -> bool {
    match kind {
        ProviderKind::OpenAi => true,
        ProviderKind::Anthropic => !matches!(param, "response_format" | "seed" | "n" | "extra"),
        ProviderKind::Gemini => param != "extra",
        ProviderKind::Mock => matches!(param, "max_tokens" | "n" | "tools" | "tool_choice"),
    }
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
        if let Some(thinking) = with_thinking(&call.request) {
            call.request = Arc::new(thinking);
        }
        match plan(&self.catalog, &call) {
            Ok(p) => {
                call.plan = p;
                Either::Right(self.inner.call(call))
            }
            Err(e) => Either::Left(future::ready(Err(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{MaxPrice, ProviderPreferences, SortBy, Tool};
    use crate::health::tests::{call, catalog};

    fn cat() -> Arc<Catalog> {
        catalog(&[
            ("a", "openai", "1.5", "3", "allow"),
            ("b", "anthropic", "1.5", "2", "deny"),
            ("c", "mock", "0.5", "1", "deny"),
        ])
    }

    fn routed(prefs: ProviderPreferences) -> Result<Vec<String>, GatewayError> {
        let c = call("test/model", Some(prefs));
        plan(&cat(), &c).map(|p| p.iter().map(|e| e.provider.name.to_string()).collect())
    }

    fn no_endpoints(r: Result<Vec<String>, GatewayError>) -> String {
        match r {
            Err(e @ GatewayError::NoEndpoints(_)) => {
                assert_eq!(e.status(), 404);
                e.to_string()
            }
            other => panic!("expected no_endpoints, got {other:?}"),
        }
    }

    #[test]
    fn without_preferences_every_endpoint_in_order() {
        assert_eq!(
            routed(ProviderPreferences::default()).unwrap(),
            ["a", "b", "c"]
        );
        // `models` appends the fallback model's endpoints.
        let mut c = call("test/model:floor", None);
        std::sync::Arc::get_mut(&mut c.request).unwrap().models = Some(vec!["test/other".into()]);
        let p = plan(&cat(), &c).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p[3].model.as_ref(), "test/other");
    }

    #[test]
    fn only_ignore_and_order_without_fallbacks() {
        let only = ProviderPreferences {
            only: Some(vec!["c".into(), "a".into()]),
            ..Default::default()
        };
        assert_eq!(routed(only).unwrap(), ["a", "c"]);
        let ignore = ProviderPreferences {
            ignore: Some(vec!["a".into()]),
            ..Default::default()
        };
        assert_eq!(routed(ignore).unwrap(), ["b", "c"]);
        let strict = ProviderPreferences {
            order: Some(vec!["b".into()]),
            allow_fallbacks: false,
            ..Default::default()
        };
        assert_eq!(routed(strict).unwrap(), ["b"]);
        // With fallbacks, `order` only reorders (in the health filter).
        let loose = ProviderPreferences {
            order: Some(vec!["b".into()]),
            ..Default::default()
        };
        assert_eq!(routed(loose).unwrap(), ["a", "b", "c"]);
        let nothing = ProviderPreferences {
            only: Some(vec!["zzz".into()]),
            ..Default::default()
        };
        assert!(no_endpoints(routed(nothing)).contains("provider.only"));
    }

    #[test]
    fn max_price_compares_exactly() {
        let max = |prompt: Option<f64>, completion: Option<f64>| ProviderPreferences {
            max_price: Some(MaxPrice { prompt, completion }),
            ..Default::default()
        };
        // 1.5 is not above 1.5: kept.
        assert_eq!(routed(max(Some(1.5), None)).unwrap(), ["a", "b", "c"]);
        assert_eq!(routed(max(Some(1.499999), None)).unwrap(), ["c"]);
        assert_eq!(routed(max(None, Some(2.0))).unwrap(), ["b", "c"]);
        // 0.1 + 0.2 style floats: the client's text is what counts.
        assert_eq!(routed(max(Some(0.5), Some(1.0))).unwrap(), ["c"]);
        // Leaving none is 404 no_endpoints (SPEC §3.2).
        assert!(no_endpoints(routed(max(Some(0.4), None))).contains("max_price"));
        // A ceiling the price unit cannot hold is a bad request.
        let e = routed(max(Some(0.0000001), None)).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("provider.max_price.prompt"));
        let e = routed(max(Some(-1.0), None)).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
    }

    #[test]
    fn data_collection_deny_drops_providers_that_train() {
        let deny = ProviderPreferences {
            data_collection: Some(DataCollection::Deny),
            ..Default::default()
        };
        assert_eq!(routed(deny).unwrap(), ["b", "c"]);
        let allow = ProviderPreferences {
            data_collection: Some(DataCollection::Allow),
            ..Default::default()
        };
        assert_eq!(routed(allow).unwrap(), ["a", "b", "c"]);
    }

    #[test]
    fn require_parameters_keeps_providers_that_honour_them() {
        let prefs = ProviderPreferences {
            require_parameters: true,
            sort: Some(SortBy::Price),
            ..Default::default()
        };
        let route = |f: &dyn Fn(&mut ChatRequest)| {
            let mut c = call("test/model", Some(prefs.clone()));
            f(std::sync::Arc::get_mut(&mut c.request).unwrap());
            plan(&cat(), &c).map(|p| {
                p.iter()
                    .map(|e| e.provider.name.to_string())
                    .collect::<Vec<_>>()
            })
        };
        // Nothing optional asked: everyone.
        assert_eq!(route(&|_| {}).unwrap(), ["a", "b", "c"]);
        // Tools: everyone (the mock's `echo` calls the first tool).
        let tools = |r: &mut ChatRequest| {
            r.tools = Some(vec![serde_json::from_value::<Tool>(serde_json::json!(
                {"type": "function", "function": {"name": "f"}}
            ))
            .unwrap()])
        };
        assert_eq!(route(&tools).unwrap(), ["a", "b", "c"]);
        // response_format: not Anthropic either.
        let rf = |r: &mut ChatRequest| {
            r.response_format = Some(serde_json::json!({"type": "json_object"}))
        };
        assert_eq!(route(&rf).unwrap(), ["a"]);
        // n above 1: Anthropic answers one choice; the mock n; n = 1 asks nothing.
        assert_eq!(route(&|r| r.n = Some(2)).unwrap(), ["a", "c"]);
        assert_eq!(route(&|r| r.n = Some(1)).unwrap(), ["a", "b", "c"]);
        // Without require_parameters nothing is dropped.
        let mut c = call("test/model", None);
        rf(std::sync::Arc::get_mut(&mut c.request).unwrap());
        assert_eq!(plan(&cat(), &c).unwrap().len(), 3);
        // The mock honours no sampling parameter.
        let seed = |r: &mut ChatRequest| r.seed = Some(1);
        assert_eq!(route(&seed).unwrap(), ["a"]);
        let cat = catalog(&[("m", "mock", "0", "0", "deny")]);
        let mut c = call("test/model", Some(prefs.clone()));
        std::sync::Arc::get_mut(&mut c.request).unwrap().seed = Some(1);
        assert!(no_endpoints(plan(&cat, &c).map(|_| vec![])).contains("require_parameters"));
    }

    #[test]
    fn variants_are_accepted_and_unknown_ones_refused() {
        assert_eq!(
            split_variant("test/model:floor").unwrap(),
            ("test/model", Some(Variant::Floor))
        );
        assert_eq!(
            split_variant("test/model:nitro").unwrap(),
            ("test/model", Some(Variant::Nitro))
        );
        assert_eq!(
            split_variant("test/model:thinking").unwrap(),
            ("test/model", Some(Variant::Thinking))
        );
        let c = call("test/model:turbo", None);
        let e = plan(&cat(), &c).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains(":thinking"), "{e}");
        let c = call("nope/model", None);
        assert_eq!(plan(&cat(), &c).unwrap_err().code(), "model_not_found");
    }

    #[test]
    fn thinking_turns_reasoning_on_unless_the_request_chose() {
        use crate::chat::{Reasoning, ReasoningWanted};
        let with = |model: &str, reasoning: Option<Reasoning>, effort: Option<&str>| {
            let mut c = call(model, None);
            let r = std::sync::Arc::get_mut(&mut c.request).unwrap();
            r.reasoning = reasoning;
            r.reasoning_effort = effort.map(str::to_string);
            with_thinking(&c.request)
        };
        let t = with("test/model:thinking", None, None).unwrap();
        assert_eq!(
            t.reasoning_wanted(),
            Some(ReasoningWanted::Effort("medium"))
        );
        // `exclude` is kept.
        let hidden = Reasoning {
            exclude: true,
            ..Default::default()
        };
        let t = with("test/model:thinking", Some(hidden), None).unwrap();
        assert!(t.hides_reasoning());
        assert_eq!(
            t.reasoning_wanted(),
            Some(ReasoningWanted::Effort("medium"))
        );
        // The request's own choice stands (no clone), and other models are left alone.
        assert!(with("test/model:thinking", None, Some("high")).is_none());
        let off = Reasoning {
            enabled: Some(false),
            ..Default::default()
        };
        assert!(with("test/model:thinking", Some(off), None).is_none());
        assert!(with("test/model", None, None).is_none());
        assert!(with("test/model:floor", None, None).is_none());
        // The plan is the model's.
        let c = call("test/model:thinking", None);
        assert_eq!(plan(&cat(), &c).unwrap().len(), 3);
    }

    #[test]
    fn a_model_of_the_wrong_type_is_a_400_naming_it() {
        use crate::chat::{Dialect, Message, Role};
        use crate::context::CallContext;
        let catalog = Catalog::from_config(&crate::config::Config::demo());
        let chat = ChatRequest {
            model: "mock/embed".into(),
            messages: vec![Message::text(Role::User, "hi")],
            ..Default::default()
        };
        let err = plan(&catalog, &ChatCall::new(chat, CallContext::new())).unwrap_err();
        assert_eq!(
            (err.status().as_u16(), err.code()),
            (400, "invalid_request")
        );
        assert!(
            err.to_string()
                .contains("`mock/embed` is an embedding model"),
            "{err}"
        );

        let mut embed = ChatRequest {
            model: "mock/embed".into(),
            ..Default::default()
        };
        embed.inbound.dialect = Dialect::Embeddings;
        let ok = plan(&catalog, &ChatCall::new(embed.clone(), CallContext::new())).unwrap();
        assert_eq!(ok[0].label(), "mock/embed@mock");
        // A chat model among the fallbacks is refused too.
        embed.models = Some(vec!["mock/echo".into()]);
        let err = plan(&catalog, &ChatCall::new(embed, CallContext::new())).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(
            err.to_string().contains("`mock/echo` is a chat model"),
            "{err}"
        );
    }
}
