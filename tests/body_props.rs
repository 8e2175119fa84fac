//! Property tests for `ResponseBody`, through the public API only.
//!
//! Each case scripts a body (data frames, some of them empty, `Pending`,
//! trailers, errors, an end-of-stream hint that turns true after some step,
//! a size hint per step, and an early drop), sends it through a
//! `RotatingClient` over an echo client, and rotates, so that the response's
//! generation is draining and held by nothing but the body. The body is
//! then polled step by step next to a second copy of the same script polled
//! directly, and after every step:
//!
//! - the wrapper returned exactly what the inner body returned, and reports
//!   the same `is_end_stream()` and `size_hint()`;
//! - the generation is held exactly until the earliest correct moment: the
//!   poll that returned `None`, an error, trailers, or a frame after which
//!   `is_end_stream()` is true; the drop; or at once for a body that is
//!   empty from the start. `holds_generation()`, `stats()` and the retire
//!   hook (called exactly once) must all agree.

mod test_utils;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tower::{Layer, ServiceExt};
use tower_rotating_client::{GenerationId, ResponseBody, RotatingClient, RotatingClientLayer};

use test_utils::{BodyError, Builds, RetireLog, ScriptBody, Step, TagClient};

/// One step of a generated script; [`Script::body`] turns it into the
/// shared body's step.
#[derive(Clone, Debug)]
enum Kind {
    /// A data frame of this many bytes (zero is an empty frame).
    Data(usize),
    /// `Pending` once (waking at once); the next poll goes on.
    Pending,
    Trailers,
    Error(u8),
}

#[derive(Clone, Debug)]
struct Script {
    steps: Vec<Kind>,
    /// `is_end_stream()` is true once this many steps have been taken.
    end_hint_at: Option<usize>,
    /// `size_hint()` after `n` steps: `(lower, upper)` at index `n`.
    size_hints: Vec<(u64, Option<u64>)>,
    /// The response body is dropped before this poll (0 = unpolled).
    drop_before_poll: Option<usize>,
}

impl Script {
    /// A body that plays the script; two bodies of one script behave alike.
    fn body(&self) -> ScriptBody {
        // The content names the step, so a reordered frame shows.
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(step, kind)| match *kind {
                Kind::Data(len) => Step::Data(Bytes::from(vec![step as u8; len])),
                Kind::Pending => Step::Pending,
                Kind::Trailers => {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-step", step.into());
                    Step::Trailers(trailers)
                }
                Kind::Error(code) => Step::Error(format!("scripted error {code} at step {step}")),
            });
        let hints = self.size_hints.iter().map(|&(lower, upper)| {
            let mut hint = SizeHint::new();
            hint.set_lower(lower);
            if let Some(upper) = upper {
                hint.set_upper(upper);
            }
            hint
        });
        let body = ScriptBody::script(steps).with_size_hints(hints.collect());
        match self.end_hint_at {
            Some(at) => body.with_end_hint_at(at),
            None => body,
        }
    }
}

/// A poll result in comparable form.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Data(Bytes),
    Trailers(HeaderMap),
    Error(BodyError),
    End,
}

impl Outcome {
    fn of(poll: Poll<Option<Result<Frame<Bytes>, BodyError>>>) -> Self {
        match poll {
            Poll::Pending => Outcome::Pending,
            Poll::Ready(None) => Outcome::End,
            Poll::Ready(Some(Err(error))) => Outcome::Error(error),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => Outcome::Data(data),
                Err(frame) => Outcome::Trailers(frame.into_trailers().expect("data or trailers")),
            },
        }
    }
}

fn hint_of(body: &impl Body) -> (u64, Option<u64>) {
    let hint = body.size_hint();
    (hint.lower(), hint.upper())
}

/// Whether generation 1 is held, as seen by the retire hook and `stats()`.
/// Generation 2 is current and idle.
fn check_lease<S: Clone + Send + Sync + 'static>(
    client: &RotatingClient<S>,
    retired: &RetireLog,
    held: bool,
    at: &str,
) -> Result<(), TestCaseError> {
    let expected: &[u64] = if held { &[] } else { &[1] };
    prop_assert_eq!(
        retired.ids(),
        expected,
        "{}: retire hook calls (held: {})",
        at,
        held
    );
    let stats = client.stats();
    prop_assert_eq!(stats.in_flight(), usize::from(held), "{}: in flight", at);
    prop_assert_eq!(
        stats.live_generations(),
        1 + usize::from(held),
        "{}: live generations",
        at
    );
    Ok(())
}

/// What released the generation, first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Release {
    EmptyFromTheStart,
    EndOfStream,
    Error,
    Trailers,
    EndHintAfterData,
    Drop,
}

