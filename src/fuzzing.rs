//! Entry points for the `cargo fuzz` targets in `fuzz/` and for the replay of the
//! inputs they found bugs with (`tests/fuzz_regressions.rs`); built only with the
//! `fuzzing` feature. Not a stable API.
//!
//! Each function takes arbitrary bytes, drives one parser the way the gateway does
//! on the request path, and panics when a property that must hold for *any* input
//! is broken: no panic inside the parser, no allocation bomb, and a result bounded
//! by the input (the JSON the gateway would write for it is at most
//! [`AMPLIFICATION`] times the input plus [`SLACK`]). Where the code has a second
//! way of computing the same thing, they must agree (the hand-written JSON writers
//! of `chat/ser.rs` against serde_json, an SSE stream whole against the same stream
//! cut into reads).
//!
//! ```
//! switchboard::fuzzing::run("request", br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
//! switchboard::fuzzing::run("openai_response", br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#);
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::catalog::{Catalog, Endpoint};
use crate::chat::{Aggregator, ChatChunk, ChatRequest, ChunkChoice, Dialect};
use crate::config::{Config, ProviderKind, StoreConfig, SyncMode};
use crate::context::{CallContext, ProviderCall};
use crate::money::Money;
use crate::providers::sse::SseParser;
use crate::providers::{anthropic, gemini, mock, openai, Adapter, Decoded};
use crate::store::{KeyStore, Ledger, NewKey, SqliteStore};

/// The most JSON bytes the gateway may write per input byte of an upstream answer.
pub const AMPLIFICATION: usize = 64;
/// Bytes of output allowed whatever the input (an empty answer is still a completion).
pub const SLACK: usize = 64 << 10;
/// The most text the mock provider may build in memory for any request (64 MiB):
/// more is an allocation the client chooses (`mock/lorem` with a huge `max_tokens`).
pub const MAX_MOCK_TEXT: usize = 64 << 20;

/// Every target, by the name of its file in `fuzz/fuzz_targets/`.
pub const TARGETS: &[&str] = &[
    "request",
    "sse",
    "openai_response",
    "openai_stream",
    "anthropic_response",
    "anthropic_stream",
    "gemini_response",
    "gemini_stream",
    "aggregator",
    "journal_replay",
    "canonical",
];

/// Runs the target named `target` (one of [`TARGETS`]) on `data`.
///
/// # Panics
/// On an unknown target, and wherever the target finds a bug.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "request" => request(data),
        "sse" => sse(data),
        "openai_response" => response(ProviderKind::OpenAi, data),
        "openai_stream" => stream(ProviderKind::OpenAi, data),
        "anthropic_response" => response(ProviderKind::Anthropic, data),
        "anthropic_stream" => stream(ProviderKind::Anthropic, data),
        "gemini_response" => response(ProviderKind::Gemini, data),
        "gemini_stream" => stream(ProviderKind::Gemini, data),
        "aggregator" => aggregator(data),
        "journal_replay" => journal_replay(data),
        "canonical" => canonical(data),
        other => panic!("no fuzz target `{other}` (known: {TARGETS:?})"),
    }
}

/// A client's body as the response cache and the idempotency layer read it: its
/// canonical text from the bytes (`canonical/raw.rs`) against `serde_json`'s
/// parsing writer: the same bytes and the same top level, or both refuse it.
pub fn canonical(data: &[u8]) {
    let (mut raw, mut parsed) = (Vec::new(), Vec::new());
    match (
        crate::canonical::canonicalize(data, &mut raw),
        crate::canonical::canonicalize_parsed(data, &mut parsed),
    ) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b, "the top level differs");
            assert!(raw == parsed, "the canonical text differs");
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("one writer refused the body: {a:?} / {b:?}"),
    }
}

