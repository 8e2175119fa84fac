//! Rotation triggers besides the TTL and `rotate()`: a request cap per
//! generation and rotation on repeated failures, plus the opt-in response
//! extension that names the generation that served a response.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

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

/// Added to each response's extensions when
/// [`generation_extension`](crate::RotatingClientLayer::generation_extension)
/// is on: the id of the generation whose client served it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(pub u64);

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

/// Why a generation was swapped out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    Ttl,
    Rotate,
    MaxRequests,
    Failures,
}

impl Reason {
    #[cfg(feature = "tracing")]
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Ttl => "ttl",
            Reason::Rotate => "rotate",
            Reason::MaxRequests => "max_requests",
            Reason::Failures => "failures",
        }
    }
}