/// Runs one script; returns what released the generation.
async fn run(script: Script) -> Result<Release, TestCaseError> {
    let retired = RetireLog::default();
    let client = RotatingClientLayer::new(Duration::from_secs(3600))
        .on_retire(retired.hook())
        .layer(Builds::default().factory());
    let response = client
        .clone()
        .oneshot(http::Request::new(script.body()))
        .await
        .expect("infallible");
    // From here on, only the body can keep generation 1 alive.
    prop_assert_eq!(client.rotate().await.expect("a sync build").0, 2);

    let mut body = Some(response.into_body());
    let mut reference = script.body();
    let mut cx = Context::from_waker(Waker::noop());

    // An empty body (hint true from the start) never holds.
    let mut held = !reference.is_end_stream();
    let mut release = (!held).then_some(Release::EmptyFromTheStart);
    let wrapped = body.as_ref().expect("not dropped yet");
    prop_assert_eq!(wrapped.holds_generation(), held, "at construction");
    prop_assert_eq!(wrapped.is_end_stream(), reference.is_end_stream());
    prop_assert_eq!(hint_of(wrapped), hint_of(&reference), "size hint at start");
    check_lease(&client, &retired, held, "at construction")?;

    // Every step is polled, then one more poll that sees `None`.
    for poll in 0..=script.steps.len() {
        if script.drop_before_poll == Some(poll) {
            body = None;
            held = false;
            release.get_or_insert(Release::Drop);
            check_lease(&client, &retired, held, "after the drop")?;
            break;
        }
        let wrapped = body.as_mut().expect("not dropped yet");
        let got = Outcome::of(Pin::new(&mut *wrapped).poll_frame(&mut cx));
        let want = Outcome::of(Pin::new(&mut reference).poll_frame(&mut cx));
        let at = format!("poll {poll}");
        prop_assert_eq!(&got, &want, "{}: same frame", at);
        prop_assert_eq!(
            wrapped.is_end_stream(),
            reference.is_end_stream(),
            "{}: same is_end_stream",
            at
        );
        prop_assert_eq!(
            hint_of(wrapped),
            hint_of(&reference),
            "{}: same size hint",
            at
        );
        let over = match want {
            Outcome::Pending => None,
            Outcome::Data(_) => reference
                .is_end_stream()
                .then_some(Release::EndHintAfterData),
            Outcome::Trailers(_) => Some(Release::Trailers),
            Outcome::Error(_) => Some(Release::Error),
            Outcome::End => Some(Release::EndOfStream),
        };
        if held && over.is_some() {
            held = false;
            release = over;
        }
        prop_assert_eq!(wrapped.holds_generation(), held, "{}: holds", at);
        check_lease(&client, &retired, held, &at)?;
        if want == Outcome::End {
            break;
        }
    }
    prop_assert!(!held, "the end of the script releases");
    let release = release.expect("released");

    drop(body);
    prop_assert_eq!(retired.ids(), [1], "dropping after release");
    drop(client);
    prop_assert_eq!(
        retired.ids(),
        [1, 2],
        "each generation retired exactly once"
    );
    Ok(release)
}

// ---------------------------------------------------------------------------
// Examples, one way to release each
// ---------------------------------------------------------------------------

/// Sends `inner` through a rotating client over an echo client: the
/// response body is then the only lease on the generation.
async fn leased(inner: ScriptBody) -> (RotatingClient<TagClient>, ResponseBody<ScriptBody>) {
    let client =
        RotatingClientLayer::new(Duration::from_secs(3600)).layer(Builds::default().factory());
    let response = client
        .clone()
        .oneshot(http::Request::new(inner))
        .await
        .expect("infallible");
    (client, response.into_body())
}

/// Whether the body still leases its generation, as `stats()` sees it.
fn held(client: &RotatingClient<TagClient>) -> bool {
    client.stats().in_flight() > 0
}

fn trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("valid"));
    trailers
}

#[tokio::test]
async fn forwards_data_and_releases_at_end_of_stream_before_drop() {
    let (probe, mut body) = leased(ScriptBody::script([
        Step::Data("a".into()),
        Step::Pending,
        Step::Data("b".into()),
    ]))
    .await;
    assert!(held(&probe), "a new body holds its generation");
    let frame = body.frame().await.expect("a frame").expect("not an error");
    assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"a"));
    assert!(held(&probe), "half-read: still held");
    let frame = body.frame().await.expect("a frame").expect("not an error");
    assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"b"));
    assert!(held(&probe), "no end hint yet: still held");
    assert!(
        body.frame().await.is_none(),
        "inner end of stream is forwarded"
    );
    assert!(
        !held(&probe),
        "released at end of stream, while the body is alive"
    );
    assert!(!body.holds_generation());
}

#[tokio::test]
async fn releases_on_the_frame_after_which_is_end_stream_turns_true() {
    let (probe, mut body) =
        leased(ScriptBody::script([Step::Data("last".into())]).with_end_hint()).await;
    assert!(!body.is_end_stream(), "not over before the last frame");
    body.frame().await.expect("a frame").expect("not an error");
    assert!(body.is_end_stream(), "is_end_stream is forwarded");
    assert!(
        !held(&probe),
        "released with the last frame, without waiting for None"
    );
}