/// A client's `POST /v1/chat/completions` body, as `NormalizeLayer` reads it
/// ([`crate::normalize::parse_request`]); an accepted request is then written back
/// out (it must parse again to the same request), translated for every provider
/// kind, and answered by the mock provider.
pub fn request(data: &[u8]) {
    let Ok(req) = crate::normalize::parse_request(data) else {
        return;
    };
    let text = serde_json::to_vec(&req).expect("an accepted request serializes");
    match crate::normalize::parse_request(&text) {
        Ok(back) => assert!(
            same_request(&back, &req),
            "a request written back out reads as another: {}",
            String::from_utf8_lossy(&text)
        ),
        Err(e) => panic!(
            "an accepted request, written back out, is refused ({e}): {}",
            String::from_utf8_lossy(&text)
        ),
    }
    let req = Arc::new(req);
    for endpoint in catalog().endpoints() {
        let call = ProviderCall {
            endpoint: endpoint.clone(),
            request: req.clone(),
            ctx: CallContext::new(),
        };
        let body = match endpoint.provider.kind {
            ProviderKind::Mock => {
                let (text, _) = mock::completion_text(&call);
                assert!(
                    text.len() <= MAX_MOCK_TEXT.max(data.len()),
                    "the mock built {} bytes of text for a {}-byte request",
                    text.len(),
                    data.len()
                );
                continue;
            }
            kind => match adapter(kind).build_request(&call, req.stream) {
                Ok(r) => r.into_body(),
                Err(_) => continue,
            },
        };
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&body) {
            panic!(
                "the {} body sent upstream is not JSON ({e}): {}",
                endpoint.provider.kind.as_str(),
                String::from_utf8_lossy(&body)
            );
        }
    }
}

/// Equality up to floats, which serde_json's default parser may read a unit in the
/// last place off (it is not `float_roundtrip`): compared as JSON values with every
/// float rounded to 12 significant digits.
fn same_request(a: &ChatRequest, b: &ChatRequest) -> bool {
    if a == b {
        return true;
    }
    fn rounded(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) if n.is_f64() => {
                let f = n.as_f64().unwrap_or_default();
                Value::String(format!("{f:.11e}"))
            }
            Value::Array(items) => Value::Array(items.into_iter().map(rounded).collect()),
            Value::Object(m) => {
                Value::Object(m.into_iter().map(|(k, v)| (k, rounded(v))).collect())
            }
            v => v,
        }
    }
    let value = |r: &ChatRequest| serde_json::to_value(r).map(rounded).ok();
    value(a) == value(b)
}

/// The incremental SSE parser ([`SseParser`]): the bytes cut into reads at points
/// taken from the input must give the same events as the bytes pushed at once.
pub fn sse(data: &[u8]) {
    let (mut cuts, body) = Cuts::split(data);
    let whole = {
        let mut p = SseParser::default();
        p.push(body);
        p.end();
        events(&mut p)
    };
    let mut p = SseParser::default();
    let mut pieces = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (read, after) = rest.split_at(cuts.next().min(rest.len()));
        p.push(read);
        let (got, err) = events(&mut p);
        pieces.extend(got);
        if err.is_some() {
            // An error ends the stream (the gateway fails the attempt there).
            assert_eq!(
                (&pieces, &err),
                (&whole.0, &whole.1),
                "an error read by read differs from the error at once"
            );
            return;
        }
        rest = after;
    }
    p.end();
    let (got, err) = events(&mut p);
    pieces.extend(got);
    assert_eq!(
        (pieces, err),
        whole,
        "the stream cut into reads gives other events than at once"
    );
}

type Events = (Vec<(String, String)>, Option<String>);

fn events(p: &mut SseParser) -> Events {
    let mut out = Vec::new();
    loop {
        match p.next_event() {
            Ok(Some(e)) => {
                assert!(e.data.len() <= crate::providers::sse::MAX_EVENT);
                out.push((e.event.to_string(), e.data.to_string()));
            }
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e.to_string())),
        }
    }
}

