//! [`RotatingClient`]: the service that routes each request to the current
//! generation and leases that generation to the response.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tower_service::Service;

use crate::driver::{self, Factory};
use crate::error::RotateError;
use crate::future::ResponseFuture;
use crate::generation::{self, Core, Generation, Generations, Lease, Triggers};
use crate::layer::{Config, RetireHook};
use crate::response::ClientResponse;
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
    S: Clone + Send + 'static,
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
    /// Only ever reached through `get_mut` (no locking): the mutex is what
    /// makes the handle `Sync` for a client that is only `Send`.
    client: Mutex<S>,
    /// Lets the next `poll_ready` pin this generation without reading the
    /// slot, while it is current. A `Weak` does not keep the client alive.
    weak: crate::sync::Weak<Generation<S>>,
}

impl<S: 'static> Cached<S> {
    #[inline]
    fn client(&mut self) -> &mut S {
        // Never locked, so never poisoned; a poisoned one is still whole.
        self.client
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> RotatingClient<S>
where
    S: Clone + Send + 'static,
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

impl<S, Req> Service<Req> for RotatingClient<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: ClientResponse,
    S::Error: 'static,
{
    type Response = <S::Response as ClientResponse>::Leased;
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
                    client: Mutex::new(client),
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
        ResponseFuture::new(cached.client().call(req), Lease::new(generation), observe)
    }
}

