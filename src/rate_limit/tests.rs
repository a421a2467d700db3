use super::*;
use tower::{service_fn, ServiceExt};

fn svc(
    layer: &RateLimitLayer,
) -> impl Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone {
    layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    }))
}

fn req(key: &Arc<KeyRecord>) -> Request<()> {
    let mut r = Request::new(());
    r.extensions_mut().insert(key.clone());
    r
}

#[tokio::test(start_paused = true)]
async fn rpm_is_exhausted_then_refills_with_time() {
    let layer = RateLimitLayer::new();
    let s = svc(&layer);
    let alice = Arc::new(KeyRecord {
        rpm: Some(3),
        ..KeyRecord::new("key_a", "alice")
    });
    let bob = Arc::new(KeyRecord {
        rpm: Some(600),
        ..KeyRecord::new("key_b", "bob")
    });
    for _ in 0..3 {
        assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    }
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    // One request comes back every 20 s.
    assert_eq!(res.headers()["retry-after"], "20");
    // Other keys have their own budget.
    assert_eq!(s.clone().oneshot(req(&bob)).await.unwrap().status(), 200);

    tokio::time::advance(Duration::from_secs(19)).await;
    let res = s.clone().oneshot(req(&alice)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 200);
    assert_eq!(s.clone().oneshot(req(&alice)).await.unwrap().status(), 429);
}

#[tokio::test(start_paused = true)]
async fn keys_without_rpm_and_requests_without_keys_pass() {
    let layer = RateLimitLayer::new();
    let s = svc(&layer);
    let free = Arc::new(KeyRecord::new("key_f", "free"));
    for _ in 0..1000 {
        assert_eq!(s.clone().oneshot(req(&free)).await.unwrap().status(), 200);
    }
    assert_eq!(
        s.clone().oneshot(Request::new(())).await.unwrap().status(),
        200
    );
}
