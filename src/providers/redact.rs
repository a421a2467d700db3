//! Upstream messages made safe to relay: credentials redacted, length capped.
//!
//! An upstream's error message goes back to the client (SPEC §3.2, 502 and the
//! request's own 4xx). An upstream that echoes its request would hand the client the
//! gateway's provider key, so every message taken from an upstream passes through
//! [`redact`] first: the endpoint's own key wherever it appears, `Bearer`/`Basic`
//! tokens, the values of credential headers and fields (`Authorization`,
//! `x-api-key`, `x-goog-api-key`, `api_key`, `key=`…), and `sk-…` / `AIza…` style keys
//! become `[REDACTED]`; the result is at most [`MAX_ERROR_MESSAGE_CHARS`] characters.
//!
//! ```
//! use switchboard::providers::redact::redact;
//!
//! let echoed = r#"bad request: {"headers":{"authorization":"Bearer sk-live-123456"}}"#;
//! let safe = redact(echoed, Some("sk-live-123456"));
//! assert_eq!(safe, r#"bad request: {"headers":{"authorization":"[REDACTED]"}}"#);
//! ```

use std::sync::LazyLock;

use regex::{Captures, Regex};

/// The longest upstream message relayed to a client, in characters; longer ones are
/// cut on a character boundary and end with `…`.
pub const MAX_ERROR_MESSAGE_CHARS: usize = 1000;

const REDACTED: &str = "[REDACTED]";

/// Credential-looking text: a credential field or header with its value, a scheme
/// and its token, or a well-known key shape.
static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?xi)
        (?P<name>
            \b(?:proxy-)?authorization | \bx-(?:goog-)?api-key | \bapi[_-]?key
          | \baccess[_-]?token | \bsecret | \bpassword | \bkey )
        (?P<sep> \\?["']? [\ \t]* [:=] [\ \t]* \\?["']? )
        (?: (?:bearer|basic|token) \s+ )?
        (?: \[REDACTED\] | [^\s"'\\,;&}\[\]]+ )
      | \b(?P<scheme> bearer | basic ) \s+ (?: \[REDACTED\] | [^\s"'\\,;&}\[\]]+ )
      | \bsk-[A-Za-z0-9_\-]{6,}
      | \bAIza[0-9A-Za-z_\-]{20,}
    "#,
    )
    .expect("a valid pattern")
});

/// `message` with every credential-looking part replaced by `[REDACTED]` (`key`, the
/// endpoint's own provider key, wherever it appears), cut to
/// [`MAX_ERROR_MESSAGE_CHARS`] characters.
pub fn redact(message: &str, key: Option<&str>) -> String {
    let mut text = match key.filter(|k| !k.is_empty()) {
        Some(k) if message.contains(k) => message.replace(k, REDACTED),
        _ => message.to_string(),
    };
    if SECRET.is_match(&text) {
        text = SECRET
            .replace_all(&text, |c: &Captures<'_>| {
                if let (Some(name), Some(sep)) = (c.name("name"), c.name("sep")) {
                    format!("{}{}{REDACTED}", name.as_str(), sep.as_str())
                } else if let Some(scheme) = c.name("scheme") {
                    format!("{} {REDACTED}", scheme.as_str())
                } else {
                    REDACTED.to_string()
                }
            })
            .into_owned();
    }
    if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_MESSAGE_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_key_is_redacted_wherever_it_appears() {
        let key = "pk_9f8e7d6c5b4a";
        let got = redact(&format!("echo: {key}{key} and x{key}y"), Some(key));
        assert!(!got.contains(key), "{got}");
        assert_eq!(got, "echo: [REDACTED][REDACTED] and x[REDACTED]y");
        // The key inside a credential's value: one redaction, not two.
        let got = redact(
            &format!("Authorization: Bearer {key}, bearer {key}"),
            Some(key),
        );
        assert_eq!(got, "Authorization: [REDACTED], bearer [REDACTED]");
    }

    #[test]
    fn credential_shapes_are_redacted() {
        for (input, want) in [
            (
                "Authorization: Bearer abc.def-ghi",
                "Authorization: [REDACTED]",
            ),
            (
                "missing bearer tok_12345 here",
                "missing bearer [REDACTED] here",
            ),
            (
                r#"{"x-api-key":"ant-123","other":1}"#,
                r#"{"x-api-key":"[REDACTED]","other":1}"#,
            ),
            (
                r#"{\"x-goog-api-key\": \"g-123\"}"#,
                r#"{\"x-goog-api-key\": \"[REDACTED]\"}"#,
            ),
            (
                "GET /v1beta/models/x?key=AIzaSyA-abcdefghijklmnopqrstuv&alt=sse",
                "GET /v1beta/models/x?key=[REDACTED]&alt=sse",
            ),
            ("used sk-proj-AbC123xyz", "used [REDACTED]"),
            ("key AIzaSyA-abcdefghijklmnopqrstuv", "key [REDACTED]"),
            ("api_key=hunter2hunter2", "api_key=[REDACTED]"),
        ] {
            assert_eq!(redact(input, None), want, "{input}");
        }
        // Ordinary messages are left alone.
        for plain in [
            "The model `gpt-x` does not exist",
            "Overloaded",
            "max_tokens: must be at most 4096",
            "monkey business",
        ] {
            assert_eq!(redact(plain, None), plain);
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let got = redact(&long, None);
        assert_eq!(got.chars().count(), MAX_ERROR_MESSAGE_CHARS + 1);
        assert!(got.ends_with('…'));
        let short = "é".repeat(MAX_ERROR_MESSAGE_CHARS);
        assert_eq!(redact(&short, None), short);
    }
}
