//! Fault injection: upstream deaths and resets, misbehaving factories,
//! cancellation under load, and runtime shutdown.
//!
//! Each case checks what a user of the layer expects: errors that belong to
//! a request reach its caller unchanged, rotation causes no error of its
//! own, no request waits for a build, and nothing is leaked (every
//! generation retires exactly once, and every client is dropped).
//!
//! Cases with sockets run in real time with short TTLs; the others run on
//! a paused clock, where "no request waits" means "no time passes while a
//! request is served".

mod test_utils;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::error::Error as _;
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};
use tower::{Layer, ServiceExt};
use tower_rotating_client::{RotateError, RotatingClient, RotatingClientLayer, Stats};

use test_utils::{
    expected_body, read_at_least, request, served_by, stream_request, AbortOnDropClient,
    HttpVersion, LiveCounter, RetireLog, StreamServer, TagClient, XorShift, H_FAIL_AFTER,
};

/// Bound on every real-time test body, so that nothing hangs.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

/// Reads a body to its end, keeping the inner error type.
async fn read_rest<B>(mut body: B) -> Result<Vec<u8>, B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// The kind of the `io::Error` in `error`'s source chain, if any.
fn io_error_kind(error: &hyper::Error) -> Option<ErrorKind> {
    std::iter::successors(error.source(), |&e| e.source())
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind)
}

type Legacy = Client<HttpConnector, Empty<Bytes>>;

fn legacy_client() -> Legacy {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends one request every `every` for `total` (paused time). Asserts that
/// none of them waited, and returns the build that served each.
async fn serve_for(
    client: &RotatingClient<TagClient>,
    total: Duration,
    every: Duration,
) -> Vec<u64> {
    let end = Instant::now() + total;
    let mut served = Vec::new();
    while Instant::now() < end {
        let start = Instant::now();
        let response = client.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a request never waits for a build"
        );
        served.push(served_by(&response) as u64);
        sleep(every).await;
    }
    served
}

/// Counts factory calls; `n` is 1 for the first build.
#[derive(Clone, Default)]
struct Calls(Arc<AtomicU64>);

impl Calls {
    fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Counts the build futures that have started and not been dropped.
#[derive(Clone, Default)]
struct Alive(Arc<AtomicUsize>);

struct AliveGuard(Arc<AtomicUsize>);

impl Alive {
    fn guard(&self) -> AliveGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        AliveGuard(Arc::clone(&self.0))
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Prints the figures of a case (see RELIABILITY.md; `-- --nocapture`).
/// Reached only once every assertion of the case held, so nothing was lost.
fn report(case: &str, requests: u64, rotations: u64, faults: &str) {
    println!("{case}: {requests} requests, {rotations} rotations, {faults}, nothing lost");
}

/// Waits (real time, bounded) until `done()`, for effects that another
/// thread completes.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}

/// Runs `f` on its own thread and fails if it does not finish within
/// `deadline`: for cases where a hang would otherwise block the test.
fn on_thread_with_deadline<T: Send + 'static>(
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (done, result) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = done.send(f());
    });
    match result.recv_timeout(deadline) {
        Ok(value) => {
            thread.join().expect("finished");
            value
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(thread.join().expect_err("panicked"))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung for {deadline:?}"),
    }
}

/// Awaits a real-time case, failing it if it outlasts [`DEADLINE`].
async fn within_deadline<T>(case: impl Future<Output = T>) -> T {
    timeout(DEADLINE, case).await.expect("within the deadline")
}

/// What the cases over [`AbortOnDropClient`]s share: an upstream, and a
/// rotating client that speaks `version` to it, with its clients counted
/// and its retirements recorded. The TTL is a minute: generations change
/// only on `rotate()`.
async fn loopback(
    version: HttpVersion,
) -> (
    StreamServer,
    RotatingClient<AbortOnDropClient>,
    LiveCounter,
    RetireLog,
) {
    let server = StreamServer::start().await;
    let (addr, counter, retired) = (server.addr(), LiveCounter::new(), RetireLog::default());
    let client = {
        let counter = counter.clone();
        RotatingClientLayer::new(Duration::from_secs(60))
            .on_retire(retired.hook())
            .layer(move || AbortOnDropClient::with_version(addr, counter.clone(), version))
    };
    (server, client, counter, retired)
}

