//! Rotation triggers besides the TTL and `rotate()`: a request cap per
//! generation, consecutive failures, the opt-in generation extension, and
//! the staggered first rotation.

mod test_utils;

use std::time::Duration;

use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_rotating_client::{CallOutcome, GenerationId, RotatingClient, RotatingClientLayer};

use test_utils::{advance, served_by, settle, Builds, Mocks, ScriptBody, TagClient};

const TTL: Duration = Duration::from_secs(3600);

fn request(status: Option<u16>) -> http::Request<ScriptBody> {
    let mut request = http::Request::new(ScriptBody::empty());
    if let Some(status) = status {
        request.headers_mut().insert("x-status", status.into());
    }
    request
}

async fn send<S>(client: &RotatingClient<S>, status: Option<u16>) -> usize
where
    S: tower_service::Service<
            http::Request<ScriptBody>,
            Response = http::Response<ScriptBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
{
    let response = client
        .clone()
        .oneshot(request(status))
        .await
        .expect("infallible");
    served_by(&response)
}

#[tokio::test(start_paused = true)]
async fn max_requests_per_generation_rotates_after_n_requests() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(TTL)
        .max_requests_per_generation(3)
        .layer(builds.factory());
    for _ in 0..2 {
        assert_eq!(send(&client, None).await, 1);
    }
    settle().await;
    assert_eq!(
        client.stats().current_generation.0,
        1,
        "two requests: under the cap"
    );
    assert_eq!(
        send(&client, None).await,
        1,
        "the third is still served by generation 1"
    );
    settle().await;
    let stats = client.stats();
    assert_eq!(
        stats.current_generation.0, 2,
        "rotated once the cap was reached"
    );
    assert_eq!(stats.generations.last().map(|g| g.requests), Some(0));
    for _ in 0..3 {
        assert_eq!(send(&client, None).await, 2);
    }
    settle().await;
    assert_eq!(
        client.stats().current_generation.0,
        3,
        "every generation has the cap"
    );
}

#[test]
#[should_panic(expected = "`max_requests_per_generation` must be at least 1")]
fn zero_max_requests_panics() {
    let _ = RotatingClientLayer::new(TTL).max_requests_per_generation(0);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_rotate_with_a_minimum_interval() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(TTL)
        .rotate_on_failures(3, Duration::from_secs(10), |outcome: &CallOutcome<'_>| {
            outcome.status() == Some(http::StatusCode::SERVICE_UNAVAILABLE)
        })
        .layer(builds.factory());
    // Two failures, a success, two failures: never three in a row.
    for status in [503, 503, 200, 503, 503] {
        send(&client, Some(status)).await;
    }
    settle().await;
    assert_eq!(
        client.stats().current_generation.0,
        1,
        "a success resets the count"
    );

    assert_eq!(send(&client, Some(503)).await, 1);
    settle().await;
    assert_eq!(
        client.stats().current_generation.0,
        2,
        "three in a row rotate"
    );

    // Generation 2 fails at once: the next rotation waits for the
    // minimum interval since the last one.
    for _ in 0..3 {
        assert_eq!(send(&client, Some(503)).await, 2);
    }
    advance(Duration::from_secs(9)).await;
    assert_eq!(client.stats().current_generation.0, 2, "no rebuild storm");
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        client.stats().current_generation.0,
        3,
        "rotates once the interval has passed"
    );
    assert_eq!(builds.count(), 3);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_count_as_failures_through_a_downcast() {
    let mocks = Mocks::<http::Request<()>, http::Response<ScriptBody>>::default();
    let client = RotatingClientLayer::new(TTL)
        .rotate_on_failures(2, Duration::ZERO, |outcome: &CallOutcome<'_>| {
            outcome.error::<tower_rotating_client::BoxError>().is_some()
        })
        .layer(mocks.factory());
    let mut first = mocks.take(1);
    for _ in 0..2 {
        let call = tokio::spawn(client.clone().oneshot(http::Request::new(())));
        let (_, send) = first.next_request().await.expect("a request");
        send.send_error("connection refused");
        let error = call.await.expect("joined").expect_err("the inner error");
        assert_eq!(
            error.to_string(),
            "connection refused",
            "errors pass through"
        );
    }
    settle().await;
    assert_eq!(client.stats().current_generation.0, 2);
}

#[tokio::test(start_paused = true)]
async fn the_generation_extension_is_opt_in() {
    let builds = Builds::default();
    let plain = RotatingClientLayer::new(TTL).layer(builds.factory());
    let response = plain.clone().oneshot(request(None)).await.expect("ok");
    assert!(
        response.extensions().get::<GenerationId>().is_none(),
        "off by default"
    );

    let tagged = RotatingClientLayer::new(TTL)
        .generation_extension(true)
        .layer(Builds::default().factory());
    tagged.rotate().await.expect("builds");
    let response = tagged.clone().oneshot(request(None)).await.expect("ok");
    assert_eq!(
        response.extensions().get::<GenerationId>(),
        Some(&GenerationId(2))
    );
}

/// When each client first rotates, stepping paused time by `step`.
async fn first_rotations(clients: &[RotatingClient<TagClient>], step: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let mut rotated = vec![None; clients.len()];
    while rotated.iter().any(Option::is_none) {
        assert!(
            Instant::now() - start <= TTL,
            "every first rotation happens within the TTL"
        );
        advance(step).await;
        for (client, rotated) in clients.iter().zip(&mut rotated) {
            if rotated.is_none() && client.stats().current_generation.0 > 1 {
                *rotated = Some(Instant::now() - start);
            }
        }
    }
    rotated.into_iter().flatten().collect()
}

#[tokio::test(start_paused = true)]
async fn stagger_spreads_first_rotations_over_the_whole_ttl() {
    let clients: Vec<_> = (0..40)
        .map(|_| {
            RotatingClientLayer::new(TTL)
                .stagger_first_rotation(true)
                .layer(Builds::default().factory())
        })
        .collect();
    let rotations = first_rotations(&clients, Duration::from_secs(60)).await;
    let earliest = rotations.iter().min().expect("some");
    let latest = rotations.iter().max().expect("some");
    assert!(
        *latest - *earliest > TTL / 2,
        "40 instances should spread over more than half the TTL: {rotations:?}"
    );
    let mut minutes: Vec<_> = rotations.iter().map(|d| d.as_secs() / 60).collect();
    minutes.dedup();
    assert!(minutes.len() > 1, "not all in the same minute");
}
