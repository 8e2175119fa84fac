//! Backends added behind DNS: a long-lived client never sends them a
//! request; the same client under `RotatingClientLayer` does after its
//! next rotation.
//!
//! Three [`Backends`] on 127.0.0.1-3 answer for one made-up name, through
//! the client's own resolver hook ([`ScaleUpDns`]), which lists only
//! backend 1 until the change and then all three, round robin. Each client
//! kind runs the same scenario three times: built once (the control), and
//! under `RotatingClientLayer` with a TTL of a day, rotated either by
//! `rotate()` at chosen points or by a probe of the same resolver every
//! [`PROBE_PERIOD`], which must rotate exactly once, within three periods
//! of the change.
//!
//! The client kinds, each over HTTP/1.1 and HTTP/2 (h2c, prior knowledge):
//! hyper-util's legacy `Client` (resolver: `HttpConnector::new_with_resolver`),
//! and with the `reqwest` feature `reqwest::Client` (resolver:
//! `ClientBuilder::dns_resolver`), through the layer with reqwest's own
//! `Request` and `Response`.
//!
//! Why the control cannot move: an HTTP/2 client keeps its one connection;
//! an HTTP/1.1 pool opens a connection (and so resolves) only when a
//! request finds no idle one. The warm-up runs [`WARM_LOOPS`] requests at
//! once, so the pool holds at least that many connections; after the
//! change only [`LOOPS`] loops run, and each holds at most two connections
//! (one busy, one on its way back to the pool), so an idle one is always
//! there. The test runs on a current-thread runtime, where a connection's
//! way back to the pool is a task already queued when its response ends.
//! reqwest's client is hyper-util's legacy client inside, with the same
//! pool, and its defaults keep every idle connection
//! (`pool_max_idle_per_host` is `usize::MAX`) for 90 s
//! (`pool_idle_timeout`), far longer than a scenario runs; its system
//! proxy lookup is off (`no_proxy`), so the made-up name always reaches
//! the resolver.
//!
//! A new client kind plugs in as one more [`Sender`] and a pair of tests.

mod test_utils;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::Body;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use test_utils::*;
use tower::{Service, ServiceExt};
use tower_layer::Layer;
use tower_rotating_client::{Probe, RotatingClient, RotatingClientLayer};

/// Concurrent loops of the warm-up, before the change.
const WARM_LOOPS: usize = 16;
/// Requests per warm-up loop.
const WARM_REQUESTS: usize = 4;
/// Concurrent loops after the change (at most `WARM_LOOPS / 2 - 1`, see
/// the module docs).
const LOOPS: usize = 4;
/// Rounds after the change; the rotating client rotates before each one.
const ROUNDS: usize = 6;
/// Requests per loop and round.
const REQUESTS: usize = 15;
/// Bounds one request.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// A TTL that never expires during a test: rotation is by `rotate()` or
/// the probe only.
const NEVER: Duration = Duration::from_secs(24 * 60 * 60);
/// How often the probe variant looks at the resolver.
const PROBE_PERIOD: Duration = Duration::from_millis(200);

/// The response of every request: one chunk of two bytes, at once.
const PATH: &str = "/?chunks=1&chunk-delay-ms=0&chunk-size=2";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One client under test: sends a GET to the URI and returns the body.
type Sender = Arc<dyn Fn(Uri) -> BoxFuture<Result<Vec<u8>, BoxError>> + Send + Sync>;

/// A client under test, and how it renews itself.
struct UnderTest {
    send: Sender,
    renewal: Renewal,
}

/// How a client under test renews itself.
enum Renewal {
    /// It does not: the control.
    None,
    /// The scenario calls `rotate()` before each round.
    Rotate(Box<dyn Fn() -> BoxFuture<()>>),
    /// A probe of the resolver rotates it; this reads its rotations.
    Probe(Box<dyn Fn() -> u64 + Send>),
}

/// A [`Sender`] for any tower HTTP client (hyper-util's `Client`, or a
/// `RotatingClient` over one).
fn tower_sender<S, B>(client: S) -> Sender
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    Arc::new(move |uri| {
        let client = client.clone();
        Box::pin(async move {
            let request = Request::get(uri).body(Empty::new())?;
            let response = client.oneshot(request).await.map_err(Into::into)?;
            read_body(response.into_body()).await
        })
    })
}

/// The `rotate` of a scenario's rotating client.
fn rotation<S>(client: RotatingClient<S>) -> Renewal
where
    S: Clone + Send + Sync + 'static,
{
    Renewal::Rotate(Box::new(move || {
        let client = client.clone();
        Box::pin(async move {
            client.rotate().await.expect("rotate builds a client");
        })
    }))
}

/// The probe variant's renewal: reads the client's rotations.
fn probed<S: Send + 'static>(client: RotatingClient<S>) -> Renewal {
    Renewal::Probe(Box::new(move || client.stats().rotations))
}

