//! In-memory test doubles: a scripted body, a client that tags responses
//! with the build that served them and counts its live copies, a build
//! counter, tower-test mocks one per build, and paused-time helpers. They use no item of the crate, so that the crate's own unit
//! tests can include this file too.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower_service::Service;
use tower_test::mock;

/// One step of a scripted body.
#[derive(Debug, Clone)]
pub enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    Error(String),
    /// Return `Pending` once (and wake at once).
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "body error: {}", self.0)
    }
}

impl std::error::Error for BodyError {}

/// A body that yields its script step by step, then whatever arrives on
/// its channel, and ends when the script is done and the sender dropped.
#[derive(Debug)]
pub struct ScriptBody {
    script: VecDeque<Step>,
    /// Steps taken so far (script and channel).
    taken: usize,
    rx: Option<mpsc::UnboundedReceiver<Step>>,
    /// `is_end_stream()` is true once this many steps have been taken (and
    /// there is no channel).
    end_hint_at: Option<usize>,
    /// `size_hint()` after `n` steps: index `n`, the last one repeating.
    size_hints: Vec<SizeHint>,
}

impl ScriptBody {
    /// A body with a fixed script and nothing more.
    pub fn script(steps: impl IntoIterator<Item = Step>) -> Self {
        ScriptBody {
            script: steps.into_iter().collect(),
            taken: 0,
            rx: None,
            end_hint_at: None,
            size_hints: vec![SizeHint::default()],
        }
    }

    /// A body that is empty and says so (HEAD, 204).
    pub fn empty() -> Self {
        ScriptBody::script([])
            .with_end_hint()
            .with_size_hint(SizeHint::with_exact(0))
    }

