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
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Failed(BoxError),
    Panicked(String),
    TimedOut(Duration),
}

impl RotateError {
    pub(crate) fn failed(error: BoxError) -> Self {
        RotateError {
            kind: Kind::Failed(error),
        }
    }

    pub(crate) fn panicked(payload: &(dyn Any + Send)) -> Self {
        let message = if let Some(s) = payload.downcast_ref::<&'static str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a non-string panic payload".to_owned()
        };
        RotateError {
            kind: Kind::Panicked(message),
        }
    }

    pub(crate) fn timed_out(after: Duration) -> Self {
        RotateError {
            kind: Kind::TimedOut(after),
        }
    }

    /// The factory returned this error.
    pub fn is_failed(&self) -> bool {
        matches!(self.kind, Kind::Failed(_))
    }

    /// The factory panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self.kind, Kind::Panicked(_))
    }

    /// The async factory did not finish within `build_timeout`.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::TimedOut(_))
    }

    /// The factory's own error, if it returned one.
    pub fn into_factory_error(self) -> Option<BoxError> {
        match self.kind {
            Kind::Failed(error) => Some(error),
            _ => None,
        }
    }
}

impl fmt::Display for RotateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Failed(_) => f.write_str("building a new client generation failed"),
            Kind::Panicked(message) => {
                write!(f, "the client factory panicked: {message}")
            }
            Kind::TimedOut(after) => {
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
            Kind::Failed(error) => Some(error.as_ref()),
            _ => None,
        }
    }
}