/// A probe of the scenario's resolver, as `Probe::dns` would look at a
/// real name: answers compared as sets, rotating when one adds an
/// address.
fn dns_probe(dns: ScaleUpDns) -> Probe<BTreeSet<SocketAddr>> {
    Probe::new(PROBE_PERIOD, move || {
        std::future::ready(dns.lookup(BACKENDS_HOST).map(BTreeSet::from_iter))
    })
    .changed_when(|seen, now| !now.is_subset(seen))
}

/// What one scenario measured.
struct Outcome {
    /// Requests each backend served after the change, backend 1 first.
    after_change: [usize; 3],
    /// Failed requests, one line each, over the whole scenario.
    failed: Vec<String>,
}

impl Outcome {
    fn new_share(&self) -> f64 {
        let total: usize = self.after_change.iter().sum();
        (self.after_change[1] + self.after_change[2]) as f64 / total as f64
    }
}

/// `loops` concurrent loops of `requests` requests each; failures returned.
async fn load(send: &Sender, uri: &Uri, loops: usize, requests: usize) -> Vec<String> {
    let expected = expected_body(1, 2);
    let tasks: Vec<_> = (0..loops)
        .map(|_| {
            let (send, uri, expected) = (Arc::clone(send), uri.clone(), expected.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..requests {
                    match tokio::time::timeout(REQUEST_LIMIT, send(uri.clone())).await {
                        Ok(Ok(body)) if body == expected => {}
                        Ok(Ok(body)) => failed.push(format!("wrong body: {body:?}")),
                        Ok(Err(e)) => failed.push(e.to_string()),
                        Err(_) => failed.push("timed out".to_owned()),
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for task in tasks {
        failed.extend(task.await.expect("a request loop panicked"));
    }
    failed
}

/// The scenario: warm up against backend 1, list all three, then
/// [`ROUNDS`] rounds of load, each after a rotation if the client rotates.
async fn scale_up(make: impl FnOnce(ScaleUpDns) -> UnderTest) -> Outcome {
    let backends = Backends::start().await;
    let dns = ScaleUpDns::new(backends.addrs());
    let client = make(dns.clone());
    let uri = backends.uri(PATH);

    let mut failed = load(&client.send, &uri, WARM_LOOPS, WARM_REQUESTS).await;
    assert_eq!(
        backends.requests(),
        [WARM_LOOPS * WARM_REQUESTS, 0, 0],
        "before the change every request goes to backend 1"
    );
    // Let the warm-up's connections reach the pool.
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    if let Renewal::Probe(rotations) = &client.renewal {
        assert_eq!(rotations(), 0, "probe: no rotation before the change");
    }
    dns.scale_up();
    let before = backends.requests();
    if let Renewal::Probe(rotations) = &client.renewal {
        tokio::time::sleep(3 * PROBE_PERIOD).await;
        assert_eq!(
            rotations(),
            1,
            "probe: one rotation within three periods of the change"
        );
    }
    for _ in 0..ROUNDS {
        if let Renewal::Rotate(rotate) = &client.renewal {
            rotate().await;
        }
        failed.extend(load(&client.send, &uri, LOOPS, REQUESTS).await);
    }
    if let Renewal::Probe(rotations) = &client.renewal {
        assert_eq!(rotations(), 1, "probe: exactly one rotation in all");
    }
    let now = backends.requests();
    Outcome {
        after_change: [0, 1, 2].map(|i| now[i] - before[i]),
        failed,
    }
}

/// Runs the scenario for the control and the rotating client of one kind
/// and checks both.
async fn check(
    kind: &str,
    control: impl FnOnce(ScaleUpDns) -> UnderTest,
    rotating: impl FnOnce(ScaleUpDns) -> UnderTest,
) {
    let after = LOOPS * ROUNDS * REQUESTS;
    let outcome = scale_up(control).await;
    assert_eq!(
        outcome.failed,
        Vec::<String>::new(),
        "{kind}, control: failed requests"
    );
    assert_eq!(
        outcome.after_change,
        [after, 0, 0],
        "{kind}, control: a client built once stays on backend 1 after the change"
    );

    println!(
        "{kind}: control after the change {:?}",
        outcome.after_change
    );
    check_rotating(kind, rotating).await;
}

/// Runs the scenario for a rotating client and checks it moved traffic.
async fn check_rotating(kind: &str, rotating: impl FnOnce(ScaleUpDns) -> UnderTest) {
    let after = LOOPS * ROUNDS * REQUESTS;
    let outcome = scale_up(rotating).await;
    assert_eq!(
        outcome.failed,
        Vec::<String>::new(),
        "{kind}, rotating: no request may fail"
    );
    assert_eq!(
        outcome.after_change.iter().sum::<usize>(),
        after,
        "{kind}, rotating: every request after the change counted"
    );
    let share = outcome.new_share();
    assert!(
        share >= 1.0 / 3.0,
        "{kind}, rotating: the new backends got {:.1}% of the requests after the change ({:?}), want at least a third",
        share * 100.0,
        outcome.after_change
    );
    println!(
        "{kind}: rotating client sent {:.1}% to the new backends after the change {:?}",
        share * 100.0,
        outcome.after_change
    );
}

fn hyper_util_client(
    dns: ScaleUpDns,
    http2_only: bool,
) -> Client<HttpConnector<ScaleUpDns>, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2_only)
        .build(HttpConnector::new_with_resolver(dns))
}

async fn hyper_util(http2_only: bool) {
    check(
        &format!("hyper-util, http2_only={http2_only}"),
        |dns| UnderTest {
            send: tower_sender(hyper_util_client(dns, http2_only)),
            renewal: Renewal::None,
        },
        |dns| {
            let client = RotatingClientLayer::new(NEVER)
                .layer(move || hyper_util_client(dns.clone(), http2_only));
            UnderTest {
                send: tower_sender(client.clone()),
                renewal: rotation(client),
            }
        },
    )
    .await;
}

async fn hyper_util_probed(http2_only: bool) {
    check_rotating(
        &format!("hyper-util, http2_only={http2_only}, probe"),
        |dns| {
            let client = RotatingClientLayer::new(NEVER)
                .rotate_on_change(dns_probe(dns.clone()))
                .layer(move || hyper_util_client(dns.clone(), http2_only));
            UnderTest {
                send: tower_sender(client.clone()),
                renewal: probed(client),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn hyper_util_http1() {
    hyper_util(false).await;
}

#[tokio::test]
async fn hyper_util_http2() {
    hyper_util(true).await;
}

#[tokio::test]
async fn hyper_util_http1_probe() {
    hyper_util_probed(false).await;
}

#[tokio::test]
async fn hyper_util_http2_probe() {
    hyper_util_probed(true).await;
}

/// A [`Sender`] for reqwest's own types: `reqwest::Client` itself, or a
/// `RotatingClient` over one. A response in another HTTP version than
/// `version` counts as failed.
#[cfg(feature = "reqwest")]
fn reqwest_sender<S>(client: S, version: reqwest::Version) -> Sender
where
    S: Service<reqwest::Request, Response = reqwest::Response, Error = reqwest::Error>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
{
    Arc::new(move |uri| {
        let client = client.clone();
        Box::pin(async move {
            let url = reqwest::Url::parse(&uri.to_string())?;
            let request = reqwest::Request::new(reqwest::Method::GET, url);
            let response = client.oneshot(request).await?.error_for_status()?;
            if response.version() != version {
                return Err(format!("{:?}, want {version:?}", response.version()).into());
            }
            Ok(response.bytes().await?.to_vec())
        })
    })
}

/// reqwest with its default pool, resolving through `dns`.
#[cfg(feature = "reqwest")]
fn reqwest_client(dns: ScaleUpDns, http2: bool) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder().no_proxy().dns_resolver(dns);
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build()
}

#[cfg(feature = "reqwest")]
async fn reqwest(http2: bool) {
    let version = if http2 {
        reqwest::Version::HTTP_2
    } else {
        reqwest::Version::HTTP_11
    };
    check(
        &format!("reqwest, http2={http2}"),
        |dns| UnderTest {
            send: reqwest_sender(
                reqwest_client(dns, http2).expect("reqwest builds a client"),
                version,
            ),
            renewal: Renewal::None,
        },
        |dns| {
            let client = RotatingClientLayer::new(NEVER)
                .try_layer(move || reqwest_client(dns.clone(), http2))
                .expect("reqwest builds a client");
            UnderTest {
                send: reqwest_sender(client.clone(), version),
                renewal: rotation(client),
            }
        },
    )
    .await;
}

#[cfg(feature = "reqwest")]
async fn reqwest_probed(http2: bool) {
    let version = if http2 {
        reqwest::Version::HTTP_2
    } else {
        reqwest::Version::HTTP_11
    };
    check_rotating(&format!("reqwest, http2={http2}, probe"), |dns| {
        let client = RotatingClientLayer::new(NEVER)
            .rotate_on_change(dns_probe(dns.clone()))
            .try_layer(move || reqwest_client(dns.clone(), http2))
            .expect("reqwest builds a client");
        UnderTest {
            send: reqwest_sender(client.clone(), version),
            renewal: probed(client),
        }
    })
    .await;
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_http1() {
    reqwest(false).await;
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_http2() {
    reqwest(true).await;
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_http1_probe() {
    reqwest_probed(false).await;
}

#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_http2_probe() {
    reqwest_probed(true).await;
}
