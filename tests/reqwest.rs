//! reqwest as the rotated client (feature `reqwest`), against loopback
//! servers the tests start.
//!
//! `RotatingClient<reqwest::Client>` is a `Service<reqwest::Request>` with
//! reqwest's own response and error: the generation's lease rides in the
//! `reqwest::Response` body (released at end of stream, on error, on drop),
//! and everything on the response still works (`url()`, `json()`,
//! `bytes_stream()`, `chunk()`, `error_for_status()`), and errors are
//! reqwest's own kinds. Also: `try_layer` with a fallible factory, and a
//! non-`Sync` inner client (`BoxCloneService`).

mod test_utils;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Client, Method, Request, Response, Url};
use test_utils::*;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{GenerationId, RotatingClient, RotatingClientLayer};

/// Long enough that only `rotate()` rotates.
const TTL: Duration = Duration::from_secs(3600);
/// Bounds every read loop.
const MAX_READS: usize = 10_000;
const CHUNKS: usize = 16;
const SIZE: usize = 256;

/// A `GET` for `chunks` chunks of `SIZE` bytes, sent at once.
fn stream_request(server: &StreamServer, chunks: usize) -> Request {
    let url = Url::parse(&server.uri("/stream").to_string()).expect("valid url");
    let mut request = Request::new(Method::GET, url);
    let headers = request.headers_mut();
    headers.insert(H_CHUNKS, chunks.into());
    headers.insert(H_CHUNK_DELAY_MS, 0.into());
    headers.insert(H_CHUNK_SIZE, SIZE.into());
    request
}

fn get(url: &str) -> Request {
    Request::new(Method::GET, Url::parse(url).expect("valid url"))
}

fn served_by(response: &Response) -> u64 {
    response
        .extensions()
        .get::<GenerationId>()
        .expect("generation_extension is on")
        .0
}

fn layer() -> RotatingClientLayer {
    RotatingClientLayer::new(TTL).generation_extension(true)
}

#[test]
fn the_service_is_reqwests_own_types_and_send_sync() {
    fn reqwest_service<S>()
    where
        S: Service<Request, Response = Response, Error = reqwest::Error> + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
    }
    reqwest_service::<RotatingClient<Client>>();
    // BoxCloneService is Send but not Sync: the rotating client still is.
    reqwest_service::<RotatingClient<BoxCloneService<Request, Response, reqwest::Error>>>();
}

/// Several streams, each from its own generation, read chunk by chunk
/// with a `rotate()` after every chunk: every byte arrives, and no
/// generation retires while a stream from it is open.
#[tokio::test]
async fn streams_survive_rotations_between_chunks() {
    let server = StreamServer::start().await;
    let retired = RetireLog::default();
    let client = layer().on_retire(retired.hook()).layer(Client::new);

    let mut streams = Vec::new();
    for expected_generation in 1..=3 {
        let response = client
            .execute(stream_request(&server, CHUNKS))
            .await
            .expect("response head");
        assert_eq!(response.status(), 200);
        assert_eq!(served_by(&response), expected_generation);
        streams.push((
            expected_generation,
            response.bytes_stream(),
            Vec::new(),
            false,
        ));
        client.rotate().await.expect("rotation builds");
    }
    let mut rotations = 3;
    for _ in 0..MAX_READS {
        if streams.iter().all(|(_, _, _, done)| *done) {
            break;
        }
        for (generation, stream, received, done) in &mut streams {
            if *done {
                continue;
            }
            assert!(
                !retired.ids().contains(generation),
                "generation {generation} retired while its stream is open"
            );
            match stream.next().await {
                Some(chunk) => received.extend_from_slice(&chunk.expect("no stream is cut")),
                None => *done = true,
            }
            client.rotate().await.expect("rotation builds");
            rotations += 1;
        }
    }
    for (generation, _, received, done) in &streams {
        assert!(*done, "stream of generation {generation} ended");
        assert_eq!(
            *received,
            expected_body(CHUNKS, SIZE),
            "stream of generation {generation} is whole"
        );
    }
    assert!(
        rotations > 3 * CHUNKS,
        "rotated between chunks: {rotations}"
    );
    let stats = client.stats();
    assert_eq!(stats.failed_builds, 0);
    assert_eq!(stats.live_generations(), 1, "every stream ended: {stats:?}");
    assert_eq!(stats.in_flight(), 0);
    for generation in 1..=3 {
        assert!(retired.ids().contains(&generation), "{generation} retired");
    }
}