/// A provider's non-stream answer body, through its adapter's
/// [`parse_response`](Adapter::parse_response), then folded and written as the
/// `chat.completion` a non-stream client gets.
pub fn response(kind: ProviderKind, data: &[u8]) {
    let call = call_for(kind);
    let Ok(chunk) = adapter(kind).parse_response(&call, data) else {
        return;
    };
    let mut out = Output::new(data.len());
    out.chunk(&chunk);
    let mut agg = Aggregator::default();
    agg.push(chunk);
    out.completion(agg);
    if kind == ProviderKind::Anthropic {
        messages_response(data);
    }
}

/// An anthropic answer as a `/v1/messages` client gets it (its content blocks as
/// sent): one JSON `message`, bounded by the input.
fn messages_response(data: &[u8]) {
    let call = call_as(ProviderKind::Anthropic, Dialect::AnthropicMessages);
    let Ok(chunk) = adapter(ProviderKind::Anthropic).parse_response(&call, data) else {
        return;
    };
    let mut agg = Aggregator::default();
    agg.push(chunk);
    let body = crate::normalize::json_body(&agg.finish(), &call.request);
    let message: serde_json::Value = serde_json::from_slice(&body).expect("a message is JSON");
    assert_eq!(message["type"], "message", "{message}");
    assert!(message["content"].is_array(), "{message}");
    Output::new(data.len()).add(body.len(), "the message");
}

/// A provider's SSE stream: the input (after two bytes that choose where reads are
/// cut) goes through [`SseParser`] and the adapter's stream decoder, as the
/// transport does; each chunk is written as the SSE line a stream client gets, and
/// all of them folded into the completion a non-stream client gets.
pub fn stream(kind: ProviderKind, data: &[u8]) {
    let mut agg = Aggregator::default();
    let mut out = Output::new(data.len());
    decode_stream(&call_for(kind), data, |chunk| {
        out.chunk(&chunk);
        agg.push(chunk);
    });
    out.completion(agg);
    if kind == ProviderKind::Anthropic {
        messages_stream(data);
    }
}

/// An anthropic stream as a `/v1/messages` client gets it (its block events as
/// sent): every event one `event:` line and one `data:` line of JSON whose `type` is
/// the event's name, bounded by the input.
fn messages_stream(data: &[u8]) {
    let call = call_as(ProviderKind::Anthropic, Dialect::AnthropicMessages);
    let mut encoder =
        crate::normalize::Encoder::new(CallContext::new(), Some(&call.endpoint), &call.request);
    let mut out = Output::new(data.len());
    let mut check = |bytes: &[u8]| {
        out.add(bytes.len(), "the message events");
        let text = std::str::from_utf8(bytes).expect("events are UTF-8");
        let events = text
            .strip_suffix("\n\n")
            .expect("events end with a blank line");
        for event in events.split("\n\n") {
            let (name, data) = event.split_once('\n').expect("an event and a data line");
            let name = name.strip_prefix("event: ").expect("an event line");
            let data = data.strip_prefix("data: ").expect("a data line");
            assert!(!data.contains('\n'), "one data line: {event:?}");
            let v: serde_json::Value = serde_json::from_str(data).expect("the data is JSON");
            assert_eq!(v["type"], name, "{event}");
        }
    };
    decode_stream(&call, data, |chunk| {
        if let Some(bytes) = encoder.chunk(&chunk) {
            check(&bytes);
        }
    });
    check(&encoder.done());
}

/// Decodes `data` (after two bytes that choose where reads are cut) as a stream of
/// `call`'s upstream, handing each chunk to `each`, until the stream ends or fails.
fn decode_stream(call: &ProviderCall, data: &[u8], mut each: impl FnMut(ChatChunk)) {
    let (mut cuts, body) = Cuts::split(data);
    let mut decoder = adapter(call.endpoint.provider.kind).stream_decoder(call);
    let mut parser = SseParser::default();
    let mut rest = body;
    'read: loop {
        if rest.is_empty() {
            parser.end();
        } else {
            let (read, after) = rest.split_at(cuts.next().min(rest.len()));
            parser.push(read);
            rest = after;
        }
        loop {
            let ended = parser.is_ended();
            let event = match parser.next_event() {
                Ok(Some(e)) => e,
                Ok(None) if ended => break 'read,
                Ok(None) => break,
                Err(_) => break 'read,
            };
            match decoder.decode(event.event, event.data) {
                Ok(Decoded::Chunk(chunk)) => each(chunk),
                Ok(Decoded::Skip) => {}
                Ok(Decoded::Done) | Err(_) => break 'read,
            }
        }
    }
}