/// The text of h2's error under `error`: h2 does not expose its
/// `io::Error` as a source, so its text is all there is to check.
fn h2_error_text(error: &hyper::Error) -> String {
    error.source().map(ToString::to_string).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Upstream faults (loopback, real time)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_killed_upstream_fails_its_streams_with_hypers_error_and_a_restarted_one_serves() {
    let server = StreamServer::start().await;
    let addr = server.addr();
    let retired = RetireLog::default();
    let client = RotatingClientLayer::new(Duration::from_millis(40))
        .on_retire(retired.hook())
        .layer(legacy_client);

    within_deadline(async {
        // Six long streams spread over three generations, two of them
        // draining when the server dies.
        let mut bodies = Vec::new();
        for i in 0..6 {
            if i % 2 == 0 {
                client.rotate().await.expect("a sync build");
            }
            let request = stream_request(server.uri("/"), 1000, 10, 64);
            let response = client.clone().oneshot(request).await.expect("a head");
            let mut body = response.into_body();
            let first = read_at_least(&mut body, 64).await.expect("a first chunk");
            assert_eq!(first[..64], expected_body(1, 64)[..], "stream {i} started");
            bodies.push(body);
        }
        assert!(bodies.iter().all(|body| body.holds_generation()));

        server.shutdown();
        for body in bodies {
            // The static type is hyper's own error: nothing wraps it.
            let error: hyper::Error = read_rest(body).await.expect_err("cut by the server");
            let kind = io_error_kind(&error);
            assert!(
                matches!(
                    kind,
                    Some(ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset)
                ),
                "hyper's cut-connection error, as the inner client reported it: {error:?}"
            );
        }

        // While the upstream is down, requests fail with the inner client's
        // own connect error.
        let error = client
            .clone()
            .oneshot(stream_request(server.uri("/"), 1, 0, 64))
            .await
            .expect_err("nothing listens");
        assert!(error.is_connect(), "hyper-util's connect error: {error:?}");

        // Restarted on the same port: every stream succeeds, across timed
        // rotations and a `rotate()`.
        let server = StreamServer::start_on(addr).await;
        let mut streams = JoinSet::new();
        for i in 0..8 {
            let client = client.clone();
            let request = stream_request(server.uri("/"), 10, 5, 64);
            streams.spawn(async move {
                let response = client.oneshot(request).await.expect("a head");
                let body = read_rest(response.into_body()).await;
                (i, body.expect("no error after the restart"))
            });
        }
        client.rotate().await.expect("a sync build");
        while let Some(joined) = streams.join_next().await {
            let (i, body) = joined.expect("no panic");
            assert_eq!(body, expected_body(10, 64), "stream {i} is whole");
        }
        assert_eq!(server.total_requests(), 8, "the restarted server served");
    })
    .await;

    let stats = client.stats();
    assert_eq!(stats.in_flight(), 0, "{stats:?}");
    assert_eq!(stats.live_generations(), 1, "{stats:?}");
    assert!(stats.rotations >= 4, "{stats:?}");
    retired.assert_each_once(stats.rotations);
    drop(client);
    retired.assert_each_once(stats.rotations + 1);
    report(
        "upstream killed and restarted",
        6 + 1 + 8,
        stats.rotations,
        "1 shutdown cutting 6 streams, 1 refused connect, 1 restart",
    );
}

#[tokio::test]
async fn killed_h2_connections_fail_their_streams_and_the_next_requests_reconnect() {
    let (server, client, counter, retired) = loopback(HttpVersion::Http2).await;

    within_deadline(async {
        // Two streams on each of two generations: two h2 connections.
        let mut bodies = Vec::new();
        for i in 0..4 {
            if i == 2 {
                client.rotate().await.expect("a sync build");
            }
            let request = stream_request(server.uri("/"), 1000, 10, 64);
            let mut body = client
                .clone()
                .oneshot(request)
                .await
                .expect("a head")
                .into_body();
            read_at_least(&mut body, 64).await.expect("a first chunk");
            bodies.push(body);
        }
        assert_eq!(server.total_connections(), 2);

        server.kill_connections();
        for body in bodies {
            let error: hyper::Error = read_rest(body).await.expect_err("killed");
            // h2's "stream closed because of a broken pipe".
            let h2 = h2_error_text(&error);
            assert!(
                h2.contains("broken pipe") || h2.contains("reset"),
                "the connection's error, as hyper reported it: {error:?}"
            );
        }
        assert_eq!(retired.assert_each_once(1), BTreeSet::from([1]));

        // The current generation's client dials again; nothing else changed.
        for _ in 0..3 {
            let response = client
                .clone()
                .oneshot(stream_request(server.uri("/"), 5, 1, 64))
                .await
                .expect("a head");
            let body = read_rest(response.into_body()).await;
            assert_eq!(body.expect("whole"), expected_body(5, 64));
        }
        assert_eq!(server.total_connections(), 3, "one new connection");
    })
    .await;
    assert_eq!(client.stats().current_generation.0, 2);
    drop(client);
    retired.assert_each_once(2);
    assert_eq!(counter.live(), 0, "no client leaked");
    report("h2 connections killed", 4 + 3, 1, "2 connections killed");
}

/// Accepts one connection, reads the request head, sends a head announcing
/// 1000 bytes and 100 of them, then resets the connection (`SO_LINGER` 0)
/// when told to.
async fn resetting_server() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let (reset, reset_now) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.expect("read the request");
            assert!(n > 0, "the client closed before its request");
            head.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            .await
            .expect("write the head");
        tcp.write_all(&[7; 100])
            .await
            .expect("write part of the body");
        let _ = reset_now.await;
        tcp.set_zero_linger().expect("SO_LINGER 0");
        drop(tcp); // sends RST
    });
    (addr, reset)
}

