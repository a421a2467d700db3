//! The layer over a fake inner service that does what Normalize and Credit do to it:
//! a 200 whose body's last frame comes after the settlement is parked (or an error).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use futures_util::StreamExt;
use tower::service_fn;

use super::*;
use crate::config::StoreConfig;
use crate::credit::ParkedSettlement;
use crate::store::{
    hash_secret, Generation, KeyStore, NewKey, Settlement, SqliteStore, StoreError,
};

struct Fixture {
    store: Arc<SqliteStore>,
    key: Arc<KeyRecord>,
    calls: Arc<AtomicUsize>,
    /// Each call waits for a permit before answering.
    gate: Arc<tokio::sync::Semaphore>,
    /// The status of the answers (200: a stream with a parked settlement).
    status: Arc<AtomicUsize>,
    now: Arc<AtomicU64>,
}

fn fixture() -> Fixture {
    let store = SqliteStore::open(&StoreConfig {
        url: "sqlite::memory:".into(),
        ..Default::default()
    })
    .unwrap();
    let key = store
        .create(
            hash_secret("sk-idem"),
            NewKey::new("idem", "1".parse().unwrap()),
        )
        .unwrap();
    // Loads the key's account: the ledger keeps spending in memory from here on.
    store.balance(&key.record.id).unwrap();
    Fixture {
        store,
        key: Arc::new(key.record),
        calls: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(1000)),
        status: Arc::new(AtomicUsize::new(200)),
        now: Arc::new(AtomicU64::new(1_000_000)),
    }
}

fn settlement(key_id: &str, id: &str) -> Settlement {
    Settlement {
        key_id: key_id.into(),
        reserved: Money::from_pico(1_000_000).into(),
        tokens: 3,
        generation: Generation {
            id: id.into(),
            key_id: key_id.into(),
            model: "m/x".into(),
            provider: "p".into(),
            streamed: true,
            prompt_tokens: 1,
            completion_tokens: 2,
            total_cost: Money::from_pico(1_000_000),
            latency_ms: 1,
            ttft_ms: None,
            attempts: vec![],
            finish_reason: Some("stop".into()),
            created: 1,
            ..Default::default()
        },
    }
}

use crate::money::Money;

type Svc = Idempotency<tower::util::BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>>;

impl Fixture {
    /// The layer over the fake inner service.
    fn service(&self) -> Svc {
        self.service_on(self.store.clone())
    }

    /// The layer over the fake inner service, both on `ledger`.
    fn service_on(&self, ledger: Arc<dyn Ledger>) -> Svc {
        let (calls, gate, status) = (self.calls.clone(), self.gate.clone(), self.status.clone());
        let layer_ledger = ledger.clone();
        let inner = service_fn(move |req: Request<Body>| {
            // Without an `Idempotency-Key` the layer adds nothing (the context comes
            // from logging, in the gateway).
            let keyed = req.headers().contains_key(IDEMPOTENCY_KEY);
            let ctx = req
                .extensions()
                .get::<CallContext>()
                .cloned()
                .unwrap_or_default();
            let key_id = req.extensions().get::<Arc<KeyRecord>>().unwrap().id.clone();
            let (ledger, gate, status) = (ledger.clone(), gate.clone(), status.clone());
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                assert_eq!(ctx.settlement_deferred(), keyed);
                let _permit = gate.acquire().await.unwrap();
                let status = status.load(Ordering::SeqCst) as u16;
                if status != 200 {
                    return Ok::<_, Infallible>(
                        GatewayError::UpstreamError("every attempt failed".into()).into_response(),
                    );
                }
                let body = String::from_utf8(
                    axum::body::to_bytes(req.into_body(), usize::MAX)
                        .await
                        .unwrap()
                        .to_vec(),
                )
                .unwrap();
                let id = ctx.request_id().to_string();
                let content = format!("data: {{\"id\":\"{id}\",\"echo\":{body}}}\n\n");
                let ctx2 = ctx.clone();
                // As credit does at the stream's end: the settlement is parked,
                // then Normalize writes `[DONE]`.
                let done = futures_util::stream::once(async move {
                    ctx2.park_settlement(ParkedSettlement::new(
                        ledger,
                        settlement(&key_id, ctx2.request_id()),
                    ));
                    Ok::<_, Infallible>(Bytes::from_static(b"data: [DONE]\n\n"))
                });
                let frames =
                    futures_util::stream::once(
                        async move { Ok::<_, Infallible>(Bytes::from(content)) },
                    )
                    .chain(done);
                let mut res = Response::new(Body::from_stream(frames));
                res.headers_mut()
                    .insert("content-type", "text/event-stream".parse().unwrap());
                res.headers_mut()
                    .insert(crate::normalize::X_REQUEST_ID, id.parse().unwrap());
                res.headers_mut()
                    .insert(crate::normalize::X_PROVIDER, "p".parse().unwrap());
                Ok(res)
            }
        });
        let now = self.now.clone();
        IdempotencyLayer::new(layer_ledger)
            .ttl(Duration::from_secs(60))
            .wait_timeout(Duration::from_secs(30))
            .clock(move || now.load(Ordering::SeqCst))
            .layer(tower::util::BoxCloneSyncService::new(inner))
    }

    fn request(&self, idem: Option<&str>, body: &str) -> Request<Body> {
        let mut b = Request::post("/v1/chat/completions");
        if let Some(k) = idem {
            b = b.header(IDEMPOTENCY_KEY, k);
        }
        let mut req = b.body(Body::from(body.to_string())).unwrap();
        req.extensions_mut().insert(self.key.clone());
        req
    }

    fn spent(&self) -> Money {
        self.store.balance(&self.key.id).unwrap().spent
    }
}

