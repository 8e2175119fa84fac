//! The error of a failed build, and the boxed error factories' errors
//! become.

use std::any::Any;
use std::error::Error;
use std::fmt;
use std::time::Duration;

/// A boxed error: what an async or fallible factory's error is turned into,
/// and what [`RotateError::into_factory_error`] gives back.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why building a new generation failed.
///
/// Returned by [`RotatingClient::rotate`](crate::RotatingClient::rotate).
/// Failed background builds are not returned to anybody: they are counted
/// in [`Stats::failed_builds`](crate::Stats::failed_builds), emitted with
/// the `tracing` feature, and retried with backoff. In every case the
/// current generation keeps serving.
#[derive(Debug)]
pub struct RotateError {
    kind: Failure,
}

/// How user code run off the request path (a build, a probe) can fail.
#[derive(Debug)]
pub(crate) enum Failure {
    /// It returned this error.
    Failed(BoxError),
    /// It panicked, with this message.
    Panicked(String),
    /// It did not finish within this time.
    TimedOut(Duration),
}

impl Failure {
    pub(crate) fn panicked(payload: &(dyn Any + Send)) -> Self {
        Failure::Panicked(panic_message(payload))
    }
}

impl From<Failure> for RotateError {
    fn from(kind: Failure) -> Self {
        RotateError { kind }
    }
}

impl RotateError {
    pub(crate) fn failed(error: BoxError) -> Self {
        Failure::Failed(error).into()
    }

    pub(crate) fn panicked(payload: &(dyn Any + Send)) -> Self {
        Failure::panicked(payload).into()
    }

    /// The factory returned this error.
    pub fn is_failed(&self) -> bool {
        matches!(self.kind, Failure::Failed(_))
    }

    /// The factory panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self.kind, Failure::Panicked(_))
    }

    /// The async factory did not finish within `build_timeout`.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Failure::TimedOut(_))
    }

    /// The factory's own error, if it returned one.
    pub fn into_factory_error(self) -> Option<BoxError> {
        match self.kind {
            Failure::Failed(error) => Some(error),
            _ => None,
        }
    }
}

/// The message of a caught panic, if it has one.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_owned()
    }
}

impl fmt::Display for RotateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Failure::Failed(_) => f.write_str("building a new client generation failed"),
            Failure::Panicked(message) => {
                write!(f, "the client factory panicked: {message}")
            }
            Failure::TimedOut(after) => {
                write!(
                    f,
                    "building a new client generation timed out after {after:?}"
                )
            }
        }
    }
}

impl Error for RotateError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            Failure::Failed(error) => Some(error.as_ref()),
            _ => None,
        }
    }
}

/// Why a probe saw nothing; traced, never returned to anybody.
#[derive(Debug)]
pub(crate) struct ProbeError(pub(crate) Failure);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Failure::Failed(error) => write!(f, "the probe returned an error: {error}"),
            Failure::Panicked(message) => write!(f, "the probe panicked: {message}"),
            Failure::TimedOut(after) => write!(f, "the probe timed out after {after:?}"),
        }
    }
}
