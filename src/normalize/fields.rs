//! Reading a JSON body field by field, for the dialects that take theirs as a
//! `serde_json` object: `null` is absent, and a wrong type is a 400 that names the
//! field's path (SPEC §3.2).

use serde_json::{Map, Value};

use crate::error::GatewayError;

/// A 400 `invalid_request` with `message`.
pub(super) fn invalid(message: impl Into<String>) -> GatewayError {
    GatewayError::InvalidRequest(message.into())
}

/// A 400 for `path` holding the wrong kind of value.
pub(super) fn wrong(path: &str, want: &str, got: &Value) -> GatewayError {
    invalid(format!(
        "`{path}` must be {want}, got {}",
        crate::chat::json_kind(got)
    ))
}

/// The field `name` of `obj`, `None` when absent or `null`.
pub(super) fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// `v` as an object, or the 400 naming `path`.
pub(super) fn object<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, GatewayError> {
    v.as_object().ok_or_else(|| wrong(path, "an object", v))
}