/// Chunks as JSON lines (`chat.completion.chunk` objects) folded by the
/// [`Aggregator`], as `NormalizeLayer` folds a reply for a non-stream client.
pub fn aggregator(data: &[u8]) {
    let mut agg = Aggregator::default();
    let mut out = Output::new(data.len());
    for line in data.split(|b| *b == b'\n') {
        if let Ok(chunk) = serde_json::from_slice::<ChatChunk>(line) {
            out.chunk(&chunk);
            agg.push(chunk);
        }
    }
    out.completion(agg);
}

/// The input as the ledger journal a crashed process left (`<db>-ledger`), replayed
/// by [`SqliteStore::open`] into a store holding one key; every `$KEY` in the input
/// is that key's id. The replay may refuse with an error, never panic; once open,
/// every key must still read.
pub fn journal_replay(data: &[u8]) {
    let dir = scratch_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let db = dir.join("fuzz.db");
    let config = StoreConfig {
        url: format!("sqlite://{}", db.display()),
        sync: SyncMode::Normal,
        ..Default::default()
    };
    let id = {
        let store = SqliteStore::open(&config).expect("a fresh store opens");
        let key = store
            .create(
                crate::store::hash_secret("sk-fuzz"),
                NewKey::new("fuzz", Money::from_pico(crate::money::PICO_PER_USD)),
            )
            .expect("a key is created");
        key.record.id.clone()
    };
    let journal = replace_all(data, b"$KEY", id.as_bytes());
    std::fs::write(ledger_path(&db), &journal).expect("the journal is written");
    if let Ok(store) = SqliteStore::open(&config) {
        let keys = store
            .list()
            .unwrap_or_else(|e| panic!("after a replay the keys cannot be listed: {e}"));
        for k in &keys {
            if let Err(e) = store.balance(&k.record.id) {
                panic!("after a replay key {} has no balance: {e}", k.record.id);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn ledger_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-ledger");
    PathBuf::from(p)
}

/// A directory of this call's own (fuzzers run several processes, tests several
/// threads), in memory where there is a tmpfs.
fn scratch_dir() -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("switchboard-fuzz-{}-{call}", std::process::id()))
}

fn replace_all(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut rest = data;
    while let Some(i) = memchr::memmem::find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The JSON the gateway writes for what an input decoded to, checked against
/// serde_json and against the input's size.
struct Output {
    written: usize,
    bound: usize,
}

impl Output {
    fn new(input: usize) -> Self {
        Output {
            written: 0,
            bound: input.saturating_mul(AMPLIFICATION).saturating_add(SLACK),
        }
    }

    fn add(&mut self, bytes: usize, what: &str) {
        self.written += bytes;
        assert!(
            self.written <= self.bound,
            "{} bytes of output ({what}) for an input that allows {}",
            self.written,
            self.bound
        );
    }

    /// A chunk's `choices` and `usage`, as a stream client gets them.
    fn chunk(&mut self, chunk: &ChatChunk) {
        let mut out = Vec::new();
        ChunkChoice::write_json_list(&chunk.choices, &mut out);
        same_json(&out, &chunk.choices, "a chunk's choices");
        self.add(out.len(), "stream chunks");
        if let Some(u) = &chunk.usage {
            out.clear();
            u.write_json(&mut out);
            same_json(&out, u, "a chunk's usage");
        }
    }

    /// The completion a non-stream client gets.
    fn completion(&mut self, agg: Aggregator) {
        let c = agg.finish();
        let mut out = Vec::new();
        c.write_json(&mut out);
        same_json(&out, &c, "a completion");
        self.written = 0;
        self.add(out.len(), "the completion");
    }
}

/// The hand-written JSON of `chat/ser.rs` must be the bytes serde_json writes.
fn same_json<T: serde::Serialize>(ours: &[u8], value: &T, what: &str) {
    let theirs = serde_json::to_vec(value).expect("serializes");
    assert!(
        ours == theirs.as_slice(),
        "the JSON written for {what} differs from serde_json's:\n ours: {}\nserde: {}",
        String::from_utf8_lossy(ours),
        String::from_utf8_lossy(&theirs)
    );
}

/// Read sizes (1 to 64 bytes) drawn from the input's first two bytes.
struct Cuts(u32);

impl Cuts {
    fn split(data: &[u8]) -> (Cuts, &[u8]) {
        match data {
            [a, b, rest @ ..] => (Cuts(u32::from(*a) << 8 | u32::from(*b) | 1), rest),
            _ => (Cuts(1), data),
        }
    }

    fn next(&mut self) -> usize {
        // xorshift32: a fixed sequence for a given seed.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        (self.0 % 64) as usize + 1
    }
}

fn adapter(kind: ProviderKind) -> &'static dyn Adapter {
    match kind {
        ProviderKind::OpenAi => &openai::OpenAiAdapter,
        ProviderKind::Anthropic => &anthropic::AnthropicAdapter,
        ProviderKind::Gemini => &gemini::GeminiAdapter,
        ProviderKind::Mock => panic!("the mock provider has no adapter"),
    }
}

/// A call to the catalog's endpoint of `kind` for a one-message request.
/// [`call_for`] `kind`, asked by a client of `dialect`.
fn call_as(kind: ProviderKind, dialect: Dialect) -> ProviderCall {
    let mut call = call_for(kind);
    Arc::make_mut(&mut call.request).inbound.dialect = dialect;
    call
}

fn call_for(kind: ProviderKind) -> ProviderCall {
    let endpoint: &Arc<Endpoint> = catalog()
        .endpoints()
        .iter()
        .find(|e| e.provider.kind == kind)
        .expect("the fuzzing catalog has every kind");
    ProviderCall {
        endpoint: endpoint.clone(),
        request: Arc::new(ChatRequest {
            model: endpoint.model.to_string(),
            messages: vec![crate::chat::Message::text(crate::chat::Role::User, "hi")],
            ..Default::default()
        }),
        ctx: CallContext::new(),
    }
}

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let config = Config::from_toml(CONFIG).expect("the fuzzing config is valid");
        Catalog::from_config(&config)
    })
}

