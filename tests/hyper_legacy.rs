//! hyper-util's legacy `Client` as the rotated client, over HTTP/1.1 and
//! HTTP/2 (h2c prior knowledge).
//!
//! Streams survive rotations, every retired generation reaches the retire
//! hook, and once a generation is retired its pool goes with it: the server
//! sees every connection of a retired generation closed.

mod test_utils;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use test_utils::*;
use tower_layer::Layer;
use tower_rotating_client::RotatingClientLayer;

type Legacy = Client<HttpConnector, Empty<Bytes>>;

/// Each [`long_streams`] stream outlives about ten generations.
const TTL: Duration = Duration::from_millis(30);
const STREAMS: usize = 120;
const CONCURRENCY: usize = 20;
const MIN_ROTATIONS: u64 = 10;
/// Bounds every wait for a count to settle.
const LIMIT: Duration = Duration::from_secs(10);

async fn legacy_client_rotates(http2_only: bool) {
    let server = StreamServer::start().await;
    // The hook drops each retired client, hence its pool, and the pool's
    // idle connections with it.
    let retired = RetireLog::default();
    let rotating = RotatingClientLayer::new(TTL)
        .on_retire(retired.hook())
        .layer(move || -> Legacy {
            Client::builder(TokioExecutor::new())
                .http2_only(http2_only)
                .build_http()
        });

    long_streams(
        rotating.clone(),
        server.uri("/stream"),
        STREAMS,
        CONCURRENCY,
    )
    .await
    .assert_none_cut(STREAMS, &format!("http2_only={http2_only}"));
    let rotations = rotating.stats().rotations;
    assert!(
        rotations >= MIN_ROTATIONS,
        "http2_only={http2_only}: only {rotations} rotations during the load"
    );

    // Idle: only the current generation is live, and every other one went
    // through the hook exactly once.
    wait_until(
        "every non-current generation is retired through the hook",
        LIMIT,
        || {
            let stats = rotating.stats();
            stats.live_generations() == 1
                && stats.in_flight() == 0
                && retired.is_all_before(stats.current_generation.0)
        },
    )
    .await;
    let retirements = retired.all();
    assert!(
        retirements.iter().all(|g| g.in_flight == 0),
        "no generation is retired with responses open"
    );
    // Each generation that served requests dialled its own connections.
    let served = retirements.iter().filter(|g| g.requests > 0).count();
    assert!(
        served >= 2,
        "http2_only={http2_only}: traffic should span generations, only {served} served"
    );
    assert!(
        server.total_connections() >= served,
        "http2_only={http2_only}: {} connections for {served} generations",
        server.total_connections()
    );

    // Retire whatever generation served the last requests. A new one has
    // not connected yet, so every open connection would belong to a retired
    // generation: once retired, their pools must have closed them all.
    rotating.rotate().await.expect("rotate");
    wait_until(
        "retired generations leave no connection open",
        LIMIT,
        || server.open_connections() == 0 && rotating.stats().live_generations() == 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_client_http1() {
    legacy_client_rotates(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_client_http2() {
    legacy_client_rotates(true).await;
}
