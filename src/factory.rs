//! How new clients are made: sync, fallible sync and async factories
//! behind one type, with panics and (for async builds) timeouts turned
//! into a [`RotateError`].
//!
//! Where a build runs: a sync factory's builds (after the first, which
//! `layer`/`try_layer` make on the caller's thread) run on tokio's
//! blocking pool, so a factory that reads files or sets up TLS stalls no
//! runtime worker. An async factory's future runs on the task that awaits
//! it (the driver, or the caller of `rotate()`), like any other future.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;

use crate::error::{BoxError, Failure, RotateError};

/// Builds (and probes) are off the request path, so boxing here costs
/// nothing that matters.
pub(crate) type BuildFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// A sync build, started on the blocking pool.
type BlockingBuild<S> = Pin<Box<dyn Future<Output = Result<S, RotateError>> + Send>>;

/// How new clients are made.
pub(crate) enum Factory<S> {
    /// Called at expiry, on the blocking pool; an infallible factory always
    /// returns `Ok`.
    Sync(Arc<dyn Fn() -> BlockingBuild<S> + Send + Sync>),
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
        S: Send,
    {
        let make = Arc::new(make);
        Factory::Sync(Arc::new(move || {
            let make = Arc::clone(&make);
            Box::pin(on_blocking_pool(move || call_sync(&*make)))
        }))
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
    /// A sync build has no timeout: it cannot be interrupted.
    pub(crate) async fn build(&self, timeout: Duration) -> Result<S, RotateError> {
        match self {
            Factory::Sync(start) => start().await,
            Factory::Async(make) => guarded(&**make, timeout).await.map_err(Into::into),
        }
    }
}

/// Starts `start`'s future and waits for it at most `timeout`; a panic in
/// either becomes a [`Failure`], as does the timeout. For async builds and
/// probes.
pub(crate) async fn guarded<T>(
    start: &(dyn Fn() -> BuildFuture<T> + Send + Sync),
    timeout: Duration,
) -> Result<T, Failure> {
    let fut =
        catch_unwind(AssertUnwindSafe(start)).map_err(|panic| Failure::panicked(panic.as_ref()))?;
    match tokio::time::timeout(timeout, CatchUnwind(fut)).await {
        Err(_elapsed) => Err(Failure::TimedOut(timeout)),
        Ok(Err(panic)) => Err(Failure::panicked(panic.as_ref())),
        Ok(Ok(Err(error))) => Err(Failure::Failed(error)),
        Ok(Ok(Ok(value))) => Ok(value),
    }
}

/// Calls a sync factory once; a panic becomes an error.
fn call_sync<S, E: Into<BoxError>>(make: &dyn Fn() -> Result<S, E>) -> Result<S, RotateError> {
    catch_unwind(AssertUnwindSafe(make))
        .map_err(|panic| RotateError::panicked(panic.as_ref()))?
        .map_err(|error| RotateError::failed(error.into()))
}

/// Runs `build` on the blocking pool of the current runtime and waits for
/// it without holding a worker. Outside a runtime (a `rotate()` future
/// polled by another executor) there is no worker to stall, and it runs
/// in place.
///
/// If the awaiting future is dropped, the build still finishes on the pool
/// and its client is dropped there.
async fn on_blocking_pool<S, F>(build: F) -> Result<S, RotateError>
where
    S: Send + 'static,
    F: FnOnce() -> Result<S, RotateError> + Send + 'static,
{
    let Ok(runtime) = Handle::try_current() else {
        return build();
    };
    match runtime.spawn_blocking(build).await {
        Ok(built) => built,
        // `build` catches its own panics; this is a shutting-down runtime
        // that dropped the build before it ran.
        Err(error) => Err(match error.try_into_panic() {
            Ok(panic) => RotateError::panicked(panic.as_ref()),
            Err(cancelled) => RotateError::failed(Box::new(cancelled)),
        }),
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
struct CatchUnwind<F: ?Sized>(Pin<Box<F>>);

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
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
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

    /// A `rotate()` future polled by another executor, after the driver
    /// started on a runtime: no blocking pool to hand the build to.
    #[test]
    fn a_sync_build_outside_a_runtime_runs_in_place() {
        let factory = Factory::from_sync(|| Ok::<_, std::io::Error>(std::thread::current().id()));
        let mut build = pin!(factory.build(Duration::from_secs(1)));
        match build.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(built_on)) => assert_eq!(built_on, std::thread::current().id()),
            other => panic!("expected a build in place, at once: {other:?}"),
        }
    }
}
