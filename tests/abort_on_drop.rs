//! A client whose drop kills its in-flight work: the hard case for rotation.
//!
//! [`AbortOnDropClient`] aborts its connections when its last clone goes,
//! cutting every response still streaming through it. Rotating it every
//! 30 ms under a load of 300 ms streams only works if each retired client
//! lives exactly as long as its last response. Each test first runs a
//! naive swap, which drops the old client at swap time, under the same
//! load: the control, showing that this load, server and client do cut
//! streams when a retired client is dropped too early.

mod test_utils;

use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use test_utils::*;
use tower::Service;
use tower_layer::Layer;
use tower_rotating_client::RotatingClientLayer;

/// Lifetime of a generation, and the period of the naive swap: each
/// [`long_streams`] stream outlives about ten of them.
const TTL: Duration = Duration::from_millis(30);
const STREAMS: usize = 300;
const CONCURRENCY: usize = 30;
/// Rotations the load must at least see (it lasts about 100 TTLs).
const MIN_ROTATIONS: u64 = 10;
/// Bounds every wait for a count to settle.
const LIMIT: Duration = Duration::from_secs(10);

async fn rotation_keeps_every_stream(version: HttpVersion) {
    // The control: without it, "no stream cut" below could also mean that
    // this setup cannot cut a stream at all.
    naive_swap_cuts_streams(version).await;

    let server = StreamServer::start().await;
    let clients = LiveCounter::new();
    let rotating = {
        let (addr, clients) = (server.addr(), clients.clone());
        RotatingClientLayer::new(TTL)
            .layer(move || AbortOnDropClient::with_version(addr, clients.clone(), version))
    };

    let run = tokio::spawn({
        let rotating = rotating.clone();
        async move { long_streams(rotating, server.uri("/stream"), STREAMS, CONCURRENCY).await }
    });
    // Sample while the streams run: retired generations that still carry
    // streams stay alive next to the current one.
    let mut most_live = 0;
    while !run.is_finished() {
        most_live = most_live.max(rotating.stats().live_generations());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = run.await.expect("the load panicked");

    outcome.assert_none_cut(STREAMS, &format!("{version:?}"));
    let stats = rotating.stats();
    assert!(
        stats.rotations >= MIN_ROTATIONS,
        "{version:?}: only {} rotations during the load",
        stats.rotations
    );
    assert!(
        clients.created() as u64 > MIN_ROTATIONS,
        "{version:?}: only {} clients built",
        clients.created()
    );
    assert!(
        most_live >= 3,
        "{version:?}: streams should keep several generations draining, saw at most {most_live} live"
    );

    // The workers' handles, and the stale clones they kept, went with their
    // tasks: every retired client is gone, only the current one is left.
    wait_until(
        "only the current generation's client is alive",
        LIMIT,
        || clients.live() == 1 && rotating.stats().live_generations() == 1,
    )
    .await;

    // The last handle takes the current generation with it.
    drop(rotating);
    wait_until("every client is dropped", LIMIT, || clients.live() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_stream_http1() {
    rotation_keeps_every_stream(HttpVersion::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_every_stream_http2() {
    rotation_keeps_every_stream(HttpVersion::Http2).await;
}

/// The control's naive way: one shared slot, replaced on a timer, and the
/// old client dropped at the swap whatever is still streaming through it.
#[derive(Clone)]
struct NaiveSwap {
    slot: Arc<RwLock<AbortOnDropClient>>,
}

impl Service<Request<Empty<Bytes>>> for NaiveSwap {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = <AbortOnDropClient as Service<Request<Empty<Bytes>>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Empty<Bytes>>) -> Self::Future {
        // The future keeps the client until the response head arrives; the
        // body, as with most clients, does not keep it.
        let mut client = self.slot.read().expect("slot lock").clone();
        client.call(request)
    }
}

/// The control of [`rotation_keeps_every_stream`]: the same load through
/// [`NaiveSwap`] must cut streams. It exercises only this file's stand-in,
/// never the crate, so it is not a test of its own.
async fn naive_swap_cuts_streams(version: HttpVersion) {
    let server = StreamServer::start().await;
    let clients = LiveCounter::new();
    let make_client = {
        let (addr, clients) = (server.addr(), clients.clone());
        move || AbortOnDropClient::with_version(addr, clients.clone(), version)
    };
    let naive = NaiveSwap {
        slot: Arc::new(RwLock::new(make_client())),
    };
    let swapper = tokio::spawn({
        let slot = Arc::clone(&naive.slot);
        async move {
            let mut tick = tokio::time::interval(TTL);
            tick.tick().await;
            loop {
                tick.tick().await;
                // Assigning drops the old client, and with it its streams.
                *slot.write().expect("slot lock") = make_client();
            }
        }
    });

    let outcome = long_streams(naive, server.uri("/stream"), STREAMS, CONCURRENCY).await;
    swapper.abort();

    assert!(
        clients.created() as u64 > MIN_ROTATIONS,
        "{version:?}: only {} swaps during the load",
        clients.created()
    );
    assert!(
        !outcome.broken.is_empty(),
        "{version:?}: the naive swap should cut streams, but all {} arrived",
        outcome.complete
    );
    assert_eq!(
        outcome.complete + outcome.broken.len(),
        STREAMS,
        "{version:?}: every stream accounted for"
    );
    eprintln!(
        "naive swap, {version:?}: {} of {STREAMS} streams cut, e.g. {}",
        outcome.broken.len(),
        outcome.broken[0]
    );
}
