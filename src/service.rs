//! [`RotatingClient`]: the service that routes each request to the current
//! generation and leases that generation to the response.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::Body;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower_service::Service;

use crate::driver::{self, Factory};
use crate::error::RotateError;
use crate::future::ResponseFuture;
use crate::generation::{self, Core, Generation, Generations, Lease, Triggers};
use crate::layer::{Config, RetireHook};
use crate::stats::Stats;
use crate::trigger::Reason;

/// State shared by all clones of one [`RotatingClient`].
pub(crate) struct Shared<S: 'static> {
    generations: Generations<S>,
    pub(crate) factory: Factory<S>,
    pub(crate) config: Arc<Config>,
    /// Serialises swaps, so that the cap check and the swap are one step.
    pub(crate) rotation_lock: Arc<tokio::sync::Mutex<()>>,
    driver_started: AtomicBool,
    /// The driver and the drain timers; aborted when the last handle goes.
    tasks: Mutex<Vec<AbortHandle>>,
}

impl<S> Shared<S>
where
    S: Clone + Send + Sync + 'static,
{
    /// Makes `client` the current generation. The old one starts draining
    /// and retires as soon as nothing holds it.
    pub(crate) fn install(&self, client: S, reason: Reason) -> u64 {
        let lifetime = driver::lifetime(
            self.config.ttl,
            self.config.jitter,
            self.core().rng.next_f64(),
        );
        let (id, old) = self.generations.install(client, lifetime);
        // The swap paid every outstanding arc-swap debt, so the count is
        // exact: our reference plus every reservation and lease.
        let in_flight = crate::sync::Arc::strong_count(&old) - 1;
        crate::trace::swapped(&old, id, in_flight, reason);
        #[cfg(not(loom))]
        if let (Some(timeout), true) = (self.config.drain_timeout, in_flight > 0) {
            if let Some(deadline) = Instant::now().checked_add(timeout) {
                let weak = Arc::downgrade(&old);
                self.spawn(async move {
                    tokio::time::sleep_until(deadline).await;
                    if let Some(generation) = weak.upgrade() {
                        Generation::force_retire(&generation);
                    }
                });
            }
        }
        drop(old);
        id
    }

    pub(crate) fn core(&self) -> &crate::sync::Arc<Core<S>> {
        self.generations.core()
    }

    /// Id, birth and expiry of the current generation.
    pub(crate) fn current_deadline(&self) -> (u64, Instant, Option<Instant>) {
        let current = self.generations.load();
        (current.id, current.born, current.expires_at)
    }

    /// Whether nothing but the slot holds the current generation.
    pub(crate) fn current_is_idle(&self) -> bool {
        self.generations.current_is_idle()
    }

    /// Starts the rotation timer unless it runs already. Cheap after the
    /// first call: one atomic load.
    #[inline]
    fn ensure_driver(self: &Arc<Self>) {
        if !self.driver_started.load(Ordering::Acquire) {
            self.start_driver();
        }
    }

    #[cold]
    fn start_driver(self: &Arc<Self>) {
        let Ok(runtime) = Handle::try_current() else {
            panic!(
                "RotatingClient must be used inside a Tokio runtime: \
                 its rotation timer runs there"
            );
        };
        let mut tasks = self.lock_tasks();
        if self.driver_started.load(Ordering::Acquire) {
            return;
        }
        let task = runtime.spawn(driver::drive(
            Arc::downgrade(self),
            crate::sync::Arc::clone(self.core()),
        ));
        tasks.push(task.abort_handle());
        self.driver_started.store(true, Ordering::Release);
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // Only ever called from inside the runtime (by the driver or by
        // `rotate()`); without one there is no timer to run anyway.
        if let Ok(runtime) = Handle::try_current() {
            let handle = runtime.spawn(task).abort_handle();
            let mut tasks = self.lock_tasks();
            tasks.retain(|task| !task.is_finished());
            tasks.push(handle);
        }
    }
}

impl<S: 'static> Shared<S> {
    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S: 'static> Drop for Shared<S> {
    fn drop(&mut self) {
        for task in self.lock_tasks().drain(..) {
            task.abort();
        }
    }
}

