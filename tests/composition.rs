//! `RotatingClientLayer` in a `ServiceBuilder` stack, under tower's
//! timeout, retry and concurrency limit.
//!
//! The stack compiles, boxes into a `BoxCloneService` (its futures are
//! `Send + 'static`), and behaves: a retry can land on a fresh generation,
//! errors pass through unchanged, a concurrency limit applies before a
//! generation is reserved, and a timed-out request releases its generation.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::retry::Policy;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_rotating_client::{ResponseBody, RotatingClient, RotatingClientLayer};

/// How the client of one generation answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `Ok`, with a body naming the generation.
    Answer,
    /// `Err(Broken(generation))`.
    Fail,
    /// Never answers.
    Hang,
}

/// The error of a [`Mode::Fail`] client.
#[derive(Debug, PartialEq, Eq)]
struct Broken(usize);

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client of generation {} is broken", self.0)
    }
}

impl std::error::Error for Broken {}

/// A client that knows which generation it was built for.
#[derive(Clone, Debug)]
struct Client {
    generation: usize,
    mode: Mode,
}

impl Service<Request<String>> for Client {
    type Response = Response<String>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<String>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<String>) -> Self::Future {
        let Client { generation, mode } = self.clone();
        Box::pin(async move {
            match mode {
                Mode::Answer => Ok(Response::new(format!("generation {generation}"))),
                Mode::Fail => Err(Broken(generation).into()),
                Mode::Hang => std::future::pending().await,
            }
        })
    }
}

/// A factory whose `n`th client (1-based, as generations are) answers as
/// `mode(n)` says.
fn factory(
    built: &Arc<AtomicUsize>,
    mode: impl Fn(usize) -> Mode + Send + Sync + 'static,
) -> impl Fn() -> Client + Send + Sync + 'static {
    let built = Arc::clone(built);
    move || {
        let generation = built.fetch_add(1, Ordering::SeqCst) + 1;
        Client {
            generation,
            mode: mode(generation),
        }
    }
}

/// On an error, rotates to a fresh client, then retries, `retries` times.
#[derive(Clone)]
struct RotateThenRetry {
    /// Set once the stack, and with it the rotating client, is built.
    rotating: Arc<OnceLock<RotatingClient<Client>>>,
    retries: usize,
}

impl<B> Policy<Request<String>, Response<B>, BoxError> for RotateThenRetry {
    type Future = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn retry(
        &mut self,
        _request: &mut Request<String>,
        result: &mut Result<Response<B>, BoxError>,
    ) -> Option<Self::Future> {
        if result.is_ok() || self.retries == 0 {
            return None;
        }
        self.retries -= 1;
        let rotating = self.rotating.get()?.clone();
        Some(Box::pin(async move {
            // Had the build failed, the retry would go to the current
            // generation; the test's factory never fails.
            let _ = rotating.rotate().await;
        }))
    }

    fn clone_request(&mut self, request: &Request<String>) -> Option<Request<String>> {
        let mut clone = Request::new(request.body().clone());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        Some(clone)
    }
}

type Boxed = BoxCloneService<Request<String>, Response<ResponseBody<String>>, BoxError>;

const TIMEOUT: Duration = Duration::from_secs(5);
const CONCURRENCY: usize = 2;

/// timeout → retry → concurrency limit → rotating client, over `factory`.
/// Returns the boxed stack and a handle on its rotating client.
fn stack(factory: impl Fn() -> Client + Send + Sync + 'static) -> (Boxed, RotatingClient<Client>) {
    let slot = Arc::new(OnceLock::new());
    let stack = ServiceBuilder::new()
        .timeout(TIMEOUT)
        .retry(RotateThenRetry {
            rotating: Arc::clone(&slot),
            retries: 1,
        })
        .concurrency_limit(CONCURRENCY)
        // No timed rotation: here generations change only when the policy
        // rotates.
        .layer(RotatingClientLayer::new(Duration::MAX))
        .service(factory);
    let rotating = stack.get_ref().get_ref().get_ref().clone();
    slot.set(rotating.clone())
        .unwrap_or_else(|_| unreachable!("the slot is set once"));
    (BoxCloneService::new(stack), rotating)
}

fn request() -> Request<String> {
    Request::builder()
        .uri("/resource")
        .header("x-attempt-key", "42")
        .body("payload".to_owned())
        .expect("valid request")
}

