//! Media helpers shared by the non-OpenAI adapters: `data:` URLs and MIME types.
//!
//! # Example
//! ```
//! use switchboard::providers::media::{data_url, mime_from_url};
//!
//! let d = data_url("data:image/png;base64,iVBORw0KGgo=").unwrap();
//! assert_eq!((d.mime, d.data), ("image/png", "iVBORw0KGgo="));
//! assert_eq!(mime_from_url("https://x.test/cat.JPG?size=2"), "image/jpeg");
//! ```

/// A base64 `data:` URL, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataUrl<'a> {
    /// The MIME type, e.g. `image/png`.
    pub mime: &'a str,
    /// The base64 payload.
    pub data: &'a str,
}

/// Splits `data:MIME;base64,DATA`; `None` for anything else (plain URLs, or `data:`
/// URLs that are not base64, which no provider accepts).
pub fn data_url(url: &str) -> Option<DataUrl<'_>> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mut params = meta.split(';');
    let mime = params.next().filter(|m| !m.is_empty())?;
    if !params.any(|p| p.eq_ignore_ascii_case("base64")) {
        return None;
    }
    Some(DataUrl { mime, data })
}

/// Guesses a MIME type from a URL's file extension (query and fragment ignored);
/// `image/jpeg` when unknown, the most common image type.
pub fn mime_from_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path
        .rsplit('/')
        .next()
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        Some("pdf") => "application/pdf",
        Some("mp3") => "audio/mp3",
        Some("wav") => "audio/wav",
        Some("mp4") => "video/mp4",
        _ => "image/jpeg",
    }
}

/// A tool call's JSON-encoded arguments as the object Anthropic and Gemini want (`{}`
/// when they are empty or not an object).
pub fn arguments_object(arguments: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::Value::Object(Default::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_must_be_base64() {
        assert!(data_url("data:text/plain,hello").is_none());
        assert!(data_url("https://x.test/a.png").is_none());
        assert_eq!(
            data_url("data:application/pdf;name=a.pdf;base64,JVBE").unwrap(),
            DataUrl {
                mime: "application/pdf",
                data: "JVBE"
            }
        );
    }

    #[test]
    fn mime_types_follow_the_extension() {
        assert_eq!(mime_from_url("http://h/a.webp"), "image/webp");
        assert_eq!(mime_from_url("http://h/a.png#frag"), "image/png");
        assert_eq!(mime_from_url("http://h/noext"), "image/jpeg");
        assert_eq!(mime_from_url("http://h.png/dir/"), "image/jpeg");
    }
}
