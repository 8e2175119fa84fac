//! Lifecycle events of the `tracing` feature, in a test binary of its own.
//!
//! `tracing` caches each callsite's interest process-wide. A subscriber
//! installed per thread (`set_default`) while other tests run in parallel
//! loses events: with exactly one dispatch registered, tracing-core 0.1.36
//! computes a new callsite's interest from the default of whichever thread
//! reaches the callsite first (`Rebuilder::JustOne`), and a thread with no
//! subscriber caches `Interest::never` for everybody (tokio-rs/tracing#3611).
//! Hence one binary, one process-wide subscriber installed once with
//! `set_global_default`, and one test: every event of the process is
//! captured, so nothing else may run here.

use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

/// Collects formatted events.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn clear(&self) {
        self.0.lock().expect("not poisoned").clear();
    }
}

fn line<'a>(lines: &'a [String], message: &str, field: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.contains(message) && line.contains(field))
        .unwrap_or_else(|| panic!("no `{message}` event with {field} in {lines:#?}"))
}

/// A body fed through a channel: open until the sender is dropped.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|data| data.map(|data| Ok(Frame::data(data))))
    }
}

/// Echoes the request body back as the response body.
#[derive(Clone)]
struct EchoClient;

impl Service<http::Request<ChannelBody>> for EchoClient {
    type Response = http::Response<ChannelBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ChannelBody>) -> Self::Future {
        std::future::ready(Ok(http::Response::new(request.into_body())))
    }
}

/// Lets the background task act.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// One stream that outlives a TTL rotation by five seconds, then ends.
async fn one_lifecycle() {
    let client: RotatingClient<EchoClient> = RotatingClientLayer::new(Duration::from_secs(60))
        .jitter(0.0)
        .layer(|| EchoClient);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut body = client
        .clone()
        .oneshot(http::Request::new(ChannelBody(rx)))
        .await
        .expect("infallible")
        .into_body();
    settle().await;
    tokio::time::advance(Duration::from_secs(60)).await;
    settle().await;
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    drop(tx);
    assert!(body.frame().await.is_none(), "the stream ends");
    drop(client);
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

#[test]
fn lifecycle_events_carry_the_generation_and_its_figures() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");

    // Another thread reaches every callsite first: the way the flaky unit
    // test lost its events. With a global subscriber that must not matter.
    std::thread::spawn(|| paused_runtime().block_on(one_lifecycle()))
        .join()
        .expect("the other thread's lifecycle");
    assert!(
        captured
            .lines()
            .iter()
            .any(|line| line.contains("build started")),
        "events from another thread are captured too: {:#?}",
        captured.lines()
    );
    captured.clear();

    paused_runtime().block_on(one_lifecycle());

    let lines = captured.lines();
    line(&lines, "build started", "replacing=1");
    line(&lines, "build succeeded", "replacing=1");
    let swap = line(&lines, "swap", "generation=2");
    assert!(
        swap.contains("replacing=1") && swap.contains("reason=\"ttl\""),
        "the swap names the old generation and the reason: {swap}"
    );
    let drain = line(&lines, "drain started", "generation=1");
    assert!(
        drain.contains("in_flight=1") && drain.contains("requests=1"),
        "the drain carries its figures: {drain}"
    );
    let drained = line(&lines, "drained", "generation=1");
    assert!(
        drained.contains("drain_duration=5s"),
        "drained when the stream ended: {drained}"
    );
    let retired = line(&lines, "retired", "generation=1");
    assert!(
        retired.contains("age=65s") && retired.contains("requests=1"),
        "retired with its age and requests: {retired}"
    );
    line(&lines, "retired", "generation=2");
}
