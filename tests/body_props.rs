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
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use tower::{service_fn, Layer, ServiceExt};
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

use test_utils::RetireLog;

/// One step of a scripted body.
#[derive(Clone, Debug)]
enum Step {
    /// A data frame of this many bytes (zero is an empty frame).
    Data(usize),
    /// `Pending` once (waking at once); the next poll goes on.
    Pending,
    Trailers,
    Error(u8),
}

#[derive(Clone, Debug)]
struct Script {
    steps: Vec<Step>,
    /// `is_end_stream()` is true once this many steps have been taken.
    end_hint_at: Option<usize>,
    /// `size_hint()` after `n` steps: `(lower, upper)` at index `n`.
    size_hints: Vec<(u64, Option<u64>)>,
    /// The response body is dropped before this poll (0 = unpolled).
    drop_before_poll: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ScriptError {
    step: usize,
    code: u8,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "scripted error {} at step {}", self.code, self.step)
    }
}

impl std::error::Error for ScriptError {}

/// A body that plays its script; two copies of one script behave alike.
#[derive(Debug)]
struct ScriptBody {
    script: Arc<Script>,
    taken: usize,
}

impl ScriptBody {
    fn new(script: &Arc<Script>) -> Self {
        ScriptBody {
            script: Arc::clone(script),
            taken: 0,
        }
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = ScriptError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ScriptError>>> {
        let step = self.taken;
        let Some(next) = self.script.steps.get(step).cloned() else {
            return Poll::Ready(None);
        };
        self.taken += 1;
        Poll::Ready(Some(match next {
            // The content names the step, so a reordered frame shows.
            Step::Data(len) => Ok(Frame::data(Bytes::from(vec![step as u8; len]))),
            Step::Pending => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Step::Trailers => {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-step", step.into());
                Ok(Frame::trailers(trailers))
            }
            Step::Error(code) => Err(ScriptError { step, code }),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.script.end_hint_at.is_some_and(|at| self.taken >= at)
    }

    fn size_hint(&self) -> SizeHint {
        let hints = &self.script.size_hints;
        let (lower, upper) = hints[self.taken.min(hints.len() - 1)];
        let mut hint = SizeHint::new();
        hint.set_lower(lower);
        if let Some(upper) = upper {
            hint.set_upper(upper);
        }
        hint
    }
}

/// The inner client: answers every request with the request's own body.
fn echo(
    request: http::Request<ScriptBody>,
) -> std::future::Ready<Result<http::Response<ScriptBody>, Infallible>> {
    std::future::ready(Ok(http::Response::new(request.into_body())))
}

/// A poll result in comparable form.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Pending,
    Data(Bytes),
    Trailers(HeaderMap),
    Error(ScriptError),
    End,
}

impl Outcome {
    fn of(poll: Poll<Option<Result<Frame<Bytes>, ScriptError>>>) -> Self {
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
    prop_assert_eq!(stats.in_flight, usize::from(held), "{}: in flight", at);
    prop_assert_eq!(
        stats.live_generations,
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
    let script = Arc::new(script);
    let retired = RetireLog::default();
    let client = RotatingClientLayer::new(Duration::from_secs(3600))
        .on_retire(retired.hook())
        .layer(|| service_fn(echo));
    let response = client
        .clone()
        .oneshot(http::Request::new(ScriptBody::new(&script)))
        .await
        .expect("infallible");
    // From here on, only the body can keep generation 1 alive.
    prop_assert_eq!(client.rotate().await.expect("a sync build"), 2);

    let mut body = Some(response.into_body());
    let mut reference = ScriptBody::new(&script);
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

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..4).prop_map(Step::Data),
        1 => Just(Step::Pending),
        1 => Just(Step::Trailers),
        1 => any::<u8>().prop_map(Step::Error),
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