/// The same with `chunk()`, the other way to read a reqwest body.
#[tokio::test]
async fn chunk_reads_survive_rotations() {
    let server = StreamServer::start().await;
    let client = layer().layer(Client::new);
    let mut response = client
        .execute(stream_request(&server, CHUNKS))
        .await
        .expect("response head");
    let mut received = Vec::new();
    for _ in 0..MAX_READS {
        let Some(chunk) = response.chunk().await.expect("not cut") else {
            break;
        };
        received.extend_from_slice(&chunk);
        client.rotate().await.expect("rotation builds");
        if received.len() < CHUNKS * SIZE {
            assert_eq!(
                client.stats().live_generations(),
                2,
                "the open body keeps generation 1"
            );
        }
    }
    assert_eq!(received, expected_body(CHUNKS, SIZE));
    assert_eq!(client.stats().live_generations(), 1);
}

/// A body held open across `rotate()` keeps two generations live, and one
/// once it has ended, while the stream itself is still alive; dropping a
/// body mid-stream lets go too.
#[tokio::test]
async fn an_open_body_keeps_its_generation_until_it_ends_or_drops() {
    let server = StreamServer::start().await;
    let retired = RetireLog::default();
    let client = layer().on_retire(retired.hook()).layer(Client::new);

    let response = client
        .execute(stream_request(&server, 4))
        .await
        .expect("response head");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a chunk").expect("not cut");
    assert_eq!(first.len(), SIZE);
    client.rotate().await.expect("rotation builds");
    let stats = client.stats();
    assert_eq!(stats.live_generations(), 2, "1 drains, 2 serves: {stats:?}");
    assert_eq!(stats.in_flight(), 1);
    assert!(retired.ids().is_empty());
    for _ in 0..MAX_READS {
        if stream.next().await.transpose().expect("not cut").is_none() {
            break;
        }
    }
    let stats = client.stats();
    assert_eq!(
        stats.live_generations(),
        1,
        "released at end of stream: {stats:?}"
    );
    assert_eq!(retired.ids(), vec![1]);
    drop(stream);

    // Dropped mid-stream.
    let response = client
        .execute(stream_request(&server, 4))
        .await
        .expect("response head");
    assert_eq!(served_by(&response), 2);
    client.rotate().await.expect("rotation builds");
    assert_eq!(client.stats().live_generations(), 2);
    drop(response);
    assert_eq!(client.stats().live_generations(), 1, "released on drop");
    assert_eq!(retired.ids(), vec![1, 2]);
}

/// A 204, whose body is empty from the start, holds no generation, also
/// when the generation looks at each response (the tests' layer adds the
/// generation extension): the generation it came from retires at once.
#[tokio::test]
async fn an_empty_response_holds_nothing() {
    let server = FixedServer::start(204, "text/plain", "").await;
    let retired = RetireLog::default();
    let client = layer().on_retire(retired.hook()).layer(Client::new);
    let response = client
        .execute(get(&server.url("/")))
        .await
        .expect("a response");
    assert_eq!(response.status(), 204);
    assert_eq!(served_by(&response), 1, "the head was judged");
    assert_eq!(client.stats().in_flight(), 0, "nothing to wait for");
    client.rotate().await.expect("rotation builds");
    assert_eq!(
        retired.ids(),
        vec![1],
        "retired while the response is still alive"
    );
    drop(response);
}

