//! The background side: building clients and deciding when to swap.
//!
//! One task per rotating client (the *driver*) sleeps until the current
//! generation is due, builds its successor (ahead of time for async
//! factories), waits for room under `max_live_generations`, and swaps.
//! It holds only a `Weak` reference to the service state, so it never keeps
//! the service alive, and the state aborts it when the last handle drops.

use std::fmt;
use std::future::{poll_fn, Future};
use std::hash::{BuildHasher, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::futures::Notified;
use tokio::time::Instant;

use crate::error::RotateError;
use crate::generation::Core;
use crate::layer::{Config, DEFAULT_BUILD_AHEAD_MAX};
use crate::service::Shared;
use crate::trigger::Reason;
use crate::BoxError;

type BuildFuture<S> = Pin<Box<dyn Future<Output = Result<S, BoxError>> + Send>>;

/// How new clients are made.
pub(crate) enum Factory<S> {
    Sync(Arc<dyn Fn() -> S + Send + Sync>),
    TrySync(Arc<dyn Fn() -> Result<S, BoxError> + Send + Sync>),
    Async(Arc<dyn Fn() -> BuildFuture<S> + Send + Sync>),
}

impl<S> Clone for Factory<S> {
    fn clone(&self) -> Self {
        match self {
            Factory::Sync(f) => Factory::Sync(Arc::clone(f)),
            Factory::TrySync(f) => Factory::TrySync(Arc::clone(f)),
            Factory::Async(f) => Factory::Async(Arc::clone(f)),
        }
    }
}

impl<S: 'static> Factory<S> {
    pub(crate) fn from_sync<F>(f: F) -> Self
    where
        F: Fn() -> S + Send + Sync + 'static,
    {
        Factory::Sync(Arc::new(f))
    }

    pub(crate) fn from_try_sync<F, E>(f: F) -> Self
    where
        F: Fn() -> Result<S, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        Factory::TrySync(Arc::new(move || f().map_err(Into::into)))
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

    fn is_async(&self) -> bool {
        matches!(self, Factory::Async(_))
    }

    /// Builds one client. Never panics: a panicking factory is an error.
    pub(crate) async fn build(&self, timeout: Duration) -> Result<S, RotateError> {
        match self {
            Factory::Sync(make) => catch_unwind(AssertUnwindSafe(|| make()))
                .map_err(|panic| RotateError::panicked(panic.as_ref())),
            Factory::TrySync(make) => catch_unwind(AssertUnwindSafe(|| make()))
                .map_err(|panic| RotateError::panicked(panic.as_ref()))?
                .map_err(RotateError::failed),
            Factory::Async(make) => {
                let fut = catch_unwind(AssertUnwindSafe(|| make()))
                    .map_err(|panic| RotateError::panicked(panic.as_ref()))?;
                match tokio::time::timeout(timeout, CatchUnwind(fut)).await {
                    Err(_elapsed) => Err(RotateError::timed_out(timeout)),
                    Ok(Err(panic)) => Err(panic),
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
            Factory::TrySync(_) => "Factory::TrySync",
            Factory::Async(_) => "Factory::Async",
        })
    }
}

/// Turns a panic while polling the build future into an error.
struct CatchUnwind<F>(Pin<Box<F>>)
where
    F: ?Sized;

impl<T, F> Future for CatchUnwind<F>
where
    F: Future<Output = T> + ?Sized,
{
    type Output = Result<T, RotateError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(RotateError::panicked(panic.as_ref()))),
        }
    }
}

/// A small lock-free random source: splitmix64 over an atomic counter,
/// seeded per rotating client from the standard library's random keys, so
/// that two clients created at the same moment draw different jitter.
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Rng(AtomicU64::new(seed))
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&self) -> f64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits, the precision of an f64 mantissa.
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rng")
    }
}

/// `ttl * (1 - jitter * u)`: jitter only shortens a lifetime.
pub(crate) fn lifetime(ttl: Duration, jitter: f64, u: f64) -> Duration {
    let cut = ttl.as_secs_f64() * jitter * u;
    // `cut <= ttl`, so this never underflows; `try_from` guards NaN/inf.
    ttl.saturating_sub(Duration::try_from_secs_f64(cut).unwrap_or(Duration::ZERO))
}

/// Delay before retry number `failures` (1-based): doubling from `min`,
/// capped at `max`, with up to half taken off at random.
pub(crate) fn backoff(config: &Config, failures: u32, u: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let base = config
        .backoff_min
        .checked_mul(1u32 << exp.min(31))
        .unwrap_or(config.backoff_max)
        .min(config.backoff_max);
    // Clamped so that `now + delay` never overflows, whatever `max` is.
    base.saturating_sub(base.mul_f64(0.5 * u)).min(MAX_SLEEP)
}

