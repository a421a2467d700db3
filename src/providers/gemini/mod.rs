//! Google Gemini (placeholder).
use bytes::Bytes;
use super::{Adapter, StreamDecoder};
use crate::chat::ChatChunk;
use crate::context::ProviderCall;
use crate::error::{FailureKind, ProviderError};
/// The Gemini adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct GeminiAdapter;
impl Adapter for GeminiAdapter {
    fn build_request(&self, call: &ProviderCall, _stream: bool) -> Result<http::Request<Bytes>, ProviderError> {
        Err(ProviderError::new(call.endpoint.provider.name.clone(), FailureKind::NotConfigured, "not implemented"))
    }
    fn parse_response(&self, call: &ProviderCall, _body: &[u8]) -> Result<ChatChunk, ProviderError> {
        Err(ProviderError::new(call.endpoint.provider.name.clone(), FailureKind::NotConfigured, "not implemented"))
    }
    fn stream_decoder(&self, _call: &ProviderCall) -> Box<dyn StreamDecoder> { unimplemented!() }
}