/// A client service that is rebuilt on a TTL without cutting in-flight
/// responses. Made by [`RotatingClientLayer`](crate::RotatingClientLayer).
///
/// Handles are cheap to clone and all clones share one set of generations.
/// A clone starts with nothing reserved and no client of its own. See the
/// [crate docs](crate) for the lifecycle.
///
/// # What a handle holds
///
/// - *Stored and cloned only* (like axum `State`): nothing but a reference
///   to the shared state. It pins no generation.
/// - *Between a Ready `poll_ready` and `call`*: a reservation of the
///   generation its client came from, which keeps that generation alive,
///   as tower's `Service` contract requires. Dropping the handle releases
///   it.
/// - *After `call`*: a clone of the client it used, reused for the next
///   request while that generation is current, and a `Weak` reference to
///   the generation. Neither pins the generation, which retires and is
///   handed to the retire hook as usual; but the clone itself, and whatever
///   it shares with the other clones (a pool, a connection task), lives
///   until the handle is next polled or dropped. A long-lived worker handle
///   can therefore keep a retired client's connections open after the
///   generation has retired; drop or re-poll it, or use a fresh clone per
///   request (as `ServiceExt::oneshot` on a clone does).
///
/// # Panics
///
/// `call` panics unless the last `poll_ready` returned Ready. `poll_ready`
/// and `rotate` panic outside a Tokio runtime if the rotation timer has not
/// started yet (it starts at construction when a runtime is present).
pub struct RotatingClient<S: 'static> {
    shared: Arc<Shared<S>>,
    cached: Option<Cached<S>>,
    reserved: Option<crate::sync::Arc<Generation<S>>>,
}

/// A handle's own clone of one generation's client.
struct Cached<S: 'static> {
    generation: u64,
    client: S,
    /// Lets the next `poll_ready` pin this generation without reading the
    /// slot, while it is current. A `Weak` does not keep the client alive.
    weak: crate::sync::Weak<Generation<S>>,
}