#[tokio::test]
async fn url_json_text_and_error_for_status_work() {
    let json = FixedServer::start(200, "application/json", r#"{"name":"rotating","n":3}"#).await;
    let unavailable = FixedServer::start(503, "text/plain", "try later").await;
    let client = layer().layer(Client::new);

    let url = json.url("/some/path?query=1");
    let response = client.clone().oneshot(get(&url)).await.expect("response");
    assert_eq!(response.url().as_str(), url, "the request's URL, kept");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let value: serde_json::Value = response
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("valid json");
    assert_eq!(value, serde_json::json!({"name": "rotating", "n": 3}));

    let text = client
        .execute(get(&json.url("/")))
        .await
        .expect("response")
        .text()
        .await
        .expect("text");
    assert_eq!(text, r#"{"name":"rotating","n":3}"#);

    let url = unavailable.url("/busy");
    let response = client.execute(get(&url)).await.expect("a response");
    assert_eq!(response.status(), 503);
    let error = response.error_for_status().expect_err("503 is an error");
    assert_eq!(
        error.status(),
        Some(reqwest::StatusCode::SERVICE_UNAVAILABLE)
    );
    assert_eq!(error.url().map(Url::as_str), Some(url.as_str()));

    let stats = client.stats();
    assert_eq!(
        stats.in_flight(),
        0,
        "every body read or dropped: {stats:?}"
    );
    assert_eq!(json.total_requests(), 2);
}

/// A connect error is reqwest's own, unchanged, and holds nothing.
#[tokio::test]
async fn a_reqwest_error_passes_through_unchanged() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let url = format!("http://{closed}/nothing-here");
    let plain = Client::new()
        .execute(get(&url))
        .await
        .expect_err("nothing listens");
    let client = layer().layer(Client::new);
    for error in [
        client
            .execute(get(&url))
            .await
            .expect_err("nothing listens"),
        client
            .clone()
            .oneshot(get(&url))
            .await
            .expect_err("nothing listens"),
    ] {
        assert!(error.is_connect(), "a connect error: {error:?}");
        assert_eq!(error.is_connect(), plain.is_connect());
        assert_eq!(error.url(), plain.url(), "the request's URL");
        assert_eq!(error.to_string(), plain.to_string());
    }
    let stats = client.stats();
    assert_eq!(stats.in_flight(), 0, "released on error: {stats:?}");
    assert_eq!(stats.live_generations(), 1);
}

/// What kind of error a reqwest error is, as reqwest answers it.
fn kind(error: &reqwest::Error) -> [bool; 5] {
    [
        error.is_body(),
        error.is_decode(),
        error.is_timeout(),
        error.is_request(),
        error.is_connect(),
    ]
}

/// Reads `request`'s body with `chunk()` to its first error.
async fn first_body_error(
    client: &Client,
    rotating: Option<&RotatingClient<Client>>,
    request: Request,
) -> reqwest::Error {
    let mut response = match rotating {
        Some(rotating) => rotating.execute(request).await,
        None => client.execute(request).await,
    }
    .expect("response head");
    if let Some(rotating) = rotating {
        rotating.rotate().await.expect("rotation builds");
        assert_eq!(rotating.stats().live_generations(), 2, "the body holds 1");
    }
    for _ in 0..MAX_READS {
        match response.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the body ended without an error"),
            Err(error) => return error,
        }
    }
    panic!("no error within {MAX_READS} reads");
}

/// A body that fails mid-stream (the server resets it, or reqwest's read
/// timeout fires) gives the same kind of reqwest error as reqwest alone
/// (`is_body()`, `is_decode()`, `is_timeout()`), and lets go of the
/// generation.
#[tokio::test]
async fn body_errors_are_reqwests_and_release_the_generation() {
    let server = StreamServer::start().await;
    // The first chunk at once, the reset a second later: the head has long
    // arrived by then.
    let reset = || {
        let mut request = stream_request(&server, CHUNKS);
        request.headers_mut().insert(H_FAIL_AFTER, 1.into());
        request.headers_mut().insert(H_CHUNK_DELAY_MS, 1000.into());
        request
    };
    // The second chunk comes after 5 s; a 100 ms read timeout fires first.
    let stall = || {
        let mut request = stream_request(&server, 2);
        request.headers_mut().insert(H_CHUNK_DELAY_MS, 5000.into());
        request
    };
    let make = || {
        Client::builder()
            .read_timeout(Duration::from_millis(100))
            .build()
            .expect("builds")
    };
    for (name, request, client) in [
        (
            "reset",
            &reset as &dyn Fn() -> Request,
            Client::new as fn() -> Client,
        ),
        ("read timeout", &stall, make),
    ] {
        let plain = first_body_error(&client(), None, request()).await;
        let rotating = layer().layer(client);
        let error = first_body_error(&client(), Some(&rotating), request()).await;
        assert_eq!(kind(&error), kind(&plain), "{name}: {error:?} vs {plain:?}");
        assert_eq!(error.url(), plain.url(), "{name}");
        assert_eq!(
            rotating.stats().live_generations(),
            1,
            "{name}: released on error"
        );
    }
}

/// `rotate_on_failures` judges reqwest's responses (status) and errors
/// (`reqwest::Error`).
#[tokio::test]
async fn failure_triggers_see_reqwest_statuses_and_errors() {
    let unavailable = FixedServer::start(503, "text/plain", "down").await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let client = RotatingClientLayer::new(TTL)
        .rotate_on_failures(2, Duration::ZERO, |outcome| {
            outcome.status() == Some(reqwest::StatusCode::SERVICE_UNAVAILABLE)
                || outcome
                    .error::<reqwest::Error>()
                    .is_some_and(reqwest::Error::is_connect)
        })
        .layer(Client::new);
    for _ in 0..2 {
        let response = client
            .execute(get(&unavailable.url("/")))
            .await
            .expect("a response");
        assert_eq!(response.status(), 503, "passed through as is");
    }
    wait_until("two 503s rotate", Duration::from_secs(10), || {
        client.stats().current_generation.0 == 2
    })
    .await;
    for _ in 0..2 {
        let error = client
            .execute(get(&format!("http://{closed}/")))
            .await
            .expect_err("nothing listens");
        assert!(error.is_connect());
    }
    wait_until("two connect errors rotate", Duration::from_secs(10), || {
        client.stats().current_generation.0 == 3
    })
    .await;
}

