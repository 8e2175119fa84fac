//! The lifecycle of a generation through `RotatingClient`: rotation on the
//! TTL (with and without jitter) and on `rotate()`, every stage of a
//! response that leases a generation, handles that pin nothing, and
//! retirement exactly once.

mod test_utils;

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{GenerationId, ResponseBody, RotatingClient, RotatingClientLayer};
use tower_test::mock;

use test_utils::{
    advance, live, open_request, open_stream, request, served_by, settle, Builds, Mocks, RetireLog,
    ScriptBody, Step, TagClient,
};

const TTL: Duration = Duration::from_secs(60);

/// One request through this very handle (not a clone): `ready` then
/// `call`, as a long-lived worker does.
async fn call_on(
    handle: &mut RotatingClient<TagClient>,
) -> http::Response<ResponseBody<ScriptBody>> {
    let ready = handle.ready().await.expect("infallible");
    ready.call(request()).await.expect("infallible")
}

fn tagged(ttl: Duration, builds: &Builds, retired: &RetireLog) -> RotatingClient<TagClient> {
    RotatingClientLayer::new(ttl)
        .jitter(0.0)
        .on_retire(retired.tag_hook())
        .layer(builds.factory())
}

#[tokio::test(start_paused = true)]
async fn rotates_exactly_at_the_ttl_without_jitter() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    assert_eq!(
        builds.count(),
        1,
        "the first generation is built in layer()"
    );
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert_eq!(client.stats().current_generation.0, 1, "not yet due");
    assert_eq!(builds.count(), 1);

    advance(Duration::from_millis(1)).await;
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 2, "due at exactly the TTL");
    assert_eq!(stats.rotations, 1);
    assert_eq!(
        stats.current_age(),
        Duration::from_millis(1),
        "swapped at the TTL, the 1 ms `advance` settles for ago"
    );
    assert_eq!(
        retired.ids(),
        vec![1],
        "the idle old generation retires at once"
    );

    advance(TTL).await;
    assert_eq!(client.stats().current_generation.0, 3);
    let response = client.clone().oneshot(request()).await.expect("infallible");
    assert_eq!(
        served_by(&response),
        3,
        "requests go to the current generation"
    );
}

