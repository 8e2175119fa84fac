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
        RotateError {
            kind: Kind::Panicked(panic_message(payload)),
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

/// Why a probe saw nothing; traced, never returned to anybody.
#[derive(Debug)]
pub(crate) enum ProbeError {
    Failed(BoxError),
    Panicked(String),
    TimedOut(Duration),
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Failed(error) => write!(f, "the probe returned an error: {error}"),
            ProbeError::Panicked(message) => write!(f, "the probe panicked: {message}"),
            ProbeError::TimedOut(after) => write!(f, "the probe timed out after {after:?}"),
        }
    }
}
