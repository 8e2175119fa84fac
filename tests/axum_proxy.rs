//! An axum 0.8 reverse proxy that keeps a `RotatingClient` in its `State`.
//!
//! The handler forwards each request upstream and streams the upstream
//! body straight back. Streams through the proxy survive rotations byte for
//! byte, and the handle stored in the router's state pins nothing: once the
//! streams are done, every non-current generation has been retired.

mod test_utils;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use test_utils::*;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

type Upstream = Client<HttpConnector, Body>;

/// Each [`long_streams`] stream outlives about ten generations.
const TTL: Duration = Duration::from_millis(30);
const STREAMS: usize = 90;
const CONCURRENCY: usize = 15;
const MIN_ROTATIONS: u64 = 10;
/// Bounds every wait for a count to settle.
const LIMIT: Duration = Duration::from_secs(10);

/// The router's state.
#[derive(Clone)]
struct Proxy {
    client: RotatingClient<Upstream>,
    upstream: SocketAddr,
}

/// Forwards the request to the upstream and streams its response back.
async fn forward(State(proxy): State<Proxy>, mut request: Request) -> Result<Response, StatusCode> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |path| path.as_str());
    *request.uri_mut() = format!("http://{}{path}", proxy.upstream)
        .parse()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    // The client sets `Host` from the new URI.
    request.headers_mut().remove(http::header::HOST);
    // `State` hands out a clone of the stored handle: it serves this one
    // request and goes.
    let response = proxy
        .client
        .oneshot(request)
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(response.map(Body::new))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_streams_survive_rotations() {
    let upstream = StreamServer::start().await;
    let retired = RetireLog::default();
    let rotating = RotatingClientLayer::new(TTL)
        .on_retire(retired.hook())
        .layer(|| Client::builder(TokioExecutor::new()).build_http());

    let app = Router::new().fallback(forward).with_state(Proxy {
        client: rotating.clone(),
        upstream: upstream.addr(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let proxy_addr = listener.local_addr().expect("local_addr");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // Callers talk to the proxy with a plain client.
    let caller: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{proxy_addr}/stream")
        .parse()
        .expect("proxy uri");
    long_streams(caller, uri, STREAMS, CONCURRENCY)
        .await
        .assert_none_cut(STREAMS, "through the proxy");
    let rotations = rotating.stats().rotations;
    assert!(
        rotations >= MIN_ROTATIONS,
        "only {rotations} rotations during the load"
    );

    // The router (and the handle in its state) is still up, yet only the
    // current generation is live and the hook saw every other one.
    wait_until(
        "the hook saw every non-current generation, and only the current one is live",
        LIMIT,
        || {
            let stats = rotating.stats();
            stats.live_generations() == 1 && retired.is_all_before(stats.current_generation.0)
        },
    )
    .await;
    // And nothing in the proxy keeps a retired pool: once the generation
    // that served last is retired too, no upstream connection is left.
    rotating.rotate().await.expect("rotate");
    wait_until("no upstream connection is left open", LIMIT, || {
        upstream.open_connections() == 0
    })
    .await;
    assert!(!server.is_finished(), "the proxy kept serving");
    server.abort();
}