#[tokio::test]
async fn a_connection_reset_mid_body_reaches_the_caller_as_the_inner_io_error() {
    let (addr, reset) = resetting_server().await;
    let retired = RetireLog::default();
    let client = RotatingClientLayer::new(Duration::from_secs(60))
        .on_retire(retired.hook())
        .layer(legacy_client);

    within_deadline(async {
        let uri: http::Uri = format!("http://{addr}/").parse().expect("a uri");
        let request = Request::get(uri).body(Empty::new()).expect("a request");
        let response = client.clone().oneshot(request).await.expect("a head");
        let mut body = response.into_body();
        let start = read_at_least(&mut body, 100)
            .await
            .expect("the first bytes");
        assert_eq!(start, [7; 100]);

        // Generation 1 now drains, held by this body alone.
        client.rotate().await.expect("a sync build");
        assert!(retired.all().is_empty(), "held by the open body");

        reset.send(()).expect("the server waits");
        let error: hyper::Error = read_rest(body).await.expect_err("reset by the peer");
        assert_eq!(
            io_error_kind(&error),
            Some(ErrorKind::ConnectionReset),
            "the peer's reset, as hyper reported it: {error:?}"
        );
        // The error ended the stream, and released the generation with it.
        assert_eq!(retired.assert_each_once(1), BTreeSet::from([1]));
    })
    .await;
    assert_eq!(client.stats().in_flight(), 0);
    report("connection reset", 1, 1, "1 RST mid-body");
}

#[tokio::test]
async fn an_h2_stream_reset_by_the_server_fails_only_that_stream() {
    let (server, client, counter, retired) = loopback(HttpVersion::Http2).await;

    within_deadline(async {
        let mut failing = stream_request(server.uri("/"), 10, 5, 64);
        failing.headers_mut().insert(H_FAIL_AFTER, 3.into());
        let response = client.clone().oneshot(failing).await.expect("a head");
        let neighbour = client
            .clone()
            .oneshot(stream_request(server.uri("/"), 10, 5, 64))
            .await
            .expect("a head");
        client.rotate().await.expect("a sync build");

        let mut body = response.into_body();
        let received = read_at_least(&mut body, 3 * 64).await.expect("3 chunks");
        assert_eq!(received, expected_body(3, 64));
        let error: hyper::Error = read_rest(body).await.expect_err("RST_STREAM");
        // h2's RST_STREAM (INTERNAL_ERROR) under hyper's error, untouched.
        let h2 = h2_error_text(&error);
        assert!(
            h2.contains("stream error received"),
            "h2's reset under hyper: {error:?}"
        );
        assert!(retired.all().is_empty(), "the neighbour still holds gen 1");

        let neighbour = read_rest(neighbour.into_body()).await;
        assert_eq!(
            neighbour.expect("the same connection's other stream is untouched"),
            expected_body(10, 64)
        );
        assert_eq!(retired.assert_each_once(1), BTreeSet::from([1]));
    })
    .await;
    assert_eq!(
        server.total_connections(),
        1,
        "both streams shared one h2 connection"
    );
    drop(client);
    assert_eq!(counter.live(), 0, "every client dropped");
    report("h2 stream reset", 2, 1, "1 RST_STREAM");
}