async fn call(svc: &Svc, req: Request<Body>) -> Response<Body> {
    svc.clone().oneshot(req).await.unwrap()
}

async fn text(res: Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

async fn code(res: Response<Body>) -> (u16, String) {
    let status = res.status().as_u16();
    let v: serde_json::Value = serde_json::from_str(&text(res).await).unwrap();
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test]
async fn a_repeat_replays_the_answer_byte_for_byte_and_is_not_charged() {
    let f = fixture();
    let svc = f.service();
    let first = call(&svc, f.request(Some("k-1"), r#"{"a":1,"b":[1,2]}"#)).await;
    assert_eq!(first.status(), 200);
    let first_id = first.headers()["x-request-id"].clone();
    assert!(first.headers().get(IDEMPOTENT_REPLAYED).is_none());
    let first_text = text(first).await;
    assert!(first_text.ends_with("data: [DONE]\n\n"), "{first_text}");
    let spent = f.spent();
    assert_eq!(spent, Money::from_pico(1_000_000));

    // Same JSON value, other key order and whitespace.
    let again = call(&svc, f.request(Some("k-1"), r#"{ "b": [1, 2], "a": 1 }"#)).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(again.headers()["x-request-id"], first_id);
    assert_eq!(again.headers()["content-type"], "text/event-stream");
    assert_eq!(again.headers()["x-provider"], "p");
    assert_eq!(text(again).await, first_text);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    assert_eq!(f.spent(), spent);

    // Another key (or no key at all) runs.
    let other = call(&svc, f.request(Some("k-2"), r#"{"a":1,"b":[1,2]}"#)).await;
    assert!(other.headers().get(IDEMPOTENT_REPLAYED).is_none());
    text(other).await;
    text(call(&svc, f.request(None, r#"{"a":1,"b":[1,2]}"#)).await).await;
    assert_eq!(f.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_last_frame_goes_out_only_after_the_charge_and_record_are_committed() {
    let f = fixture();
    let svc = f.service();
    let res = call(&svc, f.request(Some("k-last"), "{}")).await;
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert_eq!(
        f.spent(),
        Money::ZERO,
        "not settled before the upstream end"
    );
    let last = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&last[..], b"data: [DONE]\n\n");
    // By the time `[DONE]` is out, both are committed.
    assert_eq!(f.spent(), Money::from_pico(1_000_000));
    let rec = f
        .store
        .idempotency_record(&f.key.id, "k-last", f.now.load(Ordering::SeqCst))
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(rec.body.len(), first.len() + last.len());
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn a_concurrent_repeat_waits_for_the_first_and_gets_its_answer() {
    let f = fixture();
    let svc = f.service();
    let gate = f.gate.clone();
    let held = gate.acquire_many(1000).await.unwrap();
    let first = tokio::spawn({
        let (svc, req) = (svc.clone(), f.request(Some("k-c"), r#"{"q":1}"#));
        async move { text(call(&svc, req).await).await }
    });
    // The first is inside the inner service, waiting at the gate.
    while f.calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let repeat = tokio::spawn({
        let (svc, req) = (svc.clone(), f.request(Some("k-c"), r#"{"q":1}"#));
        async move {
            let res = call(&svc, req).await;
            (
                res.headers().get(IDEMPOTENT_REPLAYED).cloned(),
                text(res).await,
            )
        }
    });
    // Meanwhile another body with the same key is refused at once.
    let (status, c) = code(call(&svc, f.request(Some("k-c"), r#"{"q":2}"#)).await).await;
    assert_eq!((status, c.as_str()), (422, "idempotency_key_reused"));
    assert!(!repeat.is_finished());
    drop(held);
    let first = first.await.unwrap();
    let (replayed, again) = repeat.await.unwrap();
    assert_eq!(replayed.unwrap(), "true");
    assert_eq!(again, first);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    assert_eq!(f.spent(), Money::from_pico(1_000_000));
    assert_eq!(svc.layer.flights.len(), 0);
}

#[tokio::test]
async fn a_different_body_with_a_used_key_is_422() {
    let f = fixture();
    let svc = f.service();
    text(call(&svc, f.request(Some("k-d"), r#"{"q":1}"#)).await).await;
    let (status, c) = code(call(&svc, f.request(Some("k-d"), r#"{"q":1,"r":2}"#)).await).await;
    assert_eq!((status, c.as_str()), (422, "idempotency_key_reused"));
    // Another path with the same body is another request, too.
    let mut req = f.request(Some("k-d"), r#"{"q":1}"#);
    *req.uri_mut() = "/v1/embeddings".parse().unwrap();
    assert_eq!(code(call(&svc, req).await).await.0, 422);
    // `/api/v1` is the same endpoint as `/v1`.
    let mut req = f.request(Some("k-d"), r#"{"q":1}"#);
    *req.uri_mut() = "/api/v1/chat/completions".parse().unwrap();
    let res = call(&svc, req).await;
    assert_eq!(res.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_error_is_not_recorded_and_the_retry_runs() {
    let f = fixture();
    let svc = f.service();
    f.status.store(502, Ordering::SeqCst);
    let (status, _) = code(call(&svc, f.request(Some("k-e"), "{}")).await).await;
    assert_eq!(status, 502);
    f.status.store(200, Ordering::SeqCst);
    let res = call(&svc, f.request(Some("k-e"), "{}")).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().get(IDEMPOTENT_REPLAYED).is_none());
    text(res).await;
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    let res = call(&svc, f.request(Some("k-e"), "{}")).await;
    assert_eq!(res.headers()[IDEMPOTENT_REPLAYED], "true");
}

#[tokio::test]
async fn a_client_gone_before_the_end_leaves_no_record_and_the_retry_runs() {
    let f = fixture();
    let svc = f.service();
    let res = call(&svc, f.request(Some("k-g"), "{}")).await;
    let mut body = res.into_body();
    let _first = body.frame().await.unwrap().unwrap();
    drop(body);
    f.store.flush().await;
    // Nothing was parked yet: nothing charged, no record, the claim is free.
    assert_eq!(f.spent(), Money::ZERO);
    let res = call(&svc, f.request(Some("k-g"), "{}")).await;
    assert!(res.headers().get(IDEMPOTENT_REPLAYED).is_none());
    text(res).await;
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_answer_is_replayed_for_ttl_then_runs_again() {
    let f = fixture();
    let svc = f.service();
    text(call(&svc, f.request(Some("k-t"), "{}")).await).await;
    f.now.fetch_add(59, Ordering::SeqCst);
    let res = call(&svc, f.request(Some("k-t"), "{}")).await;
    assert_eq!(res.headers()[IDEMPOTENT_REPLAYED], "true");
    f.now.fetch_add(1, Ordering::SeqCst);
    let res = call(&svc, f.request(Some("k-t"), "{}")).await;
    assert!(res.headers().get(IDEMPOTENT_REPLAYED).is_none());
    text(res).await;
    assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    // The store purges what expired by then: the second answer's record stays.
    f.store.flush().await;
    let now = f.now.load(Ordering::SeqCst);
    assert_eq!(f.store.purge_idempotency(now).await.unwrap(), 0);
    assert_eq!(f.store.purge_idempotency(now + 60).await.unwrap(), 1);
}

#[tokio::test]
async fn malformed_keys_are_400() {
    let f = fixture();
    let svc = f.service();
    let long = "x".repeat(MAX_KEY_LEN + 1);
    for bad in ["", long.as_str(), "tab\there"] {
        let mut req = f.request(None, "{}");
        req.headers_mut()
            .insert(IDEMPOTENCY_KEY, http::HeaderValue::from_str(bad).unwrap());
        let (status, c) = code(call(&svc, req).await).await;
        assert_eq!((status, c.as_str()), (400, "invalid_request"), "{bad:?}");
    }
    let mut req = f.request(None, "{}");
    req.headers_mut().insert(
        IDEMPOTENCY_KEY,
        http::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
    );
    assert_eq!(code(call(&svc, req).await).await.0, 400);
    let mut req = f.request(Some("a"), "{}");
    req.headers_mut()
        .append(IDEMPOTENCY_KEY, http::HeaderValue::from_static("b"));
    assert_eq!(code(call(&svc, req).await).await.0, 400);
    // 255 printable characters are fine.
    let ok = "~".repeat(MAX_KEY_LEN);
    let res = call(&svc, f.request(Some(&ok), "{}")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
}

/// A ledger over `inner` whose combined commit of a charge and its record fails as
/// *unavailable* while both stay queued (what PostgreSQL's spill file does), until
/// the test lets them [land](Queueing::land). Counts its record lookups.
struct Queueing {
    inner: Arc<SqliteStore>,
    queued: std::sync::Mutex<Vec<(Settlement, IdempotencyRecord)>>,
    looks: tokio::sync::watch::Sender<usize>,
}

impl Queueing {
    /// The queued charges and records reach the store.
    async fn land(&self) {
        let queued = std::mem::take(&mut *self.queued.lock().unwrap());
        for (s, r) in queued {
            assert!(self.inner.settle_recorded(s, r).await.unwrap(), "charged");
        }
    }
}

impl Ledger for Queueing {
    fn reserve(&self, key: &KeyRecord, hold: crate::store::Reservation) -> crate::store::Admission {
        Ledger::reserve(&*self.inner, key, hold)
    }
    fn release(&self, key_id: &str, hold: crate::store::Reservation) {
        self.inner.release(key_id, hold)
    }
    fn settle(&self, s: Settlement) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.inner.settle(s)
    }
    fn settle_detached(&self, s: Settlement) {
        self.inner.settle_detached(s)
    }
    fn flush(&self) -> BoxFuture<'static, ()> {
        self.inner.flush()
    }
    fn balance(&self, key_id: &str) -> Result<crate::store::Balance, StoreError> {
        self.inner.balance(key_id)
    }
    fn tokens_today(&self, key_id: &str) -> Result<u64, StoreError> {
        self.inner.tokens_today(key_id)
    }
    fn top_up(
        &self,
        key_id: &str,
        amount: Money,
    ) -> Result<Option<crate::store::Balance>, StoreError> {
        self.inner.top_up(key_id, amount)
    }
    fn generation(&self, id: &str) -> Result<Option<Generation>, StoreError> {
        self.inner.generation(id)
    }
    fn keeps_idempotency_records(&self) -> bool {
        true
    }
    fn settle_recorded(
        &self,
        s: Settlement,
        record: IdempotencyRecord,
    ) -> BoxFuture<'static, Result<bool, StoreError>> {
        self.queued.lock().unwrap().push((s, record));
        Box::pin(std::future::ready(Err(StoreError::unavailable(
            "PostgreSQL does not answer; the charge is kept in the spill file",
        ))))
    }
    fn idempotency_record(
        &self,
        key_id: &str,
        idem_key: &str,
        now: u64,
    ) -> BoxFuture<'static, Result<Option<IdempotencyRecord>, StoreError>> {
        self.looks.send_modify(|n| *n += 1);
        self.inner.idempotency_record(key_id, idem_key, now)
    }
    fn idempotency_lock(
        &self,
        key_id: &str,
        idem_key: &str,
    ) -> BoxFuture<'static, Result<Option<IdempotencyLock>, StoreError>> {
        self.inner.idempotency_lock(key_id, idem_key)
    }
}

/// `keep_claims_until_recorded`: the combined commit of charge and record fails as
/// unavailable, but both stay queued. The client's answer is cut; a repeat sent
/// meanwhile waits (it neither runs nor is charged) until the record can be read
/// back, then replays it.
#[tokio::test]
async fn an_unconfirmed_commit_keeps_repeats_waiting_until_its_record_lands() {
    let f = fixture();
    let ledger = Arc::new(Queueing {
        inner: f.store.clone(),
        queued: Default::default(),
        looks: tokio::sync::watch::Sender::new(0),
    });
    let svc = f.service_on(ledger.clone());
    let patience = Duration::from_secs(30);

    let first = call(&svc, f.request(Some("k-q"), r#"{"q":1}"#)).await;
    assert_eq!(first.status(), 200);
    let first_id = first.headers()["x-request-id"].clone();
    let cut = first.into_body().collect().await;
    let e = cut.expect_err("the end is not sent for an unconfirmed charge");
    assert!(e.to_string().contains("could not record"), "{e}");
    assert_eq!(ledger.queued.lock().unwrap().len(), 1);
    assert_eq!(f.spent(), Money::ZERO, "nothing landed yet");
    // The claims are held by the task waiting for the record, not released.
    assert_eq!(svc.layer.flights.len(), 1);

    let repeat = tokio::spawn({
        let (svc, req) = (svc.clone(), f.request(Some("k-q"), r#"{"q":1}"#));
        async move {
            let res = call(&svc, req).await;
            let replayed = res.headers().get(IDEMPOTENT_REPLAYED).cloned();
            let id = res.headers().get("x-request-id").cloned();
            (res.status(), replayed, id, text(res).await)
        }
    });
    tokio::time::timeout(patience, async {
        while svc.layer.flights.waiting_now() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the repeat waits for the first");
    // The task looks for the record again (and finds none) while the repeat waits.
    let mut looks = ledger.looks.subscribe();
    let seen = *looks.borrow_and_update();
    tokio::time::timeout(patience, looks.wait_for(|n| *n > seen))
        .await
        .expect("the task looks again")
        .unwrap();
    assert!(!repeat.is_finished(), "the repeat did not wait");
    assert_eq!(svc.layer.flights.waiting_now(), 1);
    assert_eq!(f.calls.load(Ordering::SeqCst), 1, "the repeat did not run");
    assert_eq!(f.spent(), Money::ZERO);

    // The queued charge and record land: the task finds the record, the repeat replays.
    ledger.land().await;
    assert_eq!(f.spent(), Money::from_pico(1_000_000));
    let (status, replayed, id, body) = tokio::time::timeout(patience, repeat)
        .await
        .expect("the repeat ends once the record is there")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(replayed.unwrap(), "true");
    assert_eq!(id.unwrap(), first_id);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(f.calls.load(Ordering::SeqCst), 1);
    f.store.flush().await;
    assert_eq!(f.spent(), Money::from_pico(1_000_000), "charged once");
    assert_eq!(svc.layer.flights.len(), 0);
    assert_eq!(svc.layer.flights.waiting_now(), 0);
}

/// `keep_claims_until_recorded` is bounded: a queued record that never lands is waited
/// for until it would have expired (past that it would not be replayed anyway), then
/// the claims are let go and a repeat runs again.
#[tokio::test]
async fn claims_kept_for_a_record_that_never_lands_end_when_it_would_have_expired() {
    let f = fixture();
    let ledger = Arc::new(Queueing {
        inner: f.store.clone(),
        queued: Default::default(),
        looks: tokio::sync::watch::Sender::new(0),
    });
    let svc = f.service_on(ledger.clone());
    let patience = Duration::from_secs(30);

    let first = call(&svc, f.request(Some("k-never"), r#"{"q":1}"#)).await;
    assert!(
        first.into_body().collect().await.is_err(),
        "the answer is cut"
    );
    assert_eq!(ledger.queued.lock().unwrap().len(), 1);
    // Still within the record's 60 s: the task looks again and keeps the claims.
    let mut looks = ledger.looks.subscribe();
    let seen = *looks.borrow_and_update();
    tokio::time::timeout(patience, looks.wait_for(|n| *n > seen))
        .await
        .expect("the task looks again")
        .unwrap();
    assert_eq!(
        svc.layer.flights.len(),
        1,
        "claims kept while the record may land"
    );
    // Past the record's expiry (the layer's ttl is 60 s): the claims are let go.
    f.now.fetch_add(61, Ordering::SeqCst);
    tokio::time::timeout(patience, async {
        while svc.layer.flights.len() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the claims end once the record would have expired");
    // A repeat now runs (nothing was recorded).
    let again = call(&svc, f.request(Some("k-never"), r#"{"q":1}"#)).await;
    assert!(again.headers().get(IDEMPOTENT_REPLAYED).is_none());
    assert_eq!(f.calls.load(Ordering::SeqCst), 2, "the repeat ran");
}