impl<S> RotatingClient<S>
where
    S: Send + 'static,
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
        match cached.client().poll_ready(cx) {
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

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::time::Instant;
    use tower::ServiceExt;
    use tower_layer::Layer;
    use tower_service::Service;
    use tower_test::mock;

    use super::RotatingClient;
    use crate::testing::{
        advance, served_by, settle, Builds, Retired, ScriptBody, Step, TagClient,
    };
    use crate::{ResponseBody, ResponseFuture, RotateError, RotatingClientLayer, Stats};

    const TTL: Duration = Duration::from_secs(60);

    fn request() -> http::Request<ScriptBody> {
        http::Request::new(ScriptBody::empty())
    }

    fn open_request() -> (
        tokio::sync::mpsc::UnboundedSender<Step>,
        http::Request<ScriptBody>,
    ) {
        let (tx, body) = ScriptBody::channel();
        (tx, http::Request::new(body))
    }

    /// One request through this very handle (not a clone): `ready` then
    /// `call`, as a long-lived worker does.
    async fn call_on(
        handle: &mut RotatingClient<TagClient>,
    ) -> http::Response<ResponseBody<ScriptBody>> {
        let ready = handle.ready().await.expect("infallible");
        ready.call(request()).await.expect("infallible")
    }

    /// Starts a response whose body stays open until the sender is dropped.
    async fn open_stream(
        client: &RotatingClient<TagClient>,
    ) -> (
        tokio::sync::mpsc::UnboundedSender<Step>,
        ResponseBody<ScriptBody>,
    ) {
        let (tx, req) = open_request();
        let response = client.clone().oneshot(req).await.expect("infallible");
        (tx, response.into_body())
    }

    fn tagged(ttl: Duration, builds: &Builds, retired: &Retired) -> RotatingClient<TagClient> {
        RotatingClientLayer::new(ttl)
            .jitter(0.0)
            .on_retire(retired.hook())
            .layer(builds.factory())
    }

    fn live(stats: &Stats) -> Vec<u64> {
        stats
            .generations
            .iter()
            .map(|generation| generation.id)
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_exactly_at_the_ttl_without_jitter() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        assert_eq!(
            builds.count(),
            1,
            "the first generation is built in layer()"
        );
        settle().await;

        advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(client.stats().current_generation, 1, "not yet due");
        assert_eq!(builds.count(), 1);

        advance(Duration::from_millis(1)).await;
        let stats = client.stats();
        assert_eq!(stats.current_generation, 2, "due at exactly the TTL");
        assert_eq!(stats.rotations, 1);
        assert_eq!(stats.current_age, Duration::ZERO);
        assert_eq!(
            retired.ids(),
            vec![1],
            "the idle old generation retires at once"
        );

        advance(TTL).await;
        assert_eq!(client.stats().current_generation, 3);
        let response = client.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(
            served_by(&response),
            3,
            "requests go to the current generation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_shortens_lifetimes_within_bounds_and_varies() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(Duration::from_secs(100))
            .jitter(0.5)
            .layer(builds.factory());
        settle().await;
        let start = Instant::now();
        let mut births = vec![start];
        let mut seen = 1;
        while births.len() < 30 {
            advance(Duration::from_millis(250)).await;
            let stats = client.stats();
            assert!(
                stats.current_generation <= seen + 1,
                "at most one rotation per step"
            );
            if stats.current_generation > seen {
                seen = stats.current_generation;
                births.push(Instant::now() - stats.current_age);
            }
            assert!(
                Instant::now() - start < Duration::from_secs(3100),
                "bounded"
            );
        }
        let lifetimes: Vec<Duration> = births.windows(2).map(|w| w[1] - w[0]).collect();
        for lifetime in &lifetimes {
            assert!(
                (Duration::from_secs(50)..=Duration::from_secs(100)).contains(lifetime),
                "lifetime {lifetime:?} outside ttl * [0.5, 1.0]"
            );
        }
        let shortest = lifetimes.iter().min().expect("some");
        let longest = lifetimes.iter().max().expect("some");
        assert!(
            *longest - *shortest > Duration::from_secs(10),
            "jitter varies: {lifetimes:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn default_jitter_is_within_ten_percent() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(Duration::from_secs(100)).layer(builds.factory());
        settle().await;
        advance(Duration::from_secs(90) - Duration::from_millis(1)).await;
        assert_eq!(
            client.stats().current_generation,
            1,
            "never before 90% of the TTL"
        );
        advance(Duration::from_secs(10)).await;
        assert_eq!(client.stats().current_generation, 2, "never after the TTL");
    }

    #[tokio::test(start_paused = true)]
    async fn duration_max_never_rotates_on_time() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(Duration::MAX).layer(builds.factory());
        settle().await;
        for _ in 0..3 {
            advance(Duration::from_secs(400 * 24 * 60 * 60)).await;
        }
        assert_eq!(client.stats().current_generation, 1);
        assert_eq!(builds.count(), 1);
        assert_eq!(
            client.rotate().await.expect("builds"),
            2,
            "rotate() still works"
        );
        advance(Duration::from_secs(400 * 24 * 60 * 60)).await;
        assert_eq!(client.stats().current_generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_generation_lives_through_every_stage_of_a_response() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let mut handle = client.clone();

        // Ready: the reservation alone keeps generation 1.
        handle.ready().await.expect("infallible");
        assert_eq!(client.stats().in_flight, 1, "reserved");
        assert_eq!(client.rotate().await.expect("builds"), 2);
        assert_eq!(
            live(&client.stats()),
            vec![1, 2],
            "reserved generation drains"
        );
        assert!(retired.ids().is_empty());

        // Called: the future holds it.
        let (tx, req) = open_request();
        let future = handle.call(req);
        assert!(retired.ids().is_empty(), "the response future holds it");

        // Response: the body holds it.
        let response = future.await.expect("infallible");
        assert_eq!(served_by(&response), 1, "call used the reserved generation");
        let mut body = response.into_body();
        assert!(retired.ids().is_empty(), "the body holds it");

        // Half-read.
        tx.send(Step::Data("half")).expect("body alive");
        body.frame().await.expect("frame").expect("data");
        assert!(retired.ids().is_empty(), "half-read body holds it");
        assert_eq!(client.stats().generations[0].in_flight, 1);

        // End of stream: released before the body is dropped.
        drop(tx);
        assert!(body.frame().await.is_none());
        assert_eq!(retired.ids(), vec![1], "released at end of stream");
        assert!(!body.holds_generation());
        assert_eq!(live(&client.stats()), vec![2]);
        drop(body);
        assert_eq!(retired.ids(), vec![1], "retired exactly once");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_a_body_mid_stream_releases_its_generation() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let (tx, mut body) = open_stream(&client).await;
        tx.send(Step::Data("x")).expect("alive");
        body.frame().await.expect("frame").expect("data");
        advance(TTL).await;
        assert_eq!(client.stats().current_generation, 2);
        assert!(
            retired.ids().is_empty(),
            "an open stream keeps generation 1"
        );
        drop(body);
        assert_eq!(retired.ids(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_error_passes_through_and_releases() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let (tx, mut body) = open_stream(&client).await;
        client.rotate().await.expect("builds");
        tx.send(Step::Error("connection reset")).expect("alive");
        let error = body.frame().await.expect("frame").expect_err("inner error");
        assert_eq!(error.0, "connection reset", "the inner error, unchanged");
        assert_eq!(retired.ids(), vec![1], "released on error");
    }

    /// A client service whose generations are tower-test mocks, one handle
    /// per build.
    type MockClient = mock::Mock<http::Request<&'static str>, http::Response<ScriptBody>>;
    type MockHandle = mock::Handle<http::Request<&'static str>, http::Response<ScriptBody>>;

    fn mocked(
        layer: RotatingClientLayer,
    ) -> (
        RotatingClient<MockClient>,
        Arc<Mutex<Vec<MockHandle>>>,
        Retired,
    ) {
        let handles: Arc<Mutex<Vec<MockHandle>>> = Arc::default();
        let retired = Retired::default();
        let log = Arc::clone(&retired.0);
        let client = layer
            .on_retire(
                move |_client: MockClient, generation: crate::RetiredGeneration| {
                    let id = usize::try_from(generation.id).expect("small");
                    log.lock().expect("not poisoned").push((id, generation));
                },
            )
            .layer({
                let handles = Arc::clone(&handles);
                move || {
                    let (mock, handle) = mock::pair();
                    handles.lock().expect("not poisoned").push(handle);
                    mock
                }
            });
        (client, handles, retired)
    }

    fn take_handle(handles: &Mutex<Vec<MockHandle>>, generation: usize) -> MockHandle {
        let mut handles = handles.lock().expect("not poisoned");
        let (mock, handle) = mock::pair();
        drop(mock);
        std::mem::replace(&mut handles[generation - 1], handle)
    }

    /// Expects the next request on `handle` to carry `body`, and answers it.
    async fn respond(handle: &mut MockHandle, body: &str) {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(
            *request.body(),
            body,
            "the request reached the expected generation"
        );
        send.send_response(http::Response::new(ScriptBody::empty()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pending_response_future_holds_its_generation_until_dropped() {
        let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
        let mut svc = client.clone();
        svc.ready().await.expect("ready");
        let future = svc.call(http::Request::new("hello"));
        let mut first = take_handle(&handles, 1);
        let (_request, _send) = first
            .next_request()
            .await
            .expect("request reached generation 1");
        client.rotate().await.expect("builds");
        assert!(
            retired.ids().is_empty(),
            "the pending future holds generation 1"
        );
        assert_eq!(client.stats().in_flight, 1);
        drop(future);
        assert_eq!(
            retired.ids(),
            vec![1],
            "released when the future is dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_inner_call_error_passes_through_and_releases() {
        let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
        let mut svc = client.clone();
        svc.ready().await.expect("ready");
        let future = svc.call(http::Request::new("hello"));
        let mut first = take_handle(&handles, 1);
        let (_request, send) = first.next_request().await.expect("request");
        client.rotate().await.expect("builds");
        send.send_error(std::io::Error::other("upstream said no"));
        let error = future.await.expect_err("the inner error");
        assert_eq!(error.to_string(), "upstream said no", "unchanged");
        assert_eq!(retired.ids(), vec![1]);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_ready_pins_the_generation_that_call_uses_across_a_swap() {
        let (client, handles, _retired) = mocked(RotatingClientLayer::new(TTL));
        let mut first = take_handle(&handles, 1);
        let mut svc = client.clone();
        svc.ready().await.expect("ready on generation 1");
        client.rotate().await.expect("builds");
        advance(TTL / 2).await;
        let future = svc.call(http::Request::new("pinned"));
        respond(&mut first, "pinned").await;
        future.await.expect("response");

        // The next poll_ready moves the same handle to generation 2.
        let mut second = take_handle(&handles, 2);
        svc.ready().await.expect("ready on generation 2");
        let future = svc.call(http::Request::new("moved"));
        respond(&mut second, "moved").await;
        future.await.expect("response");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handle_pending_in_poll_ready_reserves_nothing() {
        let (client, handles, retired) = mocked(RotatingClientLayer::new(TTL));
        let mut first = take_handle(&handles, 1);
        first.allow(0);
        let mut svc = tokio_test::task::spawn(client.clone());
        tokio_test::assert_pending!(svc.enter(|cx, mut svc| svc.as_mut().poll_ready(cx)));
        assert_eq!(client.stats().in_flight, 0, "pending reserves nothing");
        client.rotate().await.expect("builds");
        assert_eq!(retired.ids(), vec![1], "a pending handle does not pin");
        tokio_test::assert_ready_ok!(svc.enter(|cx, mut svc| svc.as_mut().poll_ready(cx)));
        let future = svc.call(http::Request::new("after"));
        let mut second = take_handle(&handles, 2);
        respond(&mut second, "after").await;
        future.await.expect("response");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_stored_handles_pin_nothing() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let state = tagged(TTL, &builds, &retired); // like axum State: stored, cloned
        let stored_clone = state.clone();
        let mut worker = state.clone();
        // A finished request leaves a stale clone in `worker`.
        let response = call_on(&mut worker).await;
        assert_eq!(served_by(&response), 1);
        drop(response);
        assert_eq!(state.stats().in_flight, 0);

        advance(TTL).await;
        assert_eq!(
            retired.ids(),
            vec![1],
            "neither the idle worker nor stored clones pin"
        );
        let response = call_on(&mut worker).await;
        assert_eq!(served_by(&response), 2, "the idle worker moved on");
        drop(stored_clone);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clone_starts_with_nothing_reserved() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let mut ready = client.clone();
        ready.ready().await.expect("ready");
        let copy = ready.clone();
        assert_eq!(client.stats().in_flight, 1, "only the original reserved");
        drop(ready);
        assert_eq!(
            client.stats().in_flight,
            0,
            "dropping a ready handle releases it"
        );
        let mut copy = copy;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| copy.call(request())));
        assert!(result.is_err(), "the clone has no reservation to call on");
    }

    #[tokio::test]
    #[should_panic(expected = "called before poll_ready")]
    async fn call_without_poll_ready_panics() {
        let client = RotatingClientLayer::new(TTL).layer(Builds::default().factory());
        drop(client.clone().call(request()));
    }

    #[tokio::test(start_paused = true)]
    async fn rotate_makes_the_next_call_use_the_new_generation() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let mut handle = client.clone();
        let before = call_on(&mut handle).await;
        assert_eq!(served_by(&before), 1);
        advance(TTL / 2).await;
        assert_eq!(client.rotate().await.expect("builds"), 2);
        let after = call_on(&mut handle).await;
        assert_eq!(
            served_by(&after),
            2,
            "a call started after rotate() uses the new client"
        );
        assert_eq!(client.stats().current_age, Duration::ZERO);
        // The new generation gets a full TTL from the rotation.
        advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(client.stats().current_generation, 2);
        advance(Duration::from_millis(1)).await;
        assert_eq!(client.stats().current_generation, 3);
        assert_eq!(retired.ids(), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_generation_retires_exactly_once_including_at_shutdown() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = tagged(TTL, &builds, &retired);
        let (tx, body) = open_stream(&client).await;
        for _ in 0..3 {
            advance(TTL).await;
        }
        assert_eq!(client.stats().current_generation, 4);
        assert_eq!(retired.ids(), vec![2, 3], "1 is still streaming");
        drop(client);
        assert_eq!(
            retired.ids(),
            vec![2, 3, 4],
            "the last generation retires with the last handle"
        );
        drop(tx);
        drop(body);
        assert_eq!(retired.ids(), vec![2, 3, 4, 1]);
        let infos = retired.all();
        assert!(infos
            .iter()
            .all(|(id, info)| *id as u64 == info.id && !info.forced));
        assert_eq!(infos[3].1.requests, 1);

        // The background task stopped with the last handle: no more builds.
        let built = builds.count();
        advance(TTL * 10).await;
        assert_eq!(
            builds.count(),
            built,
            "nothing runs after the last handle is gone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_async_factory_keeps_serving_and_recovers() {
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let factory = {
            let attempts = Arc::clone(&attempts);
            move || {
                let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                async move {
                    if (2..=4).contains(&attempt) {
                        Err(std::io::Error::other("dns is down"))
                    } else {
                        Ok(TagClient { id: attempt })
                    }
                }
            }
        };
        let client = RotatingClientLayer::new(Duration::from_secs(10))
            .jitter(0.0)
            .build_backoff(Duration::from_secs(1), Duration::from_secs(4))
            .layer_async(factory)
            .await
            .expect("the first build succeeds");
        let mut served = Vec::new();
        for _ in 0..200 {
            advance(Duration::from_millis(100)).await;
            let response = client
                .clone()
                .oneshot(request())
                .await
                .expect("never fails");
            served.push(served_by(&response));
            if served_by(&response) == 5 {
                break;
            }
        }
        assert_eq!(
            served.last(),
            Some(&5),
            "rotation resumed after three failures"
        );
        assert!(
            served.iter().all(|id| *id == 1 || *id == 5),
            "served by 1 until 5: {served:?}"
        );
        let stats = client.stats();
        assert_eq!(stats.failed_builds, 3);
        assert_eq!(
            stats.current_generation, 2,
            "failed builds make no generation"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_factory_never_reaches_a_request_and_rotation_resumes() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(Duration::from_secs(10))
            .jitter(0.0)
            .build_backoff(Duration::from_secs(1), Duration::from_secs(1))
            .layer({
                let make = builds.factory();
                move || {
                    let client = make();
                    if client.id == 2 || client.id == 3 {
                        panic!("factory bug in build {}", client.id);
                    }
                    client
                }
            });
        let error: RotateError = client.rotate().await.expect_err("build 2 panics");
        assert!(error.is_panic(), "{error}");
        assert!(
            error.to_string().contains("factory bug in build 2"),
            "{error}"
        );
        for _ in 0..100 {
            advance(Duration::from_millis(500)).await;
            let response = client
                .clone()
                .oneshot(request())
                .await
                .expect("never fails");
            if served_by(&response) == 4 {
                break;
            }
            assert_eq!(served_by(&response), 1);
        }
        let stats = client.stats();
        assert_eq!(stats.failed_builds, 2);
        assert_eq!(stats.current_generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn max_live_generations_postpones_rotation_until_one_retires() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = RotatingClientLayer::new(TTL)
            .jitter(0.0)
            .max_live_generations(2)
            .on_retire(retired.hook())
            .layer(builds.factory());
        let (tx1, body1) = open_stream(&client).await;
        advance(TTL).await;
        let (tx2, body2) = open_stream(&client).await;
        assert_eq!(live(&client.stats()), vec![1, 2]);

        advance(TTL * 3).await;
        let stats = client.stats();
        assert_eq!(stats.current_generation, 2, "postponed at the cap");
        assert_eq!(stats.live_generations, 2);
        assert_eq!(builds.count(), 2, "nothing is built while there is no room");

        drop((tx1, body1));
        settle().await;
        let stats = client.stats();
        assert_eq!(retired.ids(), vec![1]);
        assert_eq!(
            stats.current_generation, 3,
            "rotates as soon as there is room"
        );
        assert_eq!(live(&stats), vec![2, 3]);
        drop((tx2, body2));
    }

    #[tokio::test(start_paused = true)]
    async fn max_live_one_waits_for_the_current_generation_to_go_idle() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(TTL)
            .jitter(0.0)
            .max_live_generations(1)
            .layer(builds.factory());
        let (tx, body) = open_stream(&client).await;
        advance(TTL * 2).await;
        assert_eq!(client.stats().current_generation, 1, "busy: postponed");
        drop((tx, body));
        advance(Duration::from_millis(100)).await;
        let stats = client.stats();
        assert_eq!(stats.current_generation, 2);
        assert_eq!(stats.live_generations, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_timeout_lets_go_without_cutting_or_calling_the_hook() {
        let (builds, retired) = (Builds::default(), Retired::default());
        let client = RotatingClientLayer::new(TTL)
            .jitter(0.0)
            .drain_timeout(Duration::from_secs(5))
            .on_retire(retired.hook())
            .layer(builds.factory());
        let (tx, mut body) = open_stream(&client).await;
        client.rotate().await.expect("builds");
        advance(Duration::from_millis(4999)).await;
        assert_eq!(live(&client.stats()), vec![1, 2], "still draining");
        advance(Duration::from_millis(1)).await;
        let stats = client.stats();
        assert_eq!(live(&stats), vec![2], "let go after the drain timeout");
        assert_eq!(stats.forced_retirements, 1);
        assert!(
            retired.ids().is_empty(),
            "the hook never sees a client with responses in flight"
        );

        // The layer does not cut the response: it runs on what it holds.
        tx.send(Step::Data("still here")).expect("alive");
        let frame = body.frame().await.expect("frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "still here");
        drop((tx, body));
        assert!(
            retired.ids().is_empty(),
            "a forced generation is not retired twice"
        );
        drop(client);
        assert_eq!(retired.ids(), vec![2]);
    }

    #[test]
    fn constructing_needs_no_runtime() {
        let builds = Builds::default();
        let client = RotatingClientLayer::new(TTL).layer(builds.factory());
        assert_eq!(client.stats().current_generation, 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let response = client.clone().oneshot(request()).await.expect("ok");
            assert_eq!(served_by(&response), 1);
        });
    }

    #[tokio::test]
    async fn works_in_a_service_builder_and_boxes() {
        let builds = Builds::default();
        let client = tower::ServiceBuilder::new()
            .layer(RotatingClientLayer::new(TTL))
            .service(builds.factory());
        let boxed = tower::util::BoxCloneSyncService::new(client);
        let response = boxed.oneshot(request()).await.expect("ok");
        assert_eq!(served_by(&response), 1);
    }

    #[test]
    fn public_types_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<RotatingClientLayer>();
        send_sync::<RotatingClient<TagClient>>();
        send_sync::<ResponseFuture<std::future::Ready<Result<http::Response<ScriptBody>, ()>>>>();
        send_sync::<ResponseBody<ScriptBody>>();
        send_sync::<Stats>();
        send_sync::<RotateError>();
        let client = RotatingClientLayer::new(TTL).layer(Builds::default().factory());
        send(&client.rotate());
    }

    #[test]
    #[should_panic(expected = "`ttl` must be greater than zero")]
    fn zero_ttl_panics() {
        let _ = RotatingClientLayer::new(Duration::ZERO);
    }

    #[test]
    #[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
    fn negative_jitter_panics() {
        let _ = RotatingClientLayer::new(TTL).jitter(-0.1);
    }

    #[test]
    #[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
    fn jitter_above_one_panics() {
        let _ = RotatingClientLayer::new(TTL).jitter(1.5);
    }

    #[test]
    #[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
    fn nan_jitter_panics() {
        let _ = RotatingClientLayer::new(TTL).jitter(f64::NAN);
    }

    #[test]
    #[should_panic(expected = "`max_live_generations` must be at least 1")]
    fn zero_max_live_generations_panics() {
        let _ = RotatingClientLayer::new(TTL).max_live_generations(0);
    }
}