impl<S> RotatingClient<S>
where
    S: Clone + Send + Sync + 'static,
{
    pub(crate) fn from_parts(
        config: Config,
        hook: Arc<dyn RetireHook<S>>,
        factory: Factory<S>,
        first: S,
    ) -> Self {
        // The first lifetime is jittered like every other, or spread over
        // the whole TTL with `stagger_first_rotation`.
        let lifetime = if config.stagger_first {
            // Uniform in (0, ttl]: the phase of this instance's rotations.
            driver::lifetime(config.ttl, 1.0, driver::Rng::new().next_f64())
        } else {
            driver::lifetime(config.ttl, config.jitter, driver::Rng::new().next_f64())
        };
        let triggers = Triggers {
            max_requests: config.max_requests,
            failures: config.failures.clone(),
            generation_extension: config.generation_extension,
        };
        let shared = Arc::new(Shared {
            generations: Generations::new(hook, triggers, first, lifetime),
            factory,
            config: Arc::new(config),
            rotation_lock: Arc::new(tokio::sync::Mutex::new(())),
            driver_started: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        });
        if Handle::try_current().is_ok() {
            shared.start_driver();
        }
        RotatingClient {
            shared,
            cached: None,
            reserved: None,
        }
    }

    /// Builds a fresh generation now and makes it current.
    ///
    /// Resolves once the new generation is current: every `poll_ready`
    /// that starts after this returns uses it. A handle that was already
    /// Ready keeps the generation it reserved for its one `call`. The old
    /// generation drains and retires as usual, and the new one gets a full
    /// (jittered) TTL.
    ///
    /// Use it for credential or TLS reloads, DNS change notices and SIGHUP.
    /// It always builds, even if a timed rotation just happened, since that
    /// build may predate what you want to pick up. Concurrent calls (and
    /// the timed rotation) are serialised, and each makes its own
    /// generation.
    ///
    /// Returns the id of the new generation, or why the build failed
    /// (`build_timeout` applies to async factories). On failure the current
    /// generation keeps serving and the failure is counted in
    /// [`Stats::failed_builds`]; a failed `rotate()` is not retried.
    ///
    /// Under `max_live_generations`, this waits for room like a timed
    /// rotation does, which may take as long as the longest open response;
    /// wrap it in `tokio::time::timeout` if that matters.
    ///
    /// Dropping the future cancels the build and leaves everything as it
    /// was.
    pub async fn rotate(&self) -> Result<u64, RotateError> {
        let shared = &self.shared;
        shared.ensure_driver();
        let _rotation = shared.rotation_lock.lock().await;
        let client = match shared.factory.build(shared.config.build_timeout).await {
            Ok(client) => client,
            Err(error) => {
                shared.core().failed_builds.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        driver::wait_for_room(
            shared.core(),
            &Arc::downgrade(shared),
            shared.config.max_live,
        )
        .await;
        Ok(shared.install(client, Reason::Rotate))
    }

    /// A snapshot of the generations and counters. See [`Stats`].
    pub fn stats(&self) -> Stats {
        let current_generation = self.shared.generations.load().id;
        let core = self.shared.core();
        let generations = core.snapshot(current_generation);
        Stats {
            current_generation,
            current_age: generations
                .iter()
                .find(|generation| generation.current)
                .map(|generation| generation.age)
                .unwrap_or_default(),
            live_generations: generations.len(),
            in_flight: generations
                .iter()
                .map(|generation| generation.in_flight)
                .sum(),
            rotations: core.rotations.load(Ordering::Relaxed),
            failed_builds: core.failed_builds.load(Ordering::Relaxed),
            forced_retirements: core.forced_retirements.load(Ordering::Relaxed),
            generations,
        }
    }
}

impl<S: 'static> Clone for RotatingClient<S> {
    /// A new handle on the same generations, with nothing reserved.
    fn clone(&self) -> Self {
        RotatingClient {
            shared: Arc::clone(&self.shared),
            cached: None,
            reserved: None,
        }
    }
}

impl<S: 'static> fmt::Debug for RotatingClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingClient")
            .field("current_generation", &self.shared.generations.load().id)
            .field(
                "cached_generation",
                &self.cached.as_ref().map(|c| c.generation),
            )
            .field("reserved_generation", &self.reserved.as_ref().map(|g| g.id))
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, Req, B> Service<Req> for RotatingClient<S>
where
    S: Service<Req, Response = http::Response<B>> + Clone + Send + Sync + 'static,
    S::Error: 'static,
    B: Body,
{
    type Response = http::Response<crate::ResponseBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.reserved.is_some() {
            // Ready already: stay on the reserved generation until `call`.
            return self.poll_cached(cx, None);
        }
        self.shared.ensure_driver();
        // Fast path: our client is from the current generation, which is
        // still alive. One atomic load and one reference count.
        if let Some(cached) = &self.cached {
            if cached.generation == self.shared.generations.current_id() {
                if let Some(generation) = cached.weak.upgrade() {
                    return self.poll_cached(cx, Some(generation));
                }
            }
        }
        loop {
            let current = self.shared.generations.load();
            if self
                .cached
                .as_ref()
                .is_some_and(|c| c.generation == current.id)
            {
                return self.poll_cached(cx, Some(generation::pin(current)));
            }
            // A new generation for this handle: take a clone of its client.
            // `None` means it was force-retired between our load and now;
            // a newer generation is current, so load again.
            if let Some(client) = current.clone_client() {
                self.cached = Some(Cached {
                    generation: current.id,
                    client,
                    weak: crate::sync::downgrade(&current),
                });
                return self.poll_cached(cx, Some(generation::pin(current)));
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (Some(generation), Some(cached)) = (self.reserved.take(), self.cached.as_mut()) else {
            panic!("RotatingClient::call was called before poll_ready returned Ready; call poll_ready (or ServiceExt::ready) first");
        };
        generation.record_request();
        let observe = generation.observes_responses;
        ResponseFuture::new(cached.client.call(req), Lease::new(generation), observe)
    }
}

impl<S> RotatingClient<S>
where
    S: Send + Sync + 'static,
{
    /// Polls the cached client. On Ready, reserves `current` (or keeps the
    /// existing reservation when `current` is `None`); otherwise lets go.
    #[inline]
    fn poll_cached<Req>(
        &mut self,
        cx: &mut Context<'_>,
        current: Option<crate::sync::Arc<Generation<S>>>,
    ) -> Poll<Result<(), S::Error>>
    where
        S: Service<Req>,
    {
        let Some(cached) = self.cached.as_mut() else {
            unreachable!("a reservation always has a cached client")
        };
        match cached.client.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                if current.is_some() {
                    self.reserved = current;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                // A failed client is not reused; the next poll takes a
                // fresh clone.
                self.reserved = None;
                self.cached = None;
                Poll::Ready(Err(error))
            }
            Poll::Pending => {
                // A handle waiting for readiness reserves nothing.
                self.reserved = None;
                Poll::Pending
            }
        }
    }
}
