//! One test per documented guarantee that a mutation audit found
//! undefended, each on paused time, with the in-memory doubles of
//! `test_utils`.
//!
//! Every test names, in its doc comment, the change to the crate it was
//! seen failing against.

use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{CallOutcome, GenerationId, RotatingClientLayer};

mod test_utils;
use test_utils::{
    advance, next_data, open_request, open_response, open_stream, served_by, settle, BodyError,
    Builds, Mocks, RetireLog, ScriptBody, Step, TagClient,
};

const TTL: Duration = Duration::from_secs(3600);

type Request = http::Request<ScriptBody>;
type Response = http::Response<ScriptBody>;

// ---------------------------------------------------------------------------
// 1. The lease lifecycle, on the plain and on the observing path
// ---------------------------------------------------------------------------

/// The configurations whose responses take different paths through the
/// response future: the plain one, and the two that observe responses.
#[derive(Clone, Copy, Debug)]
enum Path {
    Plain,
    RotateOnFailures,
    GenerationExtension,
}

const PATHS: [Path; 3] = [
    Path::Plain,
    Path::RotateOnFailures,
    Path::GenerationExtension,
];

impl Path {
    fn layer(self) -> RotatingClientLayer {
        let layer = RotatingClientLayer::new(TTL).jitter(0.0);
        match self {
            Path::Plain => layer,
            // A predicate that never fires: only the path matters here.
            Path::RotateOnFailures => {
                layer.rotate_on_failures(1, Duration::ZERO, |_: &CallOutcome<'_>| false)
            }
            Path::GenerationExtension => layer.generation_extension(true),
        }
    }
}

/// How a response stream ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    EndOfStream,
    Error,
    Drop,
}

/// Checks every step of the lease lifecycle of one response whose
/// generation is rotated away while the response is in flight: held while
/// the future is pending, moved into the body, held while the body
/// streams, released at the `ending`, and the generation retired then.
async fn lease_lifecycle(path: Path, ending: Ending) {
    let context = format!("{path:?}, {ending:?}");
    let mocks = Mocks::<Request, Response>::default();
    let retired = RetireLog::default();
    let client = path
        .layer()
        .on_retire(retired.hook())
        .layer(mocks.factory());
    let mut first = mocks.take(1);

    let (tx, request) = open_request();
    let call = tokio::spawn(client.clone().oneshot(request));
    let (request, respond) = first.next_request().await.expect("the request arrives");
    assert_eq!(client.stats().in_flight(), 1, "{context}: the future holds");

    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    settle().await;
    assert!(
        retired.ids().is_empty(),
        "{context}: a pending response future keeps its generation"
    );
    assert_eq!(client.stats().live_generations(), 2, "{context}");

    respond.send_response(http::Response::new(request.into_body()));
    let response = call.await.expect("joined").expect("the response");
    if let Path::GenerationExtension = path {
        assert_eq!(
            response.extensions().get::<GenerationId>(),
            Some(&GenerationId(1)),
            "{context}: tagged with the generation that served it"
        );
    }
    let mut body = response.into_body();
    assert!(
        body.holds_generation(),
        "{context}: the lease moved into the body"
    );
    assert!(
        retired.ids().is_empty(),
        "{context}: the body keeps the generation"
    );

    for chunk in ["a", "b"] {
        tx.send(Step::Data(Bytes::from_static(chunk.as_bytes())))
            .expect("the body is alive");
        assert_eq!(next_data(&mut body).await, chunk, "{context}");
        assert!(
            retired.ids().is_empty() && body.holds_generation(),
            "{context}: held while the body streams"
        );
    }
    let stats = client.stats();
    assert_eq!(
        (stats.live_generations(), stats.in_flight()),
        (2, 1),
        "{context}: generation 1 drains with one response in flight"
    );

    match ending {
        Ending::EndOfStream => {
            drop(tx);
            assert!(body.frame().await.is_none(), "{context}: end of stream");
            assert!(!body.holds_generation(), "{context}: released at the end");
        }
        Ending::Error => {
            tx.send(Step::Error("scripted".into()))
                .expect("the body is alive");
            let error = body.frame().await.expect("a frame").expect_err("an error");
            assert_eq!(
                error,
                BodyError("scripted".into()),
                "{context}: the error passes through"
            );
            assert!(!body.holds_generation(), "{context}: released on error");
        }
        Ending::Drop => drop(body),
    }
    assert_eq!(
        retired.ids(),
        vec![1],
        "{context}: generation 1 retires as soon as its last response lets go"
    );
    let stats = client.stats();
    assert_eq!(
        (stats.live_generations(), stats.in_flight()),
        (1, 0),
        "{context}"
    );
    assert_eq!(stats.forced_retirements, 0, "{context}: not forced");
}

