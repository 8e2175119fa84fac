//! The options of a rotating client, their defaults, and the user code it
//! calls: the retire hook and the failure predicate.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::probe::ProbeRunner;
use crate::stats::GenerationStats;

/// Default jitter: lifetimes are spread over the last 10% of the TTL.
pub(crate) const DEFAULT_JITTER: f64 = 0.1;
/// Default build timeout for async factories.
pub(crate) const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound of the default `build_ahead`.
pub(crate) const DEFAULT_BUILD_AHEAD_MAX: Duration = Duration::from_secs(10);
/// Default backoff after a failed build.
pub(crate) const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Default cap of the backoff after failed builds.
pub(crate) const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The options of a [`RotatingClientLayer`](crate::RotatingClientLayer).
/// Defaults are stated on the builder methods. One copy per rotating
/// client, shared by the handles, the background task and the
/// generations.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) ttl: Duration,
    pub(crate) jitter: f64,
    pub(crate) max_live: Option<usize>,
    pub(crate) drain_timeout: Option<Duration>,
    pub(crate) build_timeout: Duration,
    pub(crate) build_ahead: Option<Duration>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) failures: Option<FailurePolicy>,
    pub(crate) probe: Option<ProbeRunner>,
    pub(crate) generation_extension: bool,
    pub(crate) stagger_first: bool,
}

impl Config {
    pub(crate) fn new(ttl: Duration) -> Self {
        Config {
            ttl,
            jitter: DEFAULT_JITTER,
            max_live: None,
            drain_timeout: None,
            build_timeout: DEFAULT_BUILD_TIMEOUT,
            build_ahead: None,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_requests: None,
            failures: None,
            probe: None,
            generation_extension: false,
            stagger_first: false,
        }
    }

    /// Whether responses need a look when their head arrives: the failure
    /// trigger judges them, or they get a [`GenerationId`] extension.
    ///
    /// [`GenerationId`]: crate::GenerationId
    pub(crate) fn observes_responses(&self) -> bool {
        self.failures.is_some() || self.generation_extension
    }
}

/// Receives each retired client once it has drained: the hook of
/// [`on_retire`](crate::RotatingClientLayer::on_retire).
///
/// Implemented for `()`, which just drops the client (the default), and for
/// every `Fn(S, GenerationStats) + Send + Sync + 'static`. Implement it
/// on a type of your own when the layer needs a nameable type.
///
/// The hook runs synchronously, on the thread that released the
/// generation's last reference: often inside the poll of the last response
/// body, or inside the drop of the last handle. Keep it short; to do async
/// work (a graceful close), spawn a task. A panic in the hook is caught and
/// ignored.
pub trait OnRetire<S>: Send + Sync + 'static {
    /// Called at most once per generation, with its client and its final
    /// figures, and never while a response from it is in flight. See
    /// [`on_retire`](crate::RotatingClientLayer::on_retire) for when it is
    /// skipped.
    fn on_retire(&self, client: S, generation: GenerationStats);
}

impl<S> OnRetire<S> for () {
    fn on_retire(&self, client: S, _generation: GenerationStats) {
        drop(client);
    }
}

impl<S, F> OnRetire<S> for F
where
    F: Fn(S, GenerationStats) + Send + Sync + 'static,
{
    fn on_retire(&self, client: S, generation: GenerationStats) {
        self(client, generation)
    }
}

/// What a request through a [`RotatingClient`](crate::RotatingClient)
/// came to, as seen by the failure predicate of
/// [`rotate_on_failures`](crate::RotatingClientLayer::rotate_on_failures).
///
/// It is judged when the response head arrives (or the call fails), so a
/// stream that breaks later does not count.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum CallOutcome<'a> {
    /// The inner client returned a response.
    Response {
        /// Its status.
        status: StatusCode,
        /// Its headers.
        headers: &'a HeaderMap,
    },
    /// The inner client returned an error; see [`CallOutcome::error`].
    Error(&'a dyn Any),
}

impl<'a> CallOutcome<'a> {
    /// The inner client's error, if this is one of type `E` (the inner
    /// service's `Error` type).
    pub fn error<E: 'static>(&self) -> Option<&'a E> {
        match *self {
            CallOutcome::Error(error) => error.downcast_ref(),
            CallOutcome::Response { .. } => None,
        }
    }

    /// The response status, if there is a response.
    pub fn status(&self) -> Option<StatusCode> {
        match *self {
            CallOutcome::Response { status, .. } => Some(status),
            CallOutcome::Error(_) => None,
        }
    }
}

impl fmt::Debug for CallOutcome<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Response { status, .. } => {
                f.debug_tuple("Response").field(status).finish()
            }
            CallOutcome::Error(_) => f.write_str("Error"),
        }
    }
}

type Predicate = dyn Fn(&CallOutcome<'_>) -> bool + Send + Sync;

/// Rotation on consecutive failures.
#[derive(Clone)]
pub(crate) struct FailurePolicy {
    pub(crate) threshold: u32,
    pub(crate) min_interval: Duration,
    pub(crate) is_failure: Arc<Predicate>,
}

impl fmt::Debug for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailurePolicy")
            .field("threshold", &self.threshold)
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}
