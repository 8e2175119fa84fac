//! Test doubles shared by the unit tests: a scripted body, a client that
//! tags responses with the generation that served them, and a recording
//! retire hook.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;
use tower_service::Service;

use crate::stats::GenerationStats;

/// One step of a scripted body.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Data(&'static str),
    Trailers(HeaderMap),
    Error(&'static str),
    /// Return `Pending` once (and wake at once).
    Pending,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BodyError(pub(crate) &'static str);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body error: {}", self.0)
    }
}

impl std::error::Error for BodyError {}

/// A body that yields its script step by step, then whatever arrives on
/// its channel, and ends when the script is done and the sender dropped.
#[derive(Debug)]
pub(crate) struct ScriptBody {
    script: VecDeque<Step>,
    rx: Option<mpsc::UnboundedReceiver<Step>>,
    /// Reported by `is_end_stream` once the script is empty.
    end_hint: bool,
    size_hint: SizeHint,
}

impl ScriptBody {
    /// A body with a fixed script and nothing more.
    pub(crate) fn script(steps: impl IntoIterator<Item = Step>) -> Self {
        ScriptBody {
            script: steps.into_iter().collect(),
            rx: None,
            end_hint: false,
            size_hint: SizeHint::default(),
        }
    }

    /// A body that is empty and says so (HEAD, 204).
    pub(crate) fn empty() -> Self {
        ScriptBody {
            end_hint: true,
            size_hint: SizeHint::with_exact(0),
            ..ScriptBody::script([])
        }
    }

    /// A body fed by the returned sender: it stays open until the sender
    /// is dropped.
    pub(crate) fn channel() -> (mpsc::UnboundedSender<Step>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            ScriptBody {
                rx: Some(rx),
                ..ScriptBody::script([])
            },
        )
    }

    /// Reports `is_end_stream() == true` as soon as the script is empty.
    pub(crate) fn with_end_hint(mut self) -> Self {
        self.end_hint = true;
        self
    }

    pub(crate) fn with_size_hint(mut self, hint: SizeHint) -> Self {
        self.size_hint = hint;
        self
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let step = match self.script.pop_front() {
            Some(step) => Some(step),
            None => match self.rx.as_mut() {
                Some(rx) => match rx.poll_recv(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(step) => step,
                },
                None => None,
            },
        };
        match step {
            None => Poll::Ready(None),
            Some(Step::Data(data)) => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
            }
            Some(Step::Trailers(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Some(Step::Error(message)) => Poll::Ready(Some(Err(BodyError(message)))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.end_hint && self.script.is_empty() && self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

/// A client that answers each request with the body the request carries,
/// tagged with the id of the client (the build number) in `x-client`, and
/// with the status named by the request's `x-status` header, if any.
#[derive(Debug, Clone)]
pub(crate) struct TagClient {
    pub(crate) id: usize,
}

impl Service<http::Request<ScriptBody>> for TagClient {
    type Response = http::Response<ScriptBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<ScriptBody>) -> Self::Future {
        let status = request
            .headers()
            .get("x-status")
            .and_then(|status| http::StatusCode::from_bytes(status.as_bytes()).ok());
        let mut response = http::Response::new(request.into_body());
        if let Some(status) = status {
            *response.status_mut() = status;
        }
        response.headers_mut().insert(
            "x-client",
            self.id
                .to_string()
                .parse()
                .expect("a number is a header value"),
        );
        std::future::ready(Ok(response))
    }
}

/// Which client served a response.
pub(crate) fn served_by<B>(response: &http::Response<B>) -> usize {
    response.headers()["x-client"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number")
}

/// Counts builds and hands out `TagClient`s numbered from 1.
#[derive(Debug, Clone, Default)]
pub(crate) struct Builds(pub(crate) Arc<AtomicUsize>);

impl Builds {
    pub(crate) fn factory(&self) -> impl Fn() -> TagClient + Send + Sync + 'static {
        let builds = Arc::clone(&self.0);
        move || TagClient {
            id: builds.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Records `(client id, generation figures)` of every retirement.
#[derive(Debug, Clone, Default)]
pub(crate) struct Retired(pub(crate) Arc<Mutex<Vec<(usize, GenerationStats)>>>);

impl Retired {
    pub(crate) fn hook(&self) -> impl Fn(TagClient, GenerationStats) + Send + Sync + 'static {
        let log = Arc::clone(&self.0);
        move |client, generation| {
            log.lock()
                .expect("not poisoned")
                .push((client.id, generation))
        }
    }

    /// Client ids in the order they were retired.
    pub(crate) fn ids(&self) -> Vec<usize> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn all(&self) -> Vec<(usize, GenerationStats)> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// Lets spawned tasks (the driver) run until they are idle. Under paused
/// time, a 1 ms sleep auto-advances only once every other task is idle.
pub(crate) async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Advances paused time by `by`, in steps, letting the driver act in
/// between.
pub(crate) async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    settle().await;
}