#[tokio::test]
async fn forwards_trailers_and_releases_with_them() {
    let (probe, mut body) = leased(ScriptBody::script([
        Step::Data("x".into()),
        Step::Trailers(trailers()),
    ]))
    .await;
    body.frame().await.expect("a frame").expect("not an error");
    assert!(held(&probe));
    let frame = body.frame().await.expect("a frame").expect("not an error");
    assert_eq!(frame.into_trailers().expect("trailers")["grpc-status"], "0");
    assert!(!held(&probe), "trailers end the stream");
}

#[tokio::test]
async fn forwards_errors_unchanged_and_releases() {
    let (probe, mut body) = leased(ScriptBody::script([
        Step::Data("x".into()),
        Step::Error("reset".into()),
    ]))
    .await;
    body.frame().await.expect("a frame").expect("not an error");
    let error = body
        .frame()
        .await
        .expect("a frame")
        .expect_err("the inner error");
    assert_eq!(
        error,
        BodyError("reset".into()),
        "the inner error, untouched"
    );
    assert!(!held(&probe), "released on error");
}

#[tokio::test]
async fn releases_on_drop_mid_stream() {
    let (probe, mut body) = leased(ScriptBody::script([
        Step::Data("x".into()),
        Step::Data("y".into()),
    ]))
    .await;
    body.frame().await.expect("a frame").expect("not an error");
    assert!(held(&probe));
    drop(body);
    assert!(!held(&probe), "released on drop");
}

#[tokio::test]
async fn an_empty_body_never_holds() {
    let (probe, body) = leased(ScriptBody::empty()).await;
    assert!(!held(&probe), "HEAD / 204: nothing to wait for");
    assert!(body.is_end_stream());
    assert_eq!(body.size_hint().exact(), Some(0));
}

/// A generation that looks at each response (here for the generation
/// extension) keeps the lease until the head is judged, then lets an empty
/// body go like any other.
#[tokio::test]
async fn an_empty_body_never_holds_when_its_generation_looks_at_responses() {
    let client = RotatingClientLayer::new(Duration::from_secs(3600))
        .generation_extension(true)
        .layer(Builds::default().factory());
    let response = client
        .clone()
        .oneshot(http::Request::new(ScriptBody::empty()))
        .await
        .expect("infallible");
    assert_eq!(
        response.extensions().get::<GenerationId>(),
        Some(&GenerationId(1)),
        "the head was judged with the lease"
    );
    assert!(!held(&client), "HEAD / 204: nothing to wait for");
    assert!(!response.body().holds_generation());
}

#[tokio::test]
async fn forwards_size_hint() {
    let mut hint = SizeHint::new();
    hint.set_lower(3);
    hint.set_upper(10);
    let (_probe, body) =
        leased(ScriptBody::script([Step::Data("abc".into())]).with_size_hint(hint)).await;
    assert_eq!(body.size_hint().lower(), 3);
    assert_eq!(body.size_hint().upper(), Some(10));
}

// ---------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------

fn step() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (0usize..4).prop_map(Kind::Data),
        1 => Just(Kind::Pending),
        1 => Just(Kind::Trailers),
        1 => any::<u8>().prop_map(Kind::Error),
    ]
}

fn size_hint() -> impl Strategy<Value = (u64, Option<u64>)> {
    (0u64..64, proptest::option::of(0u64..64))
        .prop_map(|(lower, extra)| (lower, extra.map(|extra| lower + extra)))
}

fn script() -> impl Strategy<Value = Script> {
    proptest::collection::vec(step(), 0..8)
        .prop_flat_map(|steps| {
            let len = steps.len();
            (
                Just(steps),
                proptest::option::of(0..=len),
                proptest::collection::vec(size_hint(), len + 1),
                proptest::option::of(0..=len + 1),
            )
        })
        .prop_map(
            |(steps, end_hint_at, size_hints, drop_before_poll)| Script {
                steps,
                end_hint_at,
                size_hints,
                drop_before_poll,
            },
        )
}

#[test]
fn the_body_forwards_everything_and_releases_exactly_once_at_the_right_step() {
    let releases = RefCell::new(BTreeMap::<Release, u32>::new());
    let mut runner = TestRunner::new(ProptestConfig::with_cases(256));
    let result = runner.run(&script(), |script| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let release = runtime.block_on(run(script))?;
        *releases.borrow_mut().entry(release).or_default() += 1;
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    // Shrinking never ran (no failure), so these are the 256 cases.
    let releases = releases.into_inner();
    println!("body_props: releases by cause over 256 cases: {releases:?}");
    assert_eq!(
        releases.len(),
        6,
        "the scripts reach every way to release: {releases:?}"
    );
}