/// Guarantee 1. Seen failing (for the two observing paths only) with the
/// lease dropped on the observing path: in `future.rs`, `observed()`
/// attaching `Attach(None)` instead of the lease.
#[tokio::test(start_paused = true)]
async fn streaming_bodies_hold_their_generation_on_every_response_path() {
    for path in PATHS {
        for ending in [Ending::EndOfStream, Ending::Error, Ending::Drop] {
            lease_lifecycle(path, ending).await;
        }
    }
}

// ---------------------------------------------------------------------------
// 2. A Ready handle keeps its reservation across a rotation
// ---------------------------------------------------------------------------

/// Guarantee 2. Seen failing with the early return for a reserved handle
/// removed from `RotatingClient::poll_ready` (a second poll then reserves
/// the new current generation).
#[tokio::test(start_paused = true)]
async fn a_ready_handle_polled_again_after_a_rotation_calls_the_generation_it_reserved() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .on_retire(retired.hook())
        .layer(builds.factory());
    let mut handle = client.clone();
    handle.ready().await.expect("infallible");

    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    settle().await;
    assert!(
        retired.ids().is_empty(),
        "the reservation keeps generation 1 alive"
    );

    poll_fn(|cx| Service::<Request>::poll_ready(&mut handle, cx))
        .await
        .expect("infallible");
    assert!(
        retired.ids().is_empty(),
        "still reserved after the second poll"
    );
    let (tx, request) = open_request();
    drop(tx);
    let response = handle.call(request).await.expect("infallible");
    assert_eq!(served_by(&response), 1, "call uses the reserved generation");
    drop(response);
    assert_eq!(retired.ids(), vec![1], "released once the call is done");

    // The next request through the same handle moves to generation 2.
    let (_tx, request) = open_request();
    let response = handle.ready().await.expect("infallible").call(request);
    assert_eq!(served_by(&response.await.expect("infallible")), 2);
}

/// A client that is ready only while its gate is open.
#[derive(Clone)]
struct Gated {
    client: TagClient,
    open: Arc<AtomicBool>,
}

impl Service<Request> for Gated {
    type Response = Response;
    type Error = Infallible;
    type Future = <TagClient as Service<Request>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.open.load(Ordering::SeqCst) {
            self.client.poll_ready(cx)
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.client.call(request)
    }
}

