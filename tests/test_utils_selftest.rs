//! Self-test of the shared integration-test helpers in `tests/test_utils`.

mod test_utils;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use test_utils::*;
use tokio::time::timeout;
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tower::ServiceExt;

const T: Duration = Duration::from_secs(10);

#[test]
fn expected_body_is_deterministic() {
    let body = expected_body(3, 5);
    assert_eq!(body.len(), 15);
    assert_eq!(&body[..5], &[0, 1, 2, 3, 4]);
    assert_eq!(&body[5..10], &[31, 32, 33, 34, 35]);
    assert_eq!(&body[10..], &chunk_bytes(2, 5)[..]);
    assert_ne!(chunk_bytes(1, 64), chunk_bytes(2, 64));
    assert_eq!(expected_body(0, 64), Vec::<u8>::new());
}

async fn stream_ok(version: HttpVersion) {
    let server = StreamServer::start().await;
    let counter = LiveCounter::new();
    let client = AbortOnDropClient::with_version(server.addr(), counter.clone(), version);
    assert_eq!(counter.live(), 1);
    assert_eq!(counter.created(), 1);

    // Parameters via headers.
    let req = stream_request(server.uri("/any/path"), 7, 2, 33);
    let resp = timeout(T, client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[H_CLIENT_ID], "0");
    assert_eq!(resp.headers()[H_REQUEST_SEQ], "1");
    let body = timeout(T, read_body(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, expected_body(7, 33));

    // Parameters via query, relative URI, defaults for the delay.
    let req = Request::builder()
        .uri("/q?chunks=5&chunk_size=10&x-chunk-delay-ms=1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timeout(T, client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    let body = timeout(T, read_body(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, expected_body(5, 10));

    // Defaults (30 x 64 bytes, 10 ms) and trailers (HTTP/1.1 needs `te: trailers`).
    let req = Request::builder()
        .uri(server.uri("/"))
        .header(H_TRAILERS, "1")
        .header(http::header::TE, "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = timeout(T, client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    let (body, trailers) = timeout(T, read_body_with_trailers(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, expected_body(DEFAULT_CHUNKS, DEFAULT_CHUNK_SIZE));
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["x-chunks-sent"], "30");
    assert_eq!(trailers["x-body-len"], "1920");

    assert_eq!(server.total_requests(), 3);
    match version {
        HttpVersion::Http1 => {
            assert_eq!(client.connections_opened(), 3);
            assert_eq!(server.total_connections(), 3);
            // h1 connections close once their response is complete.
            timeout(T, server.wait_for_open_connections(0))
                .await
                .unwrap();
            drop(client);
        }
        HttpVersion::Http2 => {
            assert_eq!(client.connections_opened(), 1);
            assert_eq!(server.total_connections(), 1);
            assert_eq!(server.open_connections(), 1);
            drop(client);
            timeout(T, server.wait_for_open_connections(0))
                .await
                .unwrap();
        }
    }
    assert_eq!(counter.live(), 0);
    assert_eq!(counter.dropped(), 1);
}

#[tokio::test]
async fn stream_body_http1() {
    stream_ok(HttpVersion::Http1).await;
}

#[tokio::test]
async fn stream_body_http2() {
    stream_ok(HttpVersion::Http2).await;
}

async fn drop_client_cuts_stream(version: HttpVersion) {
    let server = StreamServer::start().await;
    let counter = LiveCounter::new();
    let client = AbortOnDropClient::with_version(server.addr(), counter.clone(), version);
    let req = stream_request(server.uri("/"), 50, 10, 16);
    let resp = timeout(T, client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(server.open_connections(), 1);
    assert!(client.live_tasks() >= 1);
    let mut body = resp.into_body();
    let head = timeout(T, read_at_least(&mut body, 32))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head[..], &expected_body(50, 16)[..head.len()]);

    // The body alone does not keep the client alive.
    assert_eq!(client.handle_count(), 1);
    drop(client);
    assert_eq!(counter.live(), 0);

    let rest = timeout(T, read_body(body)).await.unwrap();
    assert!(rest.is_err(), "body must fail after the client is dropped");
    timeout(T, server.wait_for_open_connections(0))
        .await
        .unwrap();
    assert_eq!(server.total_connections(), 1);
}

#[tokio::test]
async fn dropping_client_cuts_stream_http1() {
    drop_client_cuts_stream(HttpVersion::Http1).await;
}

#[tokio::test]
async fn dropping_client_cuts_stream_http2() {
    drop_client_cuts_stream(HttpVersion::Http2).await;
}

#[tokio::test]
async fn clone_keeps_stream_alive() {
    let server = StreamServer::start().await;
    let counter = LiveCounter::new();
    let client = AbortOnDropClient::new(server.addr(), counter.clone());
    let keep = client.clone();
    let req = stream_request(server.uri("/"), 10, 5, 8);
    let resp = timeout(T, client.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    drop(client);
    assert_eq!(counter.live(), 1);
    let body = timeout(T, read_body(resp.into_body()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, expected_body(10, 8));
    drop(keep);
    assert_eq!(counter.live(), 0);
}

#[tokio::test]
async fn kill_connections_and_shutdown() {
    let server = StreamServer::start().await;
    let counter = LiveCounter::new();
    let h1 = AbortOnDropClient::new(server.addr(), counter.clone());
    let h2 = AbortOnDropClient::new_h2(server.addr(), counter.clone());
    assert_eq!(counter.live(), 2);

    let r1 = timeout(
        T,
        h1.clone()
            .oneshot(stream_request(server.uri("/"), 100, 10, 8)),
    )
    .await
    .unwrap()
    .unwrap();
    let r2 = timeout(
        T,
        h2.clone()
            .oneshot(stream_request(server.uri("/"), 100, 10, 8)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(server.open_connections(), 2);
    assert_eq!(server.total_connections(), 2);

    server.kill_connections();
    assert!(timeout(T, read_body(r1.into_body()))
        .await
        .unwrap()
        .is_err());
    assert!(timeout(T, read_body(r2.into_body()))
        .await
        .unwrap()
        .is_err());
    timeout(T, server.wait_for_open_connections(0))
        .await
        .unwrap();

    // Still accepting; the h2 client re-dials because its connection closed.
    let r = timeout(
        T,
        h2.clone().oneshot(stream_request(server.uri("/"), 3, 1, 8)),
    )
    .await
    .unwrap()
    .unwrap();
    let body = timeout(T, read_body(r.into_body())).await.unwrap().unwrap();
    assert_eq!(body, expected_body(3, 8));
    assert_eq!(h2.connections_opened(), 2);

    // Server-side injected failure mid-body.
    let req = Request::builder()
        .uri(server.uri("/"))
        .header(H_FAIL_AFTER, "2")
        .header(H_CHUNK_DELAY_MS, "1")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = timeout(T, h1.clone().oneshot(req)).await.unwrap().unwrap();
    assert!(timeout(T, read_body(r.into_body())).await.unwrap().is_err());

    let addr = server.addr();
    server.shutdown();
    timeout(T, server.wait_for_open_connections(0))
        .await
        .unwrap();
    let late = AbortOnDropClient::new(addr, counter.clone());
    let res = timeout(T, late.oneshot(stream_request(server.uri("/"), 1, 0, 1)))
        .await
        .unwrap();
    assert!(res.is_err(), "server must not accept after shutdown");
    drop((h1, h2));
    assert_eq!(counter.live(), 0);
    assert_eq!(counter.created(), 3);
}

/// With a paused clock the 60 s gaps between chunks elapse instantly.
#[test]
fn paused_time_stream() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let res = rt.block_on(async {
            let server = StreamServer::start().await;
            let client = AbortOnDropClient::new(server.addr(), LiveCounter::new());
            let start = tokio::time::Instant::now();
            let resp = client
                .clone()
                .oneshot(stream_request(server.uri("/"), 4, 60_000, 16))
                .await
                .unwrap();
            let body = read_body(resp.into_body()).await.unwrap();
            drop(client);
            (body, start.elapsed())
        });
        let _ = tx.send(res);
    });
    let (body, elapsed) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("paused-time stream finished in wall time");
    assert_eq!(body, expected_body(4, 16));
    assert!(elapsed >= Duration::from_secs(180), "{elapsed:?}");
}

#[tokio::test]
async fn health_check_and_watch() {
    let server = HealthServer::start().await;
    let channel = timeout(
        T,
        Endpoint::from_shared(server.endpoint_uri())
            .unwrap()
            .connect(),
    )
    .await
    .unwrap()
    .unwrap();
    let mut client = HealthClient::new(channel);

    let resp = timeout(
        T,
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.get_ref().status(), PbStatus::Serving);

    let err = timeout(
        T,
        client.check(HealthCheckRequest {
            service: "nope".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    server.set_status("svc", ServingStatus::Serving).await;
    let mut watch = timeout(
        T,
        client.watch(HealthCheckRequest {
            service: "svc".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let first = timeout(T, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), PbStatus::Serving);
    server.set_status("svc", ServingStatus::NotServing).await;
    let second = timeout(T, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.status(), PbStatus::NotServing);

    assert_eq!(server.open_connections(), 1);
    assert_eq!(server.total_connections(), 1);
    server.kill_connections();
    let cut = timeout(T, watch.message()).await.unwrap();
    assert!(
        cut.is_err(),
        "watch must fail when the server dies: {cut:?}"
    );
    timeout(T, server.wait_for_open_connections(0))
        .await
        .unwrap();
    server.shutdown();
}

#[tokio::test]
async fn health_over_lazy_channel_and_custom_transport() {
    let server = HealthServer::start().await;

    let lazy = Endpoint::from_shared(server.endpoint_uri())
        .unwrap()
        .connect_lazy();
    assert_eq!(server.total_connections(), 0);
    let resp = timeout(
        T,
        HealthClient::new(lazy).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.into_inner().status(), PbStatus::Serving);
    assert_eq!(server.total_connections(), 1);

    // AbortOnDropClient as a tonic transport (h2, tonic::body::Body requests).
    let counter = LiveCounter::new();
    let transport = AbortOnDropClient::<tonic::body::Body>::with_version(
        server.addr(),
        counter.clone(),
        HttpVersion::Http2,
    );
    let mut client = HealthClient::new(transport.clone());
    let resp = timeout(
        T,
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(resp.into_inner().status(), PbStatus::Serving);

    let mut watch = timeout(
        T,
        client.watch(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .into_inner();
    let first = timeout(T, watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.status(), PbStatus::Serving);
    assert_eq!(transport.connections_opened(), 1);
    assert_eq!(server.total_connections(), 2);

    // Dropping every clone of the transport cuts the Watch stream.
    drop(client);
    drop(transport);
    assert_eq!(counter.live(), 0);
    let cut = timeout(T, watch.message()).await.unwrap();
    assert!(
        cut.is_err(),
        "watch must fail after transport drop: {cut:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_thread_runtime() {
    stream_ok(HttpVersion::Http1).await;
    stream_ok(HttpVersion::Http2).await;
    drop_client_cuts_stream(HttpVersion::Http1).await;
    drop_client_cuts_stream(HttpVersion::Http2).await;
}