/// How long before expiry an async build starts.
fn build_ahead(config: &Config, lifetime: Duration) -> Duration {
    match config.build_ahead {
        Some(ahead) => ahead.min(lifetime),
        None => (lifetime / 10).min(DEFAULT_BUILD_AHEAD_MAX),
    }
}

/// Sleeps are cut into pieces of at most this, so that far deadlines (a
/// TTL of years, or `Duration::MAX`) never overflow the timer.
const MAX_SLEEP: Duration = Duration::from_secs(24 * 60 * 60);

/// Waits until `deadline` (`None`: forever) or until `notified` fires.
/// Returns `true` if the deadline was reached.
async fn sleep_until_or(deadline: Option<Instant>, mut notified: Pin<&mut Notified<'_>>) -> bool {
    loop {
        let now = Instant::now();
        let step = match deadline {
            Some(deadline) if deadline <= now => return true,
            Some(deadline) => deadline.min(now + MAX_SLEEP),
            None => now + MAX_SLEEP,
        };
        let mut sleep = pin!(tokio::time::sleep_until(step));
        let woke = poll_fn(|cx| {
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            sleep.as_mut().poll(cx).map(|()| false)
        })
        .await;
        if woke {
            return false;
        }
    }
}

/// Waits until a swap would keep the live generations within the cap.
pub(crate) async fn wait_for_room<S: Clone + Send + 'static>(
    core: &Core<S>,
    shared: &Weak<Shared<S>>,
    max_live: Option<usize>,
) {
    let Some(max) = max_live else { return };
    loop {
        let mut retired = pin!(core.retired.notified());
        retired.as_mut().enable();
        let live = core.live_count();
        if max >= 2 && live < max {
            return;
        }
        if max == 1 {
            // Room only once the current generation itself is idle.
            let idle = shared
                .upgrade()
                .is_none_or(|shared| shared.current_is_idle());
            if live <= 1 && idle {
                return;
            }
            let recheck = Instant::now() + Duration::from_millis(100);
            let mut tick = pin!(tokio::time::sleep_until(recheck));
            poll_fn(|cx| {
                if retired.as_mut().poll(cx).is_ready() || tick.as_mut().poll(cx).is_ready() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
            continue;
        }
        retired.await;
    }
}

/// One background build. On failure, returns the backoff delay.
async fn build<S: 'static>(
    factory: &Factory<S>,
    config: &Config,
    core: &Core<S>,
    current_id: u64,
    failures: &mut u32,
) -> Result<S, Duration> {
    let started = Instant::now();
    crate::trace::build_started(current_id);
    match factory.build(config.build_timeout).await {
        Ok(client) => {
            crate::trace::build_succeeded(current_id, started.elapsed());
            *failures = 0;
            Ok(client)
        }
        Err(error) => {
            core.failed_builds.fetch_add(1, Ordering::Relaxed);
            *failures = failures.saturating_add(1);
            let delay = backoff(config, *failures, core.rng.next_f64());
            crate::trace::build_failed(current_id, &error, *failures, delay);
            Err(delay)
        }
    }
}

/// The background task. Returns when the service state is gone.
pub(crate) async fn drive<S>(shared: Weak<Shared<S>>, core: crate::sync::Arc<Core<S>>)
where
    S: Clone + Send + 'static,
{
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    // When the last rotation on failures happened, for its minimum interval.
    let mut last_failure_rotation: Option<Instant> = None;
    // A client built for the successor of generation `.0`.
    let mut prebuilt: Option<(u64, S)> = None;
    loop {
        let mut changed = pin!(core.changed.notified());
        changed.as_mut().enable();

        let Some(state) = shared.upgrade() else {
            return;
        };
        let (current_id, born, expires_at) = state.current_deadline();
        let factory = state.factory.clone();
        let config = Arc::clone(&state.config);
        drop(state);

        if prebuilt.as_ref().is_some_and(|(id, _)| *id != current_id) {
            // Somebody rotated while we were building: the prebuilt client
            // may carry what that rotation meant to replace.
            prebuilt = None;
        }

        // When the current generation is due, and why: its TTL, or a
        // trigger (request cap, failures) if that comes first.
        let (due, reason) = match core.requested(current_id) {
            Some(Reason::Failures) => {
                let min_interval = config
                    .failures
                    .as_ref()
                    .map_or(Duration::ZERO, |p| p.min_interval);
                let allowed = last_failure_rotation
                    .and_then(|last| last.checked_add(min_interval))
                    .map_or_else(Instant::now, |at| at.max(Instant::now()));
                earliest(expires_at, allowed, Reason::Failures)
            }
            Some(reason) => earliest(expires_at, Instant::now(), reason),
            None => (expires_at, Reason::Ttl),
        };

        let build_at = match (due, &prebuilt) {
            (None, _) => None,
            (Some(due), Some(_)) => Some(due),
            (Some(due), None) if factory.is_async() => {
                let lifetime = due.saturating_duration_since(born);
                Some(due - build_ahead(&config, lifetime))
            }
            (Some(due), None) => Some(due),
        };
        let wake = match (build_at, retry_at) {
            (Some(at), Some(retry)) => Some(at.max(retry)),
            (at, _) => at,
        };
        if !sleep_until_or(wake, changed.as_mut()).await {
            // The current generation changed (a `rotate()`), or a trigger
            // fired: start over.
            continue;
        }

        if factory.is_async() && prebuilt.is_none() && due.is_some_and(|due| Instant::now() < due) {
            // Build ahead of expiry, so the swap never waits for a connect.
            match build(&factory, &config, &core, current_id, &mut failures).await {
                Ok(client) => {
                    retry_at = None;
                    prebuilt = Some((current_id, client));
                }
                Err(delay) => retry_at = Some(Instant::now() + delay),
            }
            continue;
        }

        // The current generation is due: swap, one rotation at a time.
        let Some(state) = shared.upgrade() else {
            return;
        };
        let lock = Arc::clone(&state.rotation_lock);
        drop(state);
        let _rotation = lock.lock().await;
        wait_for_room(&core, &shared, config.max_live).await;
        let Some(state) = shared.upgrade() else {
            return;
        };
        if state.current_deadline().0 != current_id {
            // `rotate()` swapped while we waited: start over.
            continue;
        }
        drop(state);
        let client = match prebuilt.take() {
            Some((_, client)) => client,
            None => match build(&factory, &config, &core, current_id, &mut failures).await {
                Ok(client) => client,
                Err(delay) => {
                    retry_at = Some(Instant::now() + delay);
                    continue;
                }
            },
        };
        retry_at = None;
        let Some(state) = shared.upgrade() else {
            return;
        };
        state.install(client, reason);
        if reason == Reason::Failures {
            last_failure_rotation = Some(Instant::now());
        }
    }
}

/// The earlier of the TTL expiry and a trigger's moment, with its reason.
fn earliest(
    expires_at: Option<Instant>,
    triggered: Instant,
    reason: Reason,
) -> (Option<Instant>, Reason) {
    match expires_at {
        Some(expires) if expires < triggered => (Some(expires), Reason::Ttl),
        _ => (Some(triggered), reason),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use super::{backoff, build_ahead, lifetime, MAX_SLEEP};
    use crate::RotatingClientLayer;

    #[test]
    fn lifetime_only_shortens_and_spans_the_jitter() {
        let ttl = Duration::from_secs(100);
        assert_eq!(lifetime(ttl, 0.0, 0.99), ttl, "no jitter: exactly the TTL");
        assert_eq!(lifetime(ttl, 0.1, 0.0), ttl, "u = 0: the full TTL");
        let shortest = lifetime(ttl, 0.1, 1.0 - f64::EPSILON);
        assert!(
            shortest >= Duration::from_secs(90) && shortest < ttl,
            "{shortest:?}"
        );
        assert_eq!(lifetime(ttl, 0.5, 0.5), Duration::from_secs(75));
        assert!(
            lifetime(Duration::MAX, 0.1, 0.9) < Duration::MAX,
            "no overflow at MAX"
        );
        assert!(!lifetime(Duration::from_nanos(1), 1.0, 0.0).is_zero());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_at_most_half_off() {
        let layer = RotatingClientLayer::new(Duration::from_secs(60))
            .build_backoff(Duration::from_secs(1), Duration::from_secs(8));
        let config = layer.config();
        let full: Vec<_> = (1..=6).map(|n| backoff(config, n, 0.0)).collect();
        assert_eq!(full, [1, 2, 4, 8, 8, 8].map(Duration::from_secs));
        assert_eq!(
            backoff(config, 3, 1.0),
            Duration::from_secs(2),
            "half off at most"
        );
        assert_eq!(
            backoff(config, u32::MAX, 0.0),
            Duration::from_secs(8),
            "no overflow"
        );

        let unbounded = RotatingClientLayer::new(Duration::from_secs(60))
            .build_backoff(Duration::from_secs(1), Duration::MAX);
        assert_eq!(
            backoff(unbounded.config(), 64, 0.0),
            MAX_SLEEP,
            "clamped to a day"
        );
    }

    #[test]
    fn async_builds_start_a_tenth_ahead_at_most_ten_seconds() {
        let layer = RotatingClientLayer::new(Duration::from_secs(60));
        let config = layer.config();
        assert_eq!(
            build_ahead(config, Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        assert_eq!(
            build_ahead(config, Duration::from_secs(3600)),
            Duration::from_secs(10)
        );
        let custom =
            RotatingClientLayer::new(Duration::from_secs(60)).build_ahead(Duration::from_secs(120));
        assert_eq!(
            build_ahead(custom.config(), Duration::from_secs(60)),
            Duration::from_secs(60),
            "capped at the lifetime"
        );
    }
}