// ---------------------------------------------------------------------------
// Factory faults (in memory, paused time)
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_async_factory_failing_k_times_in_a_row_then_recovering() {
    const K: u64 = 5;
    let calls = Calls::default();
    let factory = {
        let calls = calls.clone();
        move || {
            let build = calls.next();
            async move {
                if (2..2 + K).contains(&build) {
                    Err(std::io::Error::other(format!("build {build} fails")))
                } else {
                    Ok(TagClient::new(build as usize))
                }
            }
        }
    };
    let client = RotatingClientLayer::new(Duration::from_secs(1))
        .jitter(0.0)
        .build_backoff(Duration::from_millis(100), Duration::from_millis(100))
        .layer_async(factory)
        .await
        .expect("the first build succeeds");

    let served = serve_for(
        &client,
        Duration::from_millis(2500),
        Duration::from_millis(10),
    )
    .await;
    let stats = client.stats();
    assert_eq!(stats.failed_builds, K, "{stats:?}");
    assert_eq!(stats.rotations, 2, "recovered, then rotated on time again");
    assert_eq!(
        stats.current_generation.0, 3,
        "failed builds make no generation"
    );
    // Build 1 served past its TTL until build K + 2 (the first to succeed)
    // took over; no request ever saw a failed build.
    let first_new = served.iter().position(|&b| b != 1).expect("rotated");
    assert_eq!(served[first_new], K + 2);
    assert!(first_new > 100, "build 1 served past its 1 s TTL");
    assert!(served.windows(2).all(|w| w[0] <= w[1]), "{served:?}");
    assert_eq!(calls.count(), K + 3, "no build beyond the retries");
    report(
        "factory fails K times",
        served.len() as u64,
        stats.rotations,
        &format!("{K} failed builds"),
    );
}

#[tokio::test(start_paused = true)]
async fn an_async_factory_slower_than_the_ttl_rotates_at_build_pace() {
    const BUILD: Duration = Duration::from_millis(200);
    let calls = Calls::default();
    let factory = {
        let calls = calls.clone();
        move || {
            let build = calls.next();
            async move {
                if build > 1 {
                    sleep(BUILD).await;
                }
                Ok::<_, Infallible>(TagClient::new(build as usize))
            }
        }
    };
    let client = RotatingClientLayer::new(Duration::from_millis(50))
        .layer_async(factory)
        .await
        .expect("infallible");

    let total = Duration::from_secs(3);
    let served = serve_for(&client, total, Duration::from_millis(5)).await;
    let stats = client.stats();
    assert_eq!(stats.failed_builds, 0, "slow is not failed: {stats:?}");
    // One build at a time, each taking 200 ms, started at most 50 ms after
    // the previous swap.
    let rotations = stats.rotations;
    assert!(rotations <= 15, "at most one swap per build: {rotations}");
    assert!(
        rotations >= 11,
        "a swap as soon as each build is done: {rotations}"
    );
    // Every generation served while it was current, in order.
    let distinct: BTreeSet<u64> = served.iter().copied().collect();
    assert_eq!(distinct.len() as u64, rotations + 1, "{served:?}");
    assert!(served.windows(2).all(|w| w[0] <= w[1]), "{served:?}");
    report(
        "factory slower than the TTL",
        served.len() as u64,
        rotations,
        &format!("{rotations} builds of 4 TTLs"),
    );
}

/// A client (TTL 100 ms, no jitter) whose async factory never finishes the
/// builds that `hangs` picks (build 1 must finish): each such build gives up
/// after `build_timeout`, and the next one starts `backoff` later. The
/// factory counts its calls in `calls`, and its build futures that are not
/// dropped yet in `alive`.
async fn hanging_builds(
    hangs: fn(u64) -> bool,
    build_timeout: Duration,
    backoff: Duration,
    calls: &Calls,
    alive: &Alive,
) -> RotatingClient<TagClient> {
    let factory = {
        let (calls, alive) = (calls.clone(), alive.clone());
        move || {
            let build = calls.next();
            let guard = alive.guard();
            async move {
                let _guard = guard;
                if hangs(build) {
                    std::future::pending::<()>().await;
                }
                Ok::<_, Infallible>(TagClient::new(build as usize))
            }
        }
    };
    RotatingClientLayer::new(Duration::from_millis(100))
        .jitter(0.0)
        .build_timeout(build_timeout)
        .build_backoff(backoff, backoff)
        .layer_async(factory)
        .await
        .expect("infallible")
}