/// Guarantee 2, its other half: a handle waiting for readiness reserves
/// nothing, even one that was Ready before. Seen failing with the `Pending`
/// branch of `RotatingClient::poll_cached` no longer clearing the
/// reservation ("a handle waiting for readiness reserves nothing", left 1).
#[tokio::test(start_paused = true)]
async fn a_ready_handle_whose_client_turns_pending_reserves_nothing() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let open = Arc::new(AtomicBool::new(true));
    let factory = {
        let (build, open) = (builds.factory(), Arc::clone(&open));
        move || Gated {
            client: build(),
            open: Arc::clone(&open),
        }
    };
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .on_retire(retired.hook())
        .layer(factory);
    let mut handle = client.clone();
    let mut cx = Context::from_waker(Waker::noop());
    assert!(Service::<Request>::poll_ready(&mut handle, &mut cx).is_ready());
    assert_eq!(
        client.stats().in_flight(),
        1,
        "Ready: generation 1 reserved"
    );

    open.store(false, Ordering::SeqCst);
    assert!(Service::<Request>::poll_ready(&mut handle, &mut cx).is_pending());
    assert_eq!(
        client.stats().in_flight(),
        0,
        "a handle waiting for readiness reserves nothing"
    );
    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    settle().await;
    assert_eq!(retired.ids(), vec![1], "nothing holds generation 1");

    // Ready again: the handle reserves, and calls, the current generation.
    open.store(true, Ordering::SeqCst);
    assert!(Service::<Request>::poll_ready(&mut handle, &mut cx).is_ready());
    let (_tx, request) = open_request();
    let response = handle.call(request).await.expect("infallible");
    assert_eq!(served_by(&response), 2);
}

// ---------------------------------------------------------------------------
// 3. rotate() waits for room under max_live_generations
// ---------------------------------------------------------------------------

/// Guarantee 3. Seen failing with `wait_for_room` removed from
/// `Rotator::rotate` (behind `RotatingClient::rotate`).
#[tokio::test(start_paused = true)]
async fn rotate_waits_for_room_under_the_cap() {
    const CAP: usize = 2;
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .max_live_generations(CAP)
        .on_retire(retired.hook())
        .layer(builds.factory());

    let (first_tx, first) = open_response(&client).await;
    assert_eq!(served_by(&first), 1);
    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    let (_second_tx, second) = open_response(&client).await;
    assert_eq!(served_by(&second), 2);
    assert_eq!(
        client.stats().live_generations(),
        CAP,
        "the cap is full of streaming generations"
    );

    let rotate = tokio::spawn({
        let client = client.clone();
        async move { client.rotate().await }
    });
    for _ in 0..10 {
        advance(Duration::from_secs(60)).await;
        assert!(!rotate.is_finished(), "rotate() waits for room");
        let stats = client.stats();
        assert_eq!(stats.current_generation.0, 2, "nothing swapped in yet");
        assert!(
            stats.live_generations() <= CAP,
            "the cap holds: {} live",
            stats.live_generations()
        );
    }

    drop(first_tx);
    let mut first = first.into_body();
    assert!(first.frame().await.is_none(), "generation 1's stream ends");
    assert_eq!(retired.ids(), vec![1], "generation 1 retires");
    let id = rotate
        .await
        .expect("joined")
        .expect("rotate() completes once there is room");
    assert_eq!(id, GenerationId(3));
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 3);
    assert_eq!(stats.live_generations(), CAP, "2 draining, 3 current");
}

// ---------------------------------------------------------------------------
// 4. A drain timer never keeps a generation alive
// ---------------------------------------------------------------------------

/// Guarantee 4. Seen failing with the drain timer keeping the outgoing
/// generation attached (the `Outgoing` guard moved into the timer task in
/// `Rotator::install` and dropped when it fires, instead of at the swap).
/// Before the leases moved to shards, the same test failed with the timer
/// holding a strong `Arc` of the generation instead of a `Weak`.
#[tokio::test(start_paused = true)]
async fn a_generation_drained_before_its_timeout_retires_at_once_not_forced() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .drain_timeout(Duration::from_secs(60))
        .on_retire(retired.hook())
        .layer(builds.factory());
    let (tx, mut body) = open_stream(&client).await;
    client.rotate().await.expect("builds");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(retired.ids().is_empty(), "the stream is still open");

    drop(tx);
    assert!(body.frame().await.is_none(), "end of stream");
    settle().await;
    let log = retired.all();
    assert_eq!(
        log.iter().map(|g| g.id.0).collect::<Vec<_>>(),
        vec![1],
        "retired at the end of its last stream, through the hook, with the timer still pending"
    );
    assert_eq!(
        log[0].draining_for,
        Some(Duration::from_secs(5)),
        "{:?}",
        log[0]
    );
    let stats = client.stats();
    assert_eq!(stats.forced_retirements, 0);
    assert_eq!(stats.live_generations(), 1);

    advance(Duration::from_secs(60)).await;
    assert_eq!(
        client.stats().forced_retirements,
        0,
        "the timer finds nothing to force"
    );
    assert_eq!(retired.ids(), vec![1], "retired once");
}

