//! How new clients are made: sync, fallible sync and async factories
//! behind one type, with panics and (for async builds) timeouts turned
//! into a [`RotateError`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::error::{BoxError, RotateError};

/// Builds are off the request path, so boxing here costs nothing that
/// matters.
type BuildFuture<S> = Pin<Box<dyn Future<Output = Result<S, BoxError>> + Send>>;

/// How new clients are made.
pub(crate) enum Factory<S> {
    /// Called at expiry; an infallible factory always returns `Ok`.
    Sync(Arc<dyn Fn() -> Result<S, BoxError> + Send + Sync>),
    /// Started `build_ahead` of expiry, bounded by `build_timeout`.
    Async(Arc<dyn Fn() -> BuildFuture<S> + Send + Sync>),
}

impl<S> Clone for Factory<S> {
    fn clone(&self) -> Self {
        match self {
            Factory::Sync(f) => Factory::Sync(Arc::clone(f)),
            Factory::Async(f) => Factory::Async(Arc::clone(f)),
        }
    }
}

impl<S: 'static> Factory<S> {
    pub(crate) fn from_sync<F, E>(make: F) -> Self
    where
        F: Fn() -> Result<S, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Factory::Sync(Arc::new(move || make().map_err(Into::into)))
    }

    pub(crate) fn from_async<M, Fut, E>(make: M) -> Self
    where
        M: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Factory::Async(Arc::new(move || {
            let fut = make();
            Box::pin(async move { fut.await.map_err(Into::into) }) as BuildFuture<S>
        }))
    }

    pub(crate) fn is_async(&self) -> bool {
        matches!(self, Factory::Async(_))
    }

    /// Builds one client. Never panics: a panicking factory is an error.
    pub(crate) async fn build(&self, timeout: Duration) -> Result<S, RotateError> {
        match self {
            Factory::Sync(make) => catch_unwind(AssertUnwindSafe(|| make()))
                .map_err(|panic| RotateError::panicked(panic.as_ref()))?
                .map_err(RotateError::failed),
            Factory::Async(make) => {
                let fut = catch_unwind(AssertUnwindSafe(|| make()))
                    .map_err(|panic| RotateError::panicked(panic.as_ref()))?;
                match tokio::time::timeout(timeout, CatchUnwind(fut)).await {
                    Err(_elapsed) => Err(RotateError::timed_out(timeout)),
                    Ok(Err(panic)) => Err(RotateError::panicked(panic.as_ref())),
                    Ok(Ok(Err(error))) => Err(RotateError::failed(error)),
                    Ok(Ok(Ok(client))) => Ok(client),
                }
            }
        }
    }
}

impl<S> fmt::Debug for Factory<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Factory::Sync(_) => "Factory::Sync",
            Factory::Async(_) => "Factory::Async",
        })
    }
}

/// Catches a panic while polling a build (or probe) future: its payload
/// is the error.
pub(crate) struct CatchUnwind<F: ?Sized>(pub(crate) Pin<Box<F>>);

impl<T, F> Future for CatchUnwind<F>
where
    F: Future<Output = T> + ?Sized,
{
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use super::Factory;

    #[tokio::test(start_paused = true)]
    async fn failures_panics_and_timeouts_become_rotate_errors() {
        let failing = Factory::<u8>::from_sync(|| Err::<u8, _>("no certificate"));
        let error = failing
            .build(Duration::from_secs(1))
            .await
            .expect_err("fails");
        assert!(error.is_failed(), "{error}");
        assert_eq!(
            error.into_factory_error().map(|e| e.to_string()).as_deref(),
            Some("no certificate"),
            "the factory's own error, unchanged"
        );

        let panicking =
            Factory::<u8>::from_sync(|| -> Result<u8, std::io::Error> { panic!("boom") });
        let error = panicking
            .build(Duration::from_secs(1))
            .await
            .expect_err("panics");
        assert!(
            error.is_panic() && error.to_string().contains("boom"),
            "{error}"
        );

        let slow = Factory::<u8>::from_async(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::io::Error>(1)
        });
        let error = slow
            .build(Duration::from_secs(1))
            .await
            .expect_err("times out");
        assert!(error.is_timeout(), "{error}");

        let fine = Factory::<u8>::from_async(|| async { Ok::<_, std::io::Error>(7) });
        assert_eq!(fine.build(Duration::from_secs(1)).await.ok(), Some(7));
    }
}
