//! `GET /admin/usage?group_by=G[,G2]&from=T&to=T` (SPEC §9): usage aggregated by the
//! request log's database ([`UsageSource`](crate::logging::UsageSource)).
//!
//! - `group_by` (required): one or two of `key` (`key_id`, `key_name`), `model`
//!   (the model that served, else the one asked for), `provider`, `app`
//!   (`app_title`, `app_url`), `hour`, `day` (UTC buckets, their start in RFC 3339).
//! - `from` (inclusive) and `to` (exclusive): RFC 3339, to the millisecond; by
//!   default the last 24 hours (`to` = now, `from` = `to` − 24 h).
//! - Each group: `requests`, `errors` (status ≥ 400, 499 included, or an error
//!   code: a stream that failed after its 200), `prompt_tokens`,
//!   `completion_tokens`, `cost` (USD, the exact sum of the charges),
//!   `latency_ms_p50`, `latency_ms_p95`, `ttft_ms_p50` (nearest rank; `null` without
//!   values).
//! - At most [`MAX_GROUPS`] groups: by time (oldest first) with `hour` or `day`,
//!   else by cost, then requests, descending.
//!
//! A bad parameter is a 400 `invalid_request` naming it. A request log that cannot
//! be queried (`[logging].sink` a JSONL file, `none`, or SQLite in memory) answers
//! 404 `not_found` naming `[logging].sink`: like the admin API when it is off, the
//! route does not exist in that configuration.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use http::{HeaderMap, Response};
use serde::Serialize;

use super::AdminState;
use crate::error::{Body, GatewayError};
use crate::logging::{GroupBy, GroupValue, UsageQuery, UsageRow};
use crate::money::Money;

/// The most groups one answer holds.
pub const MAX_GROUPS: usize = 1000;

/// The default range: the last 24 hours.
const DEFAULT_RANGE_MS: u64 = 24 * 3600 * 1000;

/// One group in `GET /admin/usage`.
#[derive(Debug, Serialize)]
pub struct UsageView {
    /// The group's columns (`key_id`, `model`, `hour`, …).
    pub group: serde_json::Map<String, serde_json::Value>,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Prompt tokens charged.
    pub prompt_tokens: u64,
    /// Completion tokens charged.
    pub completion_tokens: u64,
    /// USD charged, exact.
    pub cost: Money,
    /// Median latency, ms.
    pub latency_ms_p50: Option<u64>,
    /// 95th percentile latency, ms.
    pub latency_ms_p95: Option<u64>,
    /// Median time to first token, ms.
    pub ttft_ms_p50: Option<u64>,
}

impl From<UsageRow> for UsageView {
    fn from(r: UsageRow) -> UsageView {
        let group = r
            .group
            .into_iter()
            .map(|(name, v)| {
                let v = match v {
                    GroupValue::Text(Some(t)) => serde_json::Value::String(t),
                    GroupValue::Text(None) => serde_json::Value::Null,
                    GroupValue::Time(ms) => {
                        serde_json::Value::String(crate::clock::format_rfc3339(ms / 1000))
                    }
                };
                (name.to_string(), v)
            })
            .collect();
        UsageView {
            group,
            requests: r.requests,
            errors: r.errors,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cost: r.cost,
            latency_ms_p50: r.latency_ms_p50,
            latency_ms_p95: r.latency_ms_p95,
            ttft_ms_p50: r.ttft_ms_p50,
        }
    }
}

/// Parses an RFC 3339 time to Unix milliseconds (a fraction below the millisecond
/// counts as the next one); `name` is the parameter, for the 400.
fn parse_time(name: &str, text: &str) -> Result<u64, GatewayError> {
    let bad = |why: String| {
        GatewayError::InvalidRequest(format!(
            "`{name}`: `{text}` is not an RFC 3339 time like 2026-01-31T00:00:00Z ({why})"
        ))
    };
    let t =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .map_err(|e| bad(e.to_string()))?;
    let nanos = t.unix_timestamp_nanos();
    if nanos < 0 {
        return Err(bad("before 1970-01-01T00:00:00Z".into()));
    }
    let ms = nanos / 1_000_000 + i128::from(nanos % 1_000_000 != 0);
    u64::try_from(ms).map_err(|_| bad("too far ahead".into()))
}