#[tokio::test]
async fn try_layer_returns_the_first_error_unchanged() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let result = layer().try_layer(move || -> Result<Client, std::io::Error> {
        counted.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no TLS material yet",
        ))
    });
    let error = result.expect_err("the first build fails");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrNotAvailable);
    assert_eq!(error.to_string(), "no TLS material yet");
    assert_eq!(attempts.load(Ordering::SeqCst), 1, "built once");

    // And reqwest's own builder, as the docs show it.
    let client = layer()
        .try_layer(|| Client::builder().pool_max_idle_per_host(4).build())
        .expect("builds");
    assert_eq!(client.stats().current_generation.0, 1);
}

/// Later failures leave the current generation serving, are counted and
/// retried with backoff, then rotation recovers. The clock is paused only
/// while no request is in flight (auto-advance would fire timers while the
/// runtime waits for the kernel); there, the loops sleep rather than jump
/// the clock, so that it never moves while a build runs on the blocking
/// pool.
#[tokio::test]
async fn try_layer_keeps_serving_through_failed_builds_and_recovers() {
    let server = FixedServer::start(200, "text/plain", "ok").await;
    let attempts = Arc::new(AtomicUsize::new(0));
    let factory = {
        let attempts = Arc::clone(&attempts);
        move || -> Result<Client, tower::BoxError> {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if (2..=4).contains(&attempt) {
                return Err(format!("build {attempt}: resolver is down").into());
            }
            Ok(Client::builder().build()?)
        }
    };
    tokio::time::pause();
    let client = RotatingClientLayer::new(Duration::from_secs(600))
        .jitter(0.0)
        .generation_extension(true)
        .build_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .try_layer(factory)
        .expect("the first build succeeds");

    tokio::time::advance(Duration::from_secs(600)).await;
    for _ in 0..1000 {
        if client.stats().failed_builds == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = client.stats();
    assert_eq!(stats.failed_builds, 3, "three failed builds: {stats:?}");
    assert_eq!(stats.current_generation.0, 1, "failures make no generation");
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    tokio::time::resume();

    let response = client.execute(get(&server.url("/"))).await.expect("serves");
    assert_eq!(served_by(&response), 1, "the current generation serves");
    assert_eq!(response.text().await.expect("body"), "ok");

    tokio::time::pause();
    for _ in 0..1000 {
        if client.stats().current_generation.0 == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 2, "recovered: {stats:?}");
    assert_eq!(stats.failed_builds, 3);
    tokio::time::resume();

    let response = client.execute(get(&server.url("/"))).await.expect("serves");
    assert_eq!(served_by(&response), 2, "the new generation serves");
}

/// An inner client that is `Send` but not `Sync`, streaming across
/// rotations from a spawned task.
#[tokio::test]
async fn a_boxed_non_sync_client_streams_across_rotations() {
    type Boxed = BoxCloneService<Request, Response, reqwest::Error>;
    let server = StreamServer::start().await;
    let client: RotatingClient<Boxed> = layer().layer(|| BoxCloneService::new(Client::new()));

    let request = stream_request(&server, CHUNKS);
    let response = tokio::spawn(client.clone().oneshot(request))
        .await
        .expect("task")
        .expect("response head");
    assert_eq!(served_by(&response), 1);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    for _ in 0..MAX_READS {
        let Some(chunk) = stream.next().await else {
            break;
        };
        received.extend_from_slice(&chunk.expect("not cut"));
        client.rotate().await.expect("rotation builds");
        if received.len() < CHUNKS * SIZE {
            assert_eq!(client.stats().live_generations(), 2, "the stream holds 1");
        }
    }
    assert_eq!(received, expected_body(CHUNKS, SIZE));
    let stats = client.stats();
    assert_eq!(stats.live_generations(), 1);
    assert_eq!(stats.failed_builds, 0);
    assert!(stats.rotations >= CHUNKS as u64, "{stats:?}");
}