#[tokio::test(start_paused = true)]
async fn a_hanging_factory_is_cut_by_build_timeout_and_the_current_generation_serves_on() {
    let (calls, alive) = (Calls::default(), Alive::default());
    let client = hanging_builds(
        |build| build > 1,
        Duration::from_millis(50),
        Duration::from_millis(20),
        &calls,
        &alive,
    )
    .await;

    let served = serve_for(&client, Duration::from_secs(2), Duration::from_millis(10)).await;
    assert!(served.iter().all(|&b| b == 1), "build 1 serves throughout");
    let stats = client.stats();
    assert_eq!(stats.rotations, 0);
    // Every 50 to 70 ms, one build gives up.
    assert!(stats.failed_builds >= 25, "{stats:?}");
    let in_progress = calls.count() - 1 - stats.failed_builds;
    assert!(in_progress <= 1, "each timed-out build counted: {stats:?}");
    assert_eq!(
        alive.count() as u64,
        in_progress,
        "timed-out builds are dropped, not leaked"
    );

    let error = client.rotate().await.expect_err("it hangs");
    assert!(error.is_timeout(), "{error}");
    assert_eq!(client.stats().current_generation.0, 1);
    report(
        "factory that never finishes",
        served.len() as u64,
        0,
        &format!("{} builds timed out", stats.failed_builds + 1),
    );
}

#[tokio::test(start_paused = true)]
async fn a_factory_that_hangs_only_sometimes_keeps_rotating() {
    let (calls, alive) = (Calls::default(), Alive::default());
    let client = hanging_builds(
        |build| build % 2 == 0,
        Duration::from_millis(30),
        Duration::from_millis(10),
        &calls,
        &alive,
    )
    .await;

    let served = serve_for(&client, Duration::from_secs(2), Duration::from_millis(10)).await;
    let stats = client.stats();
    // Each hang costs one timeout and one retry, well within the TTL.
    assert!(stats.rotations >= 12, "{stats:?}");
    assert!(stats.failed_builds >= 12, "{stats:?}");
    let accounted = stats.rotations + stats.failed_builds;
    assert!(
        (0..=1).contains(&(calls.count() - 1 - accounted)),
        "every build is a rotation, a failure, or in progress: {stats:?}"
    );
    assert!(
        alive.count() as u64 <= calls.count() - 1 - accounted,
        "hung builds are dropped on timeout"
    );
    assert!(
        served.iter().all(|b| b % 2 == 1),
        "no hung build ever serves"
    );
    report(
        "factory that hangs every other build",
        served.len() as u64,
        stats.rotations,
        &format!("{} builds timed out", stats.failed_builds),
    );
}

