//! switchboard: a self-hosted LLM gateway built as a stack of Tower layers.
//!
//! Clients speak the OpenAI chat-completions API (plus OpenRouter's extensions); the
//! gateway speaks each provider's native API. Every stage is a `tower::Layer` usable
//! alone or stacked; [`gateway::Gateway::builder`] assembles the default stack the
//! `switchboard` binary serves.
//!
//! ```text
//! HTTP tier  (Service<http::Request<B>>)   logging → auth → rate_limit → cache → normalize
//! typed tier (Service<ChatCall>)           route → health → credit → fallback
//! provider   (Service<ProviderCall>)       metering → drain → providers::ProviderClient
//! ```
//!
//! See `ARCHITECTURE.md` for the whole picture and `README.md` for use.
// No unsafe code but the ledger journal's memory map (`store/sqlite/journal.rs`, two calls).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod cache;
mod canonical;
pub mod catalog;
pub mod chat;
pub mod client_ip;
pub mod clock;
pub mod config;
pub mod context;
pub mod credit;
pub mod dashboard;
pub mod drain;
pub mod error;
pub mod explain;
pub mod fallback;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod health;
pub mod idempotency;
mod json;
pub mod keys;
pub mod logging;
pub mod metering;
pub mod money;
pub mod normalize;
pub mod otel;
pub mod providers;
pub mod rate_limit;
pub mod route;
pub mod shared;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tokenize;

pub use gateway::Gateway;

/// The `User-Agent` sent upstream.
pub const USER_AGENT: &str = concat!("switchboard/", env!("CARGO_PKG_VERSION"));
