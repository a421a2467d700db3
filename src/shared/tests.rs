use super::*;
use crate::testing;
use std::net::SocketAddr;
use std::sync::Mutex;
use tokio::net::{TcpListener, TcpStream};

/// Options for tests on a busy machine: a generous call timeout, quick pings.
pub(crate) fn options() -> SharedOptions {
    SharedOptions {
        timeout: Duration::from_secs(2),
        ping_every: Duration::from_millis(200),
    }
}

/// A shared state on `url` under `prefix` that has answered once.
pub(crate) async fn open_at(url: &str, prefix: &str) -> SharedState {
    let s = SharedState::open_with(url, prefix, options()).unwrap();
    assert!(
        s.wait_up(Duration::from_secs(10)).await,
        "Redis at {url} did not answer"
    );
    s
}

/// A shared state on the test Redis and prefix that has answered once.
pub(crate) async fn open(r: &testing::TestRedis) -> SharedState {
    open_at(r.url(), r.prefix()).await
}

/// Polls `cond` every 10 ms until it holds (true) or `within` has passed (false).
pub(crate) async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP proxy in front of the test Redis that can cut every connection and refuse
/// new ones (Redis "goes away" for its clients only), then let them through again.
pub(crate) struct Proxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start(redis_url: &str) -> Proxy {
        let target = redis_url
            .strip_prefix("redis://")
            .expect("a redis:// test URL")
            .split('/')
            .next()
            .unwrap()
            .rsplit('@')
            .next()
            .unwrap()
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let (o, c) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees its connection closed
                }
                let (target, mut cut) = (target.clone(), c.subscribe());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            open,
            cut,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub(crate) fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub(crate) fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

#[test]
fn bad_urls_and_a_missing_runtime_are_clear_errors() {
    for (url, words) in [
        ("http://127.0.0.1:6379", "not a Redis URL"),
        ("127.0.0.1:6379", "not a Redis URL"),
        ("redis://h:notaport", "not a valid Redis URL"),
    ] {
        let err = check_url(url).unwrap_err();
        assert!(err.contains(words), "{url}: {err}");
    }
    assert!(check_url("redis://127.0.0.1:6379/3").is_ok());
    assert!(check_url("unix:///run/redis.sock").is_ok());
    // TLS (rustls, the system's certificate store).
    assert!(check_url("rediss://:pw@cache.example:6380/0").is_ok());
    assert_eq!(shown("redis://u:pw@h:1/0"), "redis://***@h:1/0");
    // Built outside a runtime: said, not a panic.
    let err = SharedState::open("redis://127.0.0.1:6379", "p:").unwrap_err();
    assert!(matches!(err, SharedError::NoRuntime), "{err}");
    assert!(err.to_string().contains("tokio runtime"));
}

#[tokio::test]
async fn events_reach_every_instance_and_calls_are_counted() {
    let Some(r) = testing::redis("events_reach_every_instance_and_calls_are_counted") else {
        return;
    };
    let (a, b) = (open(&r).await, open(&r).await);
    assert_eq!(a.key("x"), format!("{}x", r.prefix()));
    assert_ne!(a.instance_id(), b.instance_id());
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let subscribed = Arc::new(AtomicU64::new(0));
    let (s2, n2) = (seen.clone(), subscribed.clone());
    b.listen("t", move |n| match n {
        Notice::Subscribed => {
            n2.fetch_add(1, Ordering::SeqCst);
        }
        Notice::Message(m) => s2.lock().unwrap().push(m.to_string()),
    });
    // Told it is subscribed (now, or as soon as it is), then only its topic's events.
    assert!(
        eventually(Duration::from_secs(5), || subscribed.load(Ordering::SeqCst)
            >= 1)
        .await
    );
    let before = a.calls();
    a.publish("other", "no").await.unwrap();
    a.publish("t", "hello world").await.unwrap();
    assert_eq!(a.calls(), before + 2);
    assert!(
        eventually(Duration::from_secs(1), || !seen.lock().unwrap().is_empty()).await,
        "the event did not arrive within 1 s"
    );
    assert_eq!(*seen.lock().unwrap(), ["hello world"]);
    assert!(a.is_up() && b.is_up());
}

#[tokio::test]
async fn redis_down_is_noticed_and_calls_fail_fast() {
    // A TLS URL to a server that does not speak TLS (the test Redis, if any): the
    // handshake fails, and that is Redis down too, not a panic.
    let plain = testing::redis_url().replacen("redis://", "rediss://", 1);
    let tls = SharedState::open_with(&plain, "down:", options()).unwrap();
    let s = SharedState::open_with("redis://127.0.0.1:1", "down:", options()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !s.is_available()).await,
        "a refused connection is Redis down"
    );
    assert!(!s.is_up());
    let started = tokio::time::Instant::now();
    let err = s
        .call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
        .await
        .unwrap_err();
    assert!(matches!(err, SharedError::Unavailable(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(eventually(Duration::from_secs(5), || !tls.is_available()).await);
}

#[tokio::test]
async fn a_lost_connection_recovers_by_itself() {
    let Some(r) = testing::redis("a_lost_connection_recovers_by_itself") else {
        return;
    };
    let proxy = Proxy::start(r.url()).await;
    let s = open_at(&proxy.url(), r.prefix()).await;
    let direct = open(&r).await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let subscribed = Arc::new(AtomicU64::new(0));
    let (s2, n2) = (seen.clone(), subscribed.clone());
    s.listen("t", move |n| match n {
        Notice::Subscribed => {
            n2.fetch_add(1, Ordering::SeqCst);
        }
        Notice::Message(m) => s2.lock().unwrap().push(m.to_string()),
    });
    assert!(
        eventually(Duration::from_secs(5), || subscribed.load(Ordering::SeqCst)
            == 1)
        .await
    );

    // Redis goes away: noticed (by the ping) without any call.
    proxy.cut();
    assert!(
        eventually(Duration::from_secs(5), || !s.is_up()).await,
        "the outage was not noticed"
    );
    assert!(!s.is_available());
    direct.publish("t", "missed").await.unwrap();

    // It comes back: noticed, re-subscribed (listeners told to catch up), usable.
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(10), || s.is_up()).await,
        "Redis back was not noticed"
    );
    assert!(
        eventually(Duration::from_secs(10), || subscribed
            .load(Ordering::SeqCst)
            == 2)
        .await,
        "not re-subscribed"
    );
    let pong: String = s
        .call(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
        .await
        .unwrap();
    assert_eq!(pong, "PONG");
    direct.publish("t", "after").await.unwrap();
    assert!(eventually(Duration::from_secs(2), || !seen.lock().unwrap().is_empty()).await);
    assert_eq!(*seen.lock().unwrap(), ["after"]);
}