#[tokio::test(start_paused = true)]
async fn jitter_shortens_lifetimes_within_bounds_and_varies() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(Duration::from_secs(100))
        .jitter(0.5)
        .layer(builds.factory());
    settle().await;
    let start = Instant::now();
    let mut births = vec![start];
    let mut seen = 1;
    while births.len() < 30 {
        advance(Duration::from_millis(250)).await;
        let stats = client.stats();
        assert!(
            stats.current_generation.0 <= seen + 1,
            "at most one rotation per step"
        );
        if stats.current_generation.0 > seen {
            seen = stats.current_generation.0;
            births.push(Instant::now() - stats.current_age());
        }
        assert!(
            Instant::now() - start < Duration::from_secs(3100),
            "bounded"
        );
    }
    let lifetimes: Vec<Duration> = births.windows(2).map(|w| w[1] - w[0]).collect();
    for lifetime in &lifetimes {
        assert!(
            (Duration::from_secs(50)..=Duration::from_secs(100)).contains(lifetime),
            "lifetime {lifetime:?} outside ttl * [0.5, 1.0]"
        );
    }
    let shortest = lifetimes.iter().min().expect("some");
    let longest = lifetimes.iter().max().expect("some");
    assert!(
        *longest - *shortest > Duration::from_secs(10),
        "jitter varies: {lifetimes:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn default_jitter_is_within_ten_percent() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(Duration::from_secs(100)).layer(builds.factory());
    tokio::time::sleep(Duration::from_secs(90) - Duration::from_millis(1)).await;
    assert_eq!(
        client.stats().current_generation.0,
        1,
        "never before 90% of the TTL"
    );
    advance(Duration::from_secs(10)).await;
    assert_eq!(
        client.stats().current_generation.0,
        2,
        "never after the TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn duration_max_never_rotates_on_time() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(Duration::MAX).layer(builds.factory());
    settle().await;
    for _ in 0..3 {
        advance(Duration::from_secs(400 * 24 * 60 * 60)).await;
    }
    assert_eq!(client.stats().current_generation.0, 1);
    assert_eq!(builds.count(), 1);
    assert_eq!(
        client.rotate().await.expect("builds"),
        GenerationId(2),
        "rotate() still works"
    );
    advance(Duration::from_secs(400 * 24 * 60 * 60)).await;
    assert_eq!(client.stats().current_generation.0, 2);
}

#[tokio::test(start_paused = true)]
async fn a_generation_lives_through_every_stage_of_a_response() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let mut handle = client.clone();

    // Ready: the reservation alone keeps generation 1.
    handle.ready().await.expect("infallible");
    assert_eq!(client.stats().in_flight(), 1, "reserved");
    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    assert_eq!(
        live(&client.stats()),
        vec![1, 2],
        "reserved generation drains"
    );
    assert!(retired.ids().is_empty());

    // Called: the future holds it.
    let (tx, req) = open_request();
    let future = handle.call(req);
    assert!(retired.ids().is_empty(), "the response future holds it");

    // Response: the body holds it.
    let response = future.await.expect("infallible");
    assert_eq!(served_by(&response), 1, "call used the reserved generation");
    let mut body = response.into_body();
    assert!(retired.ids().is_empty(), "the body holds it");

    // Half-read.
    tx.send(Step::Data("half".into())).expect("body alive");
    body.frame().await.expect("frame").expect("data");
    assert!(retired.ids().is_empty(), "half-read body holds it");
    assert_eq!(client.stats().generations[0].in_flight, 1);

    // End of stream: released before the body is dropped.
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(retired.ids(), vec![1], "released at end of stream");
    assert!(!body.holds_generation());
    assert_eq!(live(&client.stats()), vec![2]);
    drop(body);
    assert_eq!(retired.ids(), vec![1], "retired exactly once");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_body_mid_stream_releases_its_generation() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let (tx, mut body) = open_stream(&client).await;
    tx.send(Step::Data("x".into())).expect("alive");
    body.frame().await.expect("frame").expect("data");
    advance(TTL).await;
    assert_eq!(client.stats().current_generation.0, 2);
    assert!(
        retired.ids().is_empty(),
        "an open stream keeps generation 1"
    );
    drop(body);
    assert_eq!(retired.ids(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_body_error_passes_through_and_releases() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let (tx, mut body) = open_stream(&client).await;
    client.rotate().await.expect("builds");
    tx.send(Step::Error("connection reset".into()))
        .expect("alive");
    let error = body.frame().await.expect("frame").expect_err("inner error");
    assert_eq!(error.0, "connection reset", "the inner error, unchanged");
    assert_eq!(retired.ids(), vec![1], "released on error");
}

/// A client service whose generations are tower-test mocks, one handle
/// per build.
type MockClient = mock::Mock<http::Request<&'static str>, http::Response<ScriptBody>>;

type MockHandle = mock::Handle<http::Request<&'static str>, http::Response<ScriptBody>>;

fn mocked(
    layer: RotatingClientLayer,
) -> (
    RotatingClient<MockClient>,
    Mocks<http::Request<&'static str>, http::Response<ScriptBody>>,
    RetireLog,
) {
    let mocks = Mocks::default();
    let retired = RetireLog::default();
    let client = layer.on_retire(retired.hook()).layer(mocks.factory());
    (client, mocks, retired)
}

/// Expects the next request on `handle` to carry `body`, and answers it.
async fn respond(handle: &mut MockHandle, body: &str) {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!(
        *request.body(),
        body,
        "the request reached the expected generation"
    );
    send.send_response(http::Response::new(ScriptBody::empty()));
}

#[tokio::test(start_paused = true)]
async fn a_pending_response_future_holds_its_generation_until_dropped() {
    let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
    let mut svc = client.clone();
    svc.ready().await.expect("ready");
    let future = svc.call(http::Request::new("hello"));
    let mut first = handles.take(1);
    let (_request, _send) = first
        .next_request()
        .await
        .expect("request reached generation 1");
    client.rotate().await.expect("builds");
    assert!(
        retired.ids().is_empty(),
        "the pending future holds generation 1"
    );
    assert_eq!(client.stats().in_flight(), 1);
    drop(future);
    assert_eq!(
        retired.ids(),
        vec![1],
        "released when the future is dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn an_inner_call_error_passes_through_and_releases() {
    let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
    let mut svc = client.clone();
    svc.ready().await.expect("ready");
    let future = svc.call(http::Request::new("hello"));
    let mut first = handles.take(1);
    let (_request, send) = first.next_request().await.expect("request");
    client.rotate().await.expect("builds");
    send.send_error(std::io::Error::other("upstream said no"));
    let error = future.await.expect_err("the inner error");
    assert_eq!(error.to_string(), "upstream said no", "unchanged");
    assert_eq!(retired.ids(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_pins_the_generation_that_call_uses_across_a_swap() {
    let (client, handles, _retired) = mocked(RotatingClientLayer::new(TTL));
    let mut first = handles.take(1);
    let mut svc = client.clone();
    svc.ready().await.expect("ready on generation 1");
    client.rotate().await.expect("builds");
    advance(TTL / 2).await;
    let future = svc.call(http::Request::new("pinned"));
    respond(&mut first, "pinned").await;
    future.await.expect("response");

    // The next poll_ready moves the same handle to generation 2.
    let mut second = handles.take(2);
    svc.ready().await.expect("ready on generation 2");
    let future = svc.call(http::Request::new("moved"));
    respond(&mut second, "moved").await;
    future.await.expect("response");
}

#[tokio::test(start_paused = true)]
async fn a_handle_pending_in_poll_ready_reserves_nothing() {
    let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
    let mut first = handles.take(1);
    first.allow(0);
    let mut svc = tokio_test::task::spawn(client.clone());
    tokio_test::assert_pending!(svc.enter(|cx, mut svc| svc.as_mut().poll_ready(cx)));
    assert_eq!(client.stats().in_flight(), 0, "pending reserves nothing");
    client.rotate().await.expect("builds");
    assert_eq!(retired.ids(), vec![1], "a pending handle does not pin");
    tokio_test::assert_ready_ok!(svc.enter(|cx, mut svc| svc.as_mut().poll_ready(cx)));
    let future = svc.call(http::Request::new("after"));
    let mut second = handles.take(2);
    respond(&mut second, "after").await;
    future.await.expect("response");
}

#[tokio::test(start_paused = true)]
async fn idle_and_stored_handles_pin_nothing() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let state = tagged(TTL, &builds, &retired); // like axum State: stored, cloned
    let stored_clone = state.clone();
    let mut worker = state.clone();
    // A finished request leaves a stale clone in `worker`.
    let response = call_on(&mut worker).await;
    assert_eq!(served_by(&response), 1);
    drop(response);
    assert_eq!(state.stats().in_flight(), 0);

    advance(TTL).await;
    assert_eq!(
        retired.ids(),
        vec![1],
        "neither the idle worker nor stored clones pin"
    );
    let response = call_on(&mut worker).await;
    assert_eq!(served_by(&response), 2, "the idle worker moved on");
    drop(stored_clone);
}

#[tokio::test(start_paused = true)]
async fn a_clone_starts_with_nothing_reserved() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let mut ready = client.clone();
    ready.ready().await.expect("ready");
    let copy = ready.clone();
    assert_eq!(client.stats().in_flight(), 1, "only the original reserved");
    drop(ready);
    assert_eq!(
        client.stats().in_flight(),
        0,
        "dropping a ready handle releases it"
    );
    let mut copy = copy;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy.call(request())));
    assert!(result.is_err(), "the clone has no reservation to call on");
}

#[tokio::test]
#[should_panic(expected = "called before poll_ready")]
async fn call_without_poll_ready_panics() {
    let client = RotatingClientLayer::new(TTL).layer(Builds::default().factory());
    drop(client.clone().call(request()));
}

#[tokio::test(start_paused = true)]
async fn rotate_makes_the_next_call_use_the_new_generation() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let mut handle = client.clone();
    let before = call_on(&mut handle).await;
    assert_eq!(served_by(&before), 1);
    advance(TTL / 2).await;
    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    let after = call_on(&mut handle).await;
    assert_eq!(
        served_by(&after),
        2,
        "a call started after rotate() uses the new client"
    );
    assert_eq!(client.stats().current_age(), Duration::ZERO);
    // The new generation gets a full TTL from the rotation.
    tokio::time::sleep(TTL - Duration::from_millis(1)).await;
    assert_eq!(client.stats().current_generation.0, 2);
    advance(Duration::from_millis(1)).await;
    assert_eq!(client.stats().current_generation.0, 3);
    assert_eq!(retired.ids(), vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn every_generation_retires_exactly_once_including_at_shutdown() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = tagged(TTL, &builds, &retired);
    let (tx, body) = open_stream(&client).await;
    for _ in 0..3 {
        advance(TTL).await;
    }
    assert_eq!(client.stats().current_generation.0, 4);
    assert_eq!(retired.ids(), vec![2, 3], "1 is still streaming");
    drop(client);
    assert_eq!(
        retired.ids(),
        vec![2, 3, 4],
        "the last generation retires with the last handle"
    );
    drop(tx);
    drop(body);
    assert_eq!(retired.ids(), vec![2, 3, 4, 1]);
    let infos = retired.all();
    assert!(infos
        .iter()
        .zip(retired.clients())
        .all(|(info, id)| id.map(|id| id as u64) == Some(info.id.0)));
    assert_eq!(infos[3].requests, 1);

    // The background task stopped with the last handle: no more builds.
    let built = builds.count();
    advance(TTL * 10).await;
    assert_eq!(
        builds.count(),
        built,
        "nothing runs after the last handle is gone"
    );
}