/// What the panicking-factory cases check: builds 2 and 3 (the panicking
/// ones) failed, rotation resumed after them, and neither ever served.
fn assert_builds_2_and_3_failed(stats: &Stats, served: &[u64]) {
    assert_eq!(stats.failed_builds, 2, "{stats:?}");
    assert!(stats.rotations >= 5, "rotation resumed: {stats:?}");
    let builds: BTreeSet<u64> = served.iter().copied().collect();
    assert!(!builds.contains(&2) && !builds.contains(&3));
    assert!(builds.contains(&4), "the first good build took over");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_sync_factory_never_reaches_a_request() {
    let calls = Calls::default();
    let retired = RetireLog::default();
    let factory = {
        let calls = calls.clone();
        move || {
            let build = calls.next();
            if (2..=3).contains(&build) {
                panic!("injected factory panic {build}");
            }
            TagClient::new(build as usize)
        }
    };
    let client = RotatingClientLayer::new(Duration::from_millis(100))
        .jitter(0.0)
        .build_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .on_retire(retired.hook())
        .layer(factory);

    // A panic reaches the caller of `rotate()` as a `RotateError`.
    let error: RotateError = client.rotate().await.expect_err("build 2 panics");
    assert!(error.is_panic(), "{error}");
    assert!(
        error.to_string().contains("injected factory panic 2"),
        "{error}"
    );

    let served = serve_for(&client, Duration::from_secs(1), Duration::from_millis(10)).await;
    let stats = client.stats();
    assert_builds_2_and_3_failed(&stats, &served);
    retired.assert_each_once(stats.rotations);
    report(
        "sync factory panics",
        served.len() as u64,
        stats.rotations,
        "2 panics",
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_async_factory_never_reaches_a_request() {
    // Build 2 panics when called, build 3 when its future is polled.
    let calls = Calls::default();
    let factory = {
        let calls = calls.clone();
        move || {
            let build = calls.next();
            assert_ne!(build, 2, "injected factory panic");
            async move {
                assert_ne!(build, 3, "injected build future panic");
                Ok::<_, Infallible>(TagClient::new(build as usize))
            }
        }
    };
    let client = RotatingClientLayer::new(Duration::from_millis(100))
        .jitter(0.0)
        .build_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .layer_async(factory)
        .await
        .expect("infallible");

    let served = serve_for(&client, Duration::from_secs(1), Duration::from_millis(10)).await;
    let stats = client.stats();
    assert_builds_2_and_3_failed(&stats, &served);
    report(
        "async factory panics",
        served.len() as u64,
        stats.rotations,
        "2 panics",
    );
}

// ---------------------------------------------------------------------------
// Cancellation under load (loopback, real time)
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Tally {
    whole: u64,
    /// Response futures dropped before the head arrived.
    futures_dropped: u64,
    /// Bodies dropped unread or part-read.
    bodies_dropped: u64,
}

impl Tally {
    fn total(&self) -> u64 {
        self.whole + self.futures_dropped + self.bodies_dropped
    }
}

/// One worker: `requests` streams, each either read whole (and checked),
/// its body dropped after a random number of chunks, or its response future
/// dropped after a random delay.
async fn cancelling_worker(
    client: RotatingClient<AbortOnDropClient>,
    uri: http::Uri,
    seed: u64,
    requests: usize,
) -> Tally {
    let mut rng = XorShift::new(seed);
    let mut tally = Tally::default();
    for _ in 0..requests {
        let chunks = 1 + rng.below(16) as usize;
        let delay_ms = 1 + rng.below(3);
        let call = client
            .clone()
            .oneshot(stream_request(uri.clone(), chunks, delay_ms, 64));
        match rng.below(3) {
            0 => {
                let give_up = Duration::from_micros(rng.below(300));
                match timeout(give_up, call).await {
                    Ok(response) => {
                        drop(response.expect("no error without a fault"));
                        tally.bodies_dropped += 1;
                    }
                    Err(_elapsed) => tally.futures_dropped += 1,
                }
            }
            1 => {
                let mut body = call.await.expect("a head").into_body();
                let keep = rng.below(chunks as u64) as usize * 64;
                read_at_least(&mut body, keep).await.expect("no error");
                drop(body);
                tally.bodies_dropped += 1;
            }
            _ => {
                let body = read_rest(call.await.expect("a head").into_body()).await;
                let body = body.expect("rotation never cuts a stream");
                assert_eq!(body, expected_body(chunks, 64), "a whole stream");
                tally.whole += 1;
            }
        }
    }
    tally
}

async fn cancellation_under_load(version: HttpVersion) {
    const WORKERS: u64 = 8;
    const REQUESTS: usize = 40;
    const ROTATE_CALLS: u64 = 30;
    // Rotations come from `rotate()` only, so that they are over (and the
    // figures below settled) once the rotator is done; timed ones race with
    // requests in the other cases and in the soak.
    let (server, client, counter, retired) = loopback(version).await;

    let tally = within_deadline(async {
        let mut workers = JoinSet::new();
        for seed in 1..=WORKERS {
            workers.spawn(cancelling_worker(
                client.clone(),
                server.uri("/"),
                seed,
                REQUESTS,
            ));
        }
        let rotator = {
            let client = client.clone();
            tokio::spawn(async move {
                for _ in 0..ROTATE_CALLS {
                    sleep(Duration::from_millis(10)).await;
                    client.rotate().await.expect("a sync build");
                }
            })
        };
        let mut total = Tally::default();
        while let Some(tally) = workers.join_next().await {
            let tally = tally.expect("no panic");
            total.whole += tally.whole;
            total.futures_dropped += tally.futures_dropped;
            total.bodies_dropped += tally.bodies_dropped;
        }
        rotator.await.expect("no panic");
        total
    })
    .await;
    let requests = WORKERS * REQUESTS as u64;
    assert_eq!(tally.total(), requests);
    assert!(tally.whole > 0 && tally.futures_dropped > 0 && tally.bodies_dropped > 0);

    let stats = client.stats();
    assert_eq!(stats.in_flight(), 0, "nothing left in flight: {stats:?}");
    assert_eq!(stats.live_generations(), 1, "all drained: {stats:?}");
    assert_eq!(stats.rotations, ROTATE_CALLS, "{stats:?}");
    retired.assert_each_once(ROTATE_CALLS);
    assert_eq!(counter.live(), 1, "only the current client is alive");
    drop(client);
    // The last generation retires on the thread that lets go of it last.
    eventually("the last generation retires", || {
        retired.all().len() as u64 > ROTATE_CALLS
    })
    .await;
    retired.assert_each_once(ROTATE_CALLS + 1);
    let served: u64 = retired.all().iter().map(|g| g.requests).sum();
    assert_eq!(served, requests, "every request counted by one generation");
    assert_eq!(counter.live(), 0, "no client leaked");
    assert_eq!(counter.created() as u64, ROTATE_CALLS + 1);
    report(
        &format!("cancellation under load, {version:?}"),
        requests,
        ROTATE_CALLS,
        &format!(
            "{} futures and {} bodies dropped early ({} streams read whole)",
            tally.futures_dropped, tally.bodies_dropped, tally.whole
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_futures_and_bodies_at_random_under_load_leaks_nothing_h1() {
    cancellation_under_load(HttpVersion::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_futures_and_bodies_at_random_under_load_leaks_nothing_h2() {
    cancellation_under_load(HttpVersion::Http2).await;
}

// ---------------------------------------------------------------------------
// Runtime shutdown
// ---------------------------------------------------------------------------

/// Starts six endless streams over three generations on `runtime`, shuts
/// the runtime down with `shutdown`, and checks that every generation
/// retires once everything is dropped.
fn shut_down_with_streams_in_flight(
    runtime: tokio::runtime::Runtime,
    shutdown: impl FnOnce(tokio::runtime::Runtime),
) {
    let (server, client, counter, retired) = runtime.block_on(async {
        let (server, client, counter, retired) = loopback(HttpVersion::Http1).await;
        let (started, mut all_started) = tokio::sync::mpsc::channel(6);
        for i in 0..6 {
            if i % 2 == 0 && i > 0 {
                client.rotate().await.expect("a sync build");
            }
            let (client, started) = (client.clone(), started.clone());
            let request = stream_request(server.uri("/"), 100_000, 10, 64);
            tokio::spawn(async move {
                let response = client.oneshot(request).await.expect("a head");
                let mut body = response.into_body();
                read_at_least(&mut body, 64).await.expect("a first chunk");
                started.send(()).await.expect("the test waits");
                // 100,000 chunks: the runtime goes first.
                let _ = read_rest(body).await;
            });
            all_started.recv().await.expect("stream started");
        }
        (server, client, counter, retired)
    });
    let stats = client.stats();
    assert_eq!(stats.in_flight(), 6, "{stats:?}");
    assert_eq!(stats.live_generations(), 3, "{stats:?}");
    assert!(retired.all().is_empty(), "everything still streaming");

    shutdown(runtime);
    // The runtime dropped the tasks, hence the bodies: the draining
    // generations retired on that drop.
    assert_eq!(retired.assert_each_once(2), BTreeSet::from([1, 2]));
    assert_eq!(client.stats().in_flight(), 0);
    drop(client);
    assert_eq!(retired.assert_each_once(3), BTreeSet::from([1, 2, 3]));
    drop(server);
    assert_eq!(counter.live(), 0, "no client leaked");
    assert_eq!(counter.created(), 3);
    report("runtime shut down", 6, 2, "1 shutdown with 6 streams open");
}

#[test]
fn dropping_a_multi_thread_runtime_with_streams_in_flight() {
    on_thread_with_deadline(DEADLINE, || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        shut_down_with_streams_in_flight(runtime, drop);
    });
}

#[test]
fn shutting_down_a_current_thread_runtime_with_streams_in_flight() {
    on_thread_with_deadline(DEADLINE, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        shut_down_with_streams_in_flight(runtime, |runtime| {
            runtime.shutdown_timeout(Duration::from_secs(5));
        });
    });
}