/// One model per provider kind (`lorem` and `echo` for the mock); the addresses are
/// never connected to.
const CONFIG: &str = r#"
[[providers]]
name = "oa"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key = "sk-upstream-openai"
[[providers]]
name = "an"
kind = "anthropic"
base_url = "http://127.0.0.1:9"
api_key = "sk-upstream-anthropic"
[[providers]]
name = "ge"
kind = "gemini"
base_url = "http://127.0.0.1:9"
api_key = "upstream-gemini"
[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "openai/gpt-4o-mini"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "oa"
  upstream_model = "gpt-4o-mini"
  prompt_usd_per_mtok = 0.15
  completion_usd_per_mtok = 0.6
[[models]]
id = "anthropic/claude"
tokenizer = "cl100k_base"
max_output_tokens = 4096
  [[models.endpoints]]
  provider = "an"
  upstream_model = "claude-sonnet-4"
  prompt_usd_per_mtok = 3
  completion_usd_per_mtok = 15
[[models]]
id = "google/gemini"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "ge"
  upstream_model = "gemini-2.5-flash"
  prompt_usd_per_mtok = 0.3
  completion_usd_per_mtok = 2.5
[[models]]
id = "mock/lorem"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "lorem"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2
[[models]]
id = "mock/echo"
tokenizer = "o200k_base"
  [[models.endpoints]]
  provider = "mock"
  upstream_model = "echo"
  prompt_usd_per_mtok = 1
  completion_usd_per_mtok = 2
"#;
