//! `POST /v1/responses`: the OpenAI Responses dialect, stateless (SPEC §7.2).
//!
//! A Responses body is read into the one [`ChatRequest`] every layer serves
//! ([`request`]): `input` items become messages, `instructions` a leading system
//! message, `tools` / `tool_choice` / `text.format` / `reasoning.effort` their chat
//! counterparts; what the `response` object echoes rides along in
//! [`Inbound::responses`](crate::chat::Inbound::responses). Nothing is stored:
//! `previous_response_id`, `conversation` and `background` are refused with a 400
//! that says to send the whole conversation.
//!
//! The answer is a `response` object ([`response`]): `output` holds a `reasoning`
//! item (the provider's reasoning text as a summary), a `message` item with one
//! `output_text` part, and one `function_call` item per tool call; `status` is
//! `completed`, or `incomplete` with its reason when the answer was cut by
//! `max_output_tokens` or a content filter; `usage` carries `cost`. Its `id` is the
//! gateway's request id, so `/v1/generation?id=` takes it. A stream ([`stream`]) is
//! the API's typed events, each with its `sequence_number`, from
//! `response.created` to `response.completed` (or `response.failed` when the stream
//! breaks after it started).
//!
//! # Example
//! ```
//! use switchboard::normalize::NormalizeLayer;
//! use switchboard::context::{ChatCall, ChatReply};
//! use switchboard::error::GatewayError;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(NormalizeLayer::new())
//!     .service(service_fn(|call: ChatCall| async move {
//!         // The Responses body arrives as a chat request.
//!         assert_eq!(call.request.messages[0].content.as_ref().unwrap().text(), "Be brief.");
//!         Err::<ChatReply, _>(GatewayError::ModelNotFound(format!("no `{}`", call.request.model)))
//!     }));
//! let req = http::Request::post("/v1/responses")
//!     .body(r#"{"model":"x","instructions":"Be brief.","input":"hi"}"#.to_string())
//!     .unwrap();
//! assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 404);
//!
//! // Stateless: a follow-up by id is refused.
//! let follow_up = http::Request::post("/v1/responses")
//!     .body(r#"{"model":"x","input":"and?","previous_response_id":"resp_1"}"#.to_string())
//!     .unwrap();
//! assert_eq!(svc.oneshot(follow_up).await.unwrap().status(), 400);
//! # }
//! ```

mod request;
mod response;
mod stream;

pub(super) use request::parse;
pub(super) use response::json_body;
pub(crate) use stream::Encoder;