// ---------------------------------------------------------------------------
// 5. At the drain timeout the layer drops its copy of the client
// ---------------------------------------------------------------------------

/// Guarantee 5. Seen failing with `Generation::force_retire` keeping the
/// template (the client is not taken out of its slot).
#[tokio::test(start_paused = true)]
async fn at_the_drain_timeout_the_layer_lets_go_of_its_client() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .drain_timeout(Duration::from_secs(60))
        .on_retire(retired.hook())
        .layer(builds.factory());
    let (tx, mut body) = open_stream(&client).await;
    assert_eq!(
        builds.live_copies(1),
        2,
        "only the layer holds client 1 (its template and the clone in this \
         thread's lane): the body needs no copy"
    );
    client.rotate().await.expect("builds");
    advance(Duration::from_secs(59)).await;
    assert_eq!(builds.live_copies(1), 1, "kept while draining");

    advance(Duration::from_secs(1)).await;
    assert_eq!(
        builds.live_copies(1),
        0,
        "at the timeout every copy of client 1 is dropped"
    );
    let stats = client.stats();
    assert_eq!(stats.forced_retirements, 1);
    assert_eq!(stats.live_generations(), 1);
    assert!(retired.ids().is_empty(), "the hook never sees it");

    // The open response is not touched by the layer.
    tx.send(Step::Data(Bytes::from_static(b"late")))
        .expect("the body is alive");
    assert_eq!(next_data(&mut body).await, "late");
    drop(tx);
    assert!(body.frame().await.is_none());
    assert!(retired.ids().is_empty(), "still not handed to the hook");
}

// ---------------------------------------------------------------------------
// 6. A forced retirement, then the last stream's end: retired once
// ---------------------------------------------------------------------------

/// Guarantee 6. Seen failing with the `retired` guard of
/// `Generation::retire` ignored (a plain store instead of checking the
/// swap's result): the end of the stream then retires generation 1 a
/// second time, the live count drops below the truth and the cap lets a
/// third generation in.
#[tokio::test(start_paused = true)]
async fn a_forced_retirement_then_the_end_of_the_stream_retires_once() {
    const CAP: usize = 2;
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .max_live_generations(CAP)
        .drain_timeout(Duration::from_secs(10))
        .on_retire(retired.hook())
        .layer(builds.factory());
    let (tx, mut body) = open_stream(&client).await;
    client.rotate().await.expect("builds");
    advance(Duration::from_secs(10)).await;
    let stats = client.stats();
    assert_eq!(stats.forced_retirements, 1, "forced at the timeout");
    assert_eq!(stats.live_generations(), 1);

    drop(tx);
    assert!(body.frame().await.is_none(), "the stream ends later");
    drop(body);
    settle().await;
    let stats = client.stats();
    assert_eq!(stats.forced_retirements, 1, "counted once");
    assert_eq!(stats.live_generations(), 1);
    assert!(retired.ids().is_empty(), "the hook never sees generation 1");

    // The cap still counts right: generation 2 streaming, 3 current and
    // streaming: a further rotation must wait.
    let (_tx2, second) = open_response(&client).await;
    assert_eq!(served_by(&second), 2);
    assert_eq!(
        client.rotate().await.expect("room for one more"),
        GenerationId(3)
    );
    let (_tx3, third) = open_response(&client).await;
    assert_eq!(served_by(&third), 3);
    let rotate = tokio::spawn({
        let client = client.clone();
        async move { client.rotate().await }
    });
    advance(Duration::from_secs(5)).await;
    assert!(
        !rotate.is_finished(),
        "two live generations fill a cap of two: generation 1 was not subtracted twice"
    );
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 3);
    assert_eq!(stats.live_generations(), CAP);
    rotate.abort();
}