    /// A body fed by the returned sender: it stays open until the sender
    /// is dropped.
    pub fn channel() -> (mpsc::UnboundedSender<Step>, Self) {
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
    pub fn with_end_hint(self) -> Self {
        let at = self.taken + self.script.len();
        self.with_end_hint_at(at)
    }

    /// Reports `is_end_stream() == true` once `steps` steps were taken.
    pub fn with_end_hint_at(mut self, steps: usize) -> Self {
        self.end_hint_at = Some(steps);
        self
    }

    pub fn with_size_hint(self, hint: SizeHint) -> Self {
        self.with_size_hints(vec![hint])
    }

    /// `size_hint()` is `hints[n]` after `n` steps (the last one after
    /// that); `hints` must not be empty.
    pub fn with_size_hints(mut self, hints: Vec<SizeHint>) -> Self {
        assert!(!hints.is_empty(), "at least one size hint");
        self.size_hints = hints;
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
        if step.is_some() {
            self.taken += 1;
        }
        match step {
            None => Poll::Ready(None),
            Some(Step::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Step::Trailers(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Some(Step::Error(message)) => Poll::Ready(Some(Err(BodyError(message)))),
            Some(Step::Pending) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none() && self.end_hint_at.is_some_and(|at| self.taken >= at)
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hints[self.taken.min(self.size_hints.len() - 1)]
    }
}

/// A client that answers each request with the body the request carries,
/// tagged with the id of the client (the build number) in `x-client`, and
/// with the status named by the request's `x-status` header, if any.
///
/// Every copy counts itself in the live copies of its id (see
/// [`Builds::live_copies`]), so a test can see when every copy of one
/// client is gone.
#[derive(Debug)]
pub struct TagClient {
    pub id: usize,
    copies: Copies,
}

impl TagClient {
    /// A client with this id, counted on its own.
    pub fn new(id: usize) -> Self {
        TagClient::counted(id, Copies::default())
    }

    fn counted(id: usize, copies: Copies) -> Self {
        copies.add(id);
        TagClient { id, copies }
    }
}

impl Clone for TagClient {
    fn clone(&self) -> Self {
        TagClient::counted(self.id, self.copies.clone())
    }
}

impl Drop for TagClient {
    fn drop(&mut self) {
        self.copies.remove(self.id);
    }
}

/// Live copies of [`TagClient`]s, by id. Clones share the counts.
#[derive(Debug, Clone, Default)]
struct Copies(Arc<Mutex<HashMap<usize, usize>>>);

impl Copies {
    fn counts(&self) -> MutexGuard<'_, HashMap<usize, usize>> {
        // A panic elsewhere must not turn `Drop` into a second panic.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, id: usize) {
        *self.counts().entry(id).or_default() += 1;
    }

    fn remove(&self, id: usize) {
        if let Some(count) = self.counts().get_mut(&id) {
            *count = count.saturating_sub(1);
        }
    }

    fn of(&self, id: usize) -> usize {
        self.counts().get(&id).copied().unwrap_or(0)
    }
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
pub fn served_by<B>(response: &http::Response<B>) -> usize {
    response.headers()["x-client"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("a number")
}

/// Counts builds and hands out `TagClient`s numbered from 1, and counts
/// the live copies of each. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct Builds {
    count: Arc<AtomicUsize>,
    copies: Copies,
}

impl Builds {
    pub fn factory(&self) -> impl Fn() -> TagClient + Send + Sync + 'static {
        let builds = self.clone();
        move || {
            let id = builds.count.fetch_add(1, Ordering::SeqCst) + 1;
            TagClient::counted(id, builds.copies.clone())
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// How many copies of build `id`'s client are alive.
    pub fn live_copies(&self, id: usize) -> usize {
        self.copies.of(id)
    }
}

/// Builds tower-test mock clients, one per build, and keeps the handle of
/// each build (see [`Mocks::take`]). Clones share the handles.
pub struct Mocks<Req, Resp>(Arc<Mutex<Vec<mock::Handle<Req, Resp>>>>);

impl<Req, Resp> Default for Mocks<Req, Resp> {
    fn default() -> Self {
        Mocks(Arc::default())
    }
}

impl<Req, Resp> Clone for Mocks<Req, Resp> {
    fn clone(&self) -> Self {
        Mocks(Arc::clone(&self.0))
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Mocks<Req, Resp> {
    pub fn factory(&self) -> impl Fn() -> mock::Mock<Req, Resp> + Send + Sync + 'static {
        let handles = Arc::clone(&self.0);
        move || {
            let (mock, handle) = mock::pair();
            handles.lock().expect("not poisoned").push(handle);
            mock
        }
    }

    /// Takes the handle of the `n`th build (from 1).
    pub fn take(&self, n: usize) -> mock::Handle<Req, Resp> {
        let mut handles = self.0.lock().expect("not poisoned");
        let (mock, handle) = mock::pair();
        drop(mock);
        std::mem::replace(&mut handles[n - 1], handle)
    }
}

/// Lets the driver act on what is due now and finish the builds it starts,
/// then returns 1 ms of paused time later.
///
/// A sync factory builds on tokio's blocking pool, on another thread;
/// paused time does not auto-advance while a blocking task runs, so this
/// 1 ms sleep ends only once every build started before it has finished
/// and been swapped in, at the instant it was due. A build due at the very
/// instant this returns may still be running: check nothing 1 ms before
/// something is due.
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

/// Lets `by` of paused time pass timer by timer, then settles: returns
/// `by` + 1 ms later. Unlike a jump of the clock, every build due on the
/// way finishes (and swaps) at its own instant.
pub async fn advance(by: Duration) {
    tokio::time::sleep(by).await;
    settle().await;
}

/// A request whose body is empty and says so.
pub fn request() -> http::Request<ScriptBody> {
    http::Request::new(ScriptBody::empty())
}

/// A request whose body stays open until the returned sender is dropped.
pub fn open_request() -> (mpsc::UnboundedSender<Step>, http::Request<ScriptBody>) {
    let (tx, body) = ScriptBody::channel();
    (tx, http::Request::new(body))
}

/// Reads the next frame of `body`, which must be data.
pub async fn next_data<B>(body: &mut B) -> Bytes
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    body.frame()
        .await
        .expect("a frame")
        .expect("not an error")
        .into_data()
        .expect("data")
}