/// The query of `GET /admin/usage`'s parameters at `now_ms`; a 400 names what is wrong.
pub fn parse_query(
    params: &HashMap<String, String>,
    now_ms: u64,
) -> Result<UsageQuery, GatewayError> {
    if let Some(unknown) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "group_by" | "from" | "to"))
    {
        return Err(GatewayError::InvalidRequest(format!(
            "unknown parameter `{unknown}`: GET /admin/usage takes group_by, from and to"
        )));
    }
    let Some(given) = params.get("group_by") else {
        return Err(GatewayError::InvalidRequest(
            "`group_by` is required: one or two of key, model, provider, app, hour, day (e.g. group_by=model,day)".into(),
        ));
    };
    let mut group_by = Vec::new();
    for part in given.split(',') {
        let g: GroupBy = part
            .trim()
            .parse()
            .map_err(|e| GatewayError::InvalidRequest(format!("`group_by`: {e}")))?;
        if group_by.contains(&g) {
            return Err(GatewayError::InvalidRequest(format!(
                "`group_by`: `{}` is named twice",
                part.trim()
            )));
        }
        group_by.push(g);
    }
    if group_by.len() > 2 {
        return Err(GatewayError::InvalidRequest(format!(
            "`group_by`: at most two groupings (got {})",
            group_by.len()
        )));
    }
    let to_ms = params
        .get("to")
        .map(|t| parse_time("to", t))
        .transpose()?
        .unwrap_or(now_ms);
    let from_ms = params
        .get("from")
        .map(|t| parse_time("from", t))
        .transpose()?
        .unwrap_or(to_ms.saturating_sub(DEFAULT_RANGE_MS));
    if from_ms >= to_ms {
        return Err(GatewayError::InvalidRequest(
            "`from` must be before `to` (`from` is inclusive, `to` exclusive; the default range is the 24 hours before `to`, which is now by default)".into(),
        ));
    }
    Ok(UsageQuery {
        group_by,
        from_ms,
        to_ms,
        limit: MAX_GROUPS,
    })
}

/// `GET /admin/usage`.
pub(super) async fn get_usage(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response<Body> {
    if let Err(e) = crate::accounts::admin_check(&state.accounts, &headers) {
        return e.into_response();
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let query = match parse_query(&params, now_ms) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let Some(source) = &state.usage else {
        return GatewayError::NotFound(format!(
            "the request log cannot be queried: [logging].sink = \"{}\"; GET /admin/usage needs a SQLite file (\"sqlite\" beside a SQLite file store, or \"sqlite:PATH\") or \"postgres\"",
            state.log_sink
        ))
        .into_response();
    };
    match source.query(query).await {
        Ok(rows) => super::json_ok(rows.into_iter().map(UsageView::from).collect::<Vec<_>>()),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<UsageQuery, GatewayError> {
        let params = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_query(&params, 100 * DEFAULT_RANGE_MS)
    }

    fn message(r: Result<UsageQuery, GatewayError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        e.to_string()
    }

    #[test]
    fn parameters_are_checked_and_named() {
        let ok = q(&[("group_by", "model, day")]).unwrap();
        assert_eq!(ok.group_by, [GroupBy::Model, GroupBy::Day]);
        assert_eq!(
            (ok.from_ms, ok.to_ms),
            (99 * DEFAULT_RANGE_MS, 100 * DEFAULT_RANGE_MS)
        );
        let ok = q(&[
            ("group_by", "key"),
            ("from", "2026-01-01T00:00:00.0005Z"),
            ("to", "2026-01-01T01:00:00+01:00"),
        ]);
        assert!(message(ok).contains("`from` must be before `to`"));
        let ok = q(&[
            ("group_by", "hour"),
            ("from", "2026-01-01T00:00:00.0005Z"),
            ("to", "2026-01-02T00:00:00Z"),
        ])
        .unwrap();
        assert_eq!(ok.from_ms, 1_767_225_600_001);
        assert_eq!(ok.to_ms, 1_767_312_000_000);
        assert!(message(q(&[])).contains("`group_by` is required"));
        assert!(message(q(&[("group_by", "week")])).contains("`group_by`: `week`"));
        assert!(message(q(&[("group_by", "key,key")])).contains("twice"));
        assert!(message(q(&[("group_by", "key,model,day")])).contains("at most two"));
        assert!(message(q(&[("group_by", "key"), ("from", "yesterday")])).contains("`from`"));
        assert!(
            message(q(&[("group_by", "key"), ("to", "2026-13-01T00:00:00Z")])).contains("`to`")
        );
        assert!(
            message(q(&[("group_by", "key"), ("from", "1969-12-31T23:59:59Z")])).contains("1970")
        );
        assert!(message(q(&[("group_by", "key"), ("limit", "5")])).contains("`limit`"));
    }
}