// ---------------------------------------------------------------------------
// 7. The Weak fast path never serves from a generation no longer current
// ---------------------------------------------------------------------------

/// Guarantee 7. Seen failing with the id check of the fast path in
/// `RotatingClient::poll_ready` removed (`if true` instead of comparing
/// `cached.generation` with the current id): the handle's `Weak` still
/// upgrades, since a stream keeps generation 1 alive.
#[tokio::test(start_paused = true)]
async fn a_handle_moves_to_the_new_generation_even_while_its_old_one_is_alive() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .on_retire(retired.hook())
        .layer(builds.factory());
    // A long-lived worker handle, reused for every request. Its first
    // request on a generation clones the client; from its second on it
    // takes its lease on the fast path, through a `Weak` to its shard.
    let mut worker = client.clone();
    let mut open = Vec::new();
    for expected in 1..=4usize {
        if expected > 1 {
            client.rotate().await.expect("builds");
            settle().await;
            assert!(
                !retired.ids().contains(&(expected as u64 - 1)),
                "generation {} is alive: its streams are open",
                expected - 1
            );
        }
        for _ in 0..2 {
            let (tx, request) = open_request();
            let response = worker
                .ready()
                .await
                .expect("infallible")
                .call(request)
                .await
                .expect("infallible");
            assert_eq!(
                served_by(&response),
                expected,
                "served by the current generation"
            );
            open.push((tx, response));
        }
    }
    drop(open);
    assert_eq!(retired.ids(), vec![1, 2, 3], "the old ones retired");
}

// ---------------------------------------------------------------------------
// Jitter separates instances created together
// ---------------------------------------------------------------------------

/// Replaces `trigger::tests::instances_created_together_rotate_at_different_moments`,
/// which stepped time by one second over a jitter range of 360 s, so two
/// jitters landing in the same step (odds about 1 in 360) failed it.
///
/// Here each first rotation is timed by the retire hook to the tokio timer's
/// resolution of 1 ms, with a TTL of 365 days: default lifetimes are
/// uniform over the last 10% of the TTL, a range of 36.5 days or
/// 3.15e9 ms, so two independent draws land on the same millisecond with
/// odds of about 1 in 3e9 (1 ms / range; at most twice that counting
/// neighbouring ticks). Paused time jumps from timer to timer, so the year
/// costs a few hundred timer wake-ups.
#[tokio::test(start_paused = true)]
async fn instances_created_together_rotate_at_different_moments() {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);
    let retired: Vec<RetireLog> = (0..2).map(|_| RetireLog::default()).collect();
    let clients: Vec<_> = retired
        .iter()
        .map(|retired| {
            RotatingClientLayer::new(YEAR)
                .on_retire(retired.hook())
                .layer(Builds::default().factory())
        })
        .collect();
    // Auto-advance: paused time jumps to each timer in turn.
    tokio::time::sleep(YEAR).await;
    settle().await;
    let lifetimes: Vec<Duration> = retired
        .iter()
        .map(|retired| {
            let log = retired.all();
            assert_eq!(log.len(), 1, "each instance rotated once within its TTL");
            assert_eq!(log[0].id, GenerationId(1));
            log[0].age
        })
        .collect();
    for lifetime in &lifetimes {
        assert!(
            *lifetime <= YEAR && *lifetime >= YEAR.mul_f64(0.9),
            "within the default jitter: {lifetime:?}"
        );
    }
    println!("first lifetimes: {lifetimes:?}");
    assert_ne!(
        lifetimes[0], lifetimes[1],
        "default jitter separates instances created together"
    );
    drop(clients);
}