/// Calls the boxed stack on a spawned task: the futures are `Send + 'static`.
async fn call(service: &Boxed) -> Result<Response<ResponseBody<String>>, BoxError> {
    tokio::spawn(service.clone().oneshot(request()))
        .await
        .expect("the call did not panic")
}

async fn body(response: Response<ResponseBody<String>>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("infallible body")
        .to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

#[tokio::test]
async fn a_retry_lands_on_a_fresh_generation() {
    let built = Arc::new(AtomicUsize::new(0));
    let (service, rotating) = stack(factory(&built, |generation| match generation {
        1 => Mode::Fail,
        _ => Mode::Answer,
    }));

    let response = call(&service).await.expect("the retry succeeds");
    assert_eq!(body(response).await, "generation 2");
    let stats = rotating.stats();
    assert_eq!(stats.rotations, 1, "the policy rotated once");
    assert_eq!(stats.current_generation.0, 2);
    assert_eq!(
        stats.live_generations(),
        1,
        "generation 1 retired: {stats:?}"
    );
    assert_eq!(stats.in_flight(), 0);
    assert_eq!(built.load(Ordering::SeqCst), 2);

    // The next request goes straight to generation 2, without a retry.
    let response = call(&service).await.expect("generation 2 answers");
    assert_eq!(body(response).await, "generation 2");
    assert_eq!(rotating.stats().rotations, 1);
    assert_eq!(rotating.stats().generations[0].requests, 2);
}

#[tokio::test]
async fn errors_pass_through_unchanged() {
    let built = Arc::new(AtomicUsize::new(0));
    let (service, rotating) = stack(factory(&built, |_| Mode::Fail));

    let error = call(&service).await.expect_err("every generation fails");
    // The client's own error, from the generation the retry went to.
    let broken = error
        .downcast_ref::<Broken>()
        .unwrap_or_else(|| panic!("the client's error, not {error:?}"));
    assert_eq!(broken, &Broken(2));
    assert_eq!(rotating.stats().rotations, 1, "retried once");
}

#[tokio::test(start_paused = true)]
async fn limit_and_timeout_release_generations() {
    let built = Arc::new(AtomicUsize::new(0));
    let (service, rotating) = stack(factory(&built, |_| Mode::Hang));

    let calls: Vec<_> = (0..CONCURRENCY + 1)
        .map(|_| tokio::spawn(service.clone().oneshot(request())))
        .collect();
    // Let every call get as far as it can.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        rotating.stats().in_flight(),
        CONCURRENCY,
        "the call over the limit waits before reserving a generation"
    );

    for call in calls {
        let error = call
            .await
            .expect("the call did not panic")
            .expect_err("the client never answers");
        assert!(
            error.is::<tower::timeout::error::Elapsed>(),
            "timed out, not {error:?}"
        );
    }
    let stats = rotating.stats();
    assert_eq!(stats.in_flight(), 0, "dropped futures release their lease");
    assert_eq!(stats.generations[0].requests, CONCURRENCY as u64 + 1);
    assert_eq!(stats.rotations, 0, "timeouts are not retried errors");
}

/// A boxed inner client: `BoxCloneService` is `Send` but not `Sync`, and
/// the rotating client over it is still `Send + Sync`, boxes again, and
/// serves across rotations.
#[tokio::test]
async fn a_non_sync_boxed_inner_client_works() {
    type Inner = BoxCloneService<Request<String>, Response<String>, BoxError>;
    fn send_sync<T: Send + Sync + 'static>(_: &T) {}

    let built = Arc::new(AtomicUsize::new(0));
    let make = factory(&built, |_| Mode::Answer);
    let rotating: RotatingClient<Inner> =
        RotatingClientLayer::new(Duration::MAX).layer(move || BoxCloneService::new(make()));
    send_sync(&rotating);
    let boxed = tower::util::BoxCloneSyncService::new(rotating.clone());
    for generation in 1..=3 {
        let response = tokio::spawn(boxed.clone().oneshot(request()))
            .await
            .expect("the call did not panic")
            .expect("answers");
        assert_eq!(body(response).await, format!("generation {generation}"));
        rotating.rotate().await.expect("builds");
    }
    let stats = rotating.stats();
    assert_eq!(stats.live_generations(), 1, "{stats:?}");
    assert_eq!(stats.in_flight(), 0);
}
