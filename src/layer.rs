//! [`RotatingClientLayer`]: the builder and the `Layer` impl.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::driver::Factory;
use crate::service::RotatingClient;
use crate::stats::RetiredGeneration;
use crate::trigger::{CallOutcome, FailurePolicy};
use crate::BoxError;

/// Receives each retired client once it has drained.
///
/// Implemented for `()`, which just drops the client (the default), and for
/// every `Fn(S, RetiredGeneration) + Send + Sync + 'static`. Implement it
/// on a type of your own when the layer needs a nameable type.
///
/// The hook runs synchronously, on the thread that released the
/// generation's last reference: often inside the poll of the last response
/// body, or inside the drop of the last handle. Keep it short; to do async
/// work (a graceful close), spawn a task. A panic in the hook is caught and
/// ignored.
pub trait RetireHook<S>: Send + Sync + 'static {
    /// Called once per generation, with its client, after its last
    /// in-flight response has finished.
    fn on_retire(&self, client: S, generation: RetiredGeneration);
}

impl<S> RetireHook<S> for () {
    fn on_retire(&self, client: S, _generation: RetiredGeneration) {
        drop(client);
    }
}

impl<S, H> RetireHook<S> for H
where
    H: Fn(S, RetiredGeneration) + Send + Sync + 'static,
{
    fn on_retire(&self, client: S, generation: RetiredGeneration) {
        self(client, generation)
    }
}

/// The options of a [`RotatingClientLayer`]. Defaults are stated on the
/// builder methods.
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
    pub(crate) generation_extension: bool,
    pub(crate) stagger_first: bool,
}

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

/// A [`Layer`] that turns a client factory into a [`RotatingClient`].
///
/// See the [crate docs](crate) for the lifecycle of a generation.
///
/// ```
/// use std::time::Duration;
/// use tower_rotating_client::RotatingClientLayer;
///
/// let layer = RotatingClientLayer::new(Duration::from_secs(3600))
///     .jitter(0.05)
///     .max_live_generations(4)
///     .drain_timeout(Duration::from_secs(600));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RotatingClientLayer<H = ()> {
    config: Config,
    hook: Arc<H>,
}

impl RotatingClientLayer {
    /// A layer whose generations live at most `ttl`.
    ///
    /// `Duration::MAX` means never rotate on time: generations are then
    /// replaced only by [`RotatingClient::rotate`].
    ///
    /// # Panics
    ///
    /// Panics if `ttl` is zero.
    pub fn new(ttl: Duration) -> Self {
        assert!(
            !ttl.is_zero(),
            "RotatingClientLayer::new: `ttl` must be greater than zero"
        );
        RotatingClientLayer {
            config: Config {
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
                generation_extension: false,
                stagger_first: false,
            },
            hook: Arc::new(()),
        }
    }
}

impl<H> RotatingClientLayer<H> {
    #[cfg(test)]
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Spreads generation lifetimes so that replicas deployed together do
    /// not rotate in lockstep.
    ///
    /// Each generation lives `ttl * (1 - fraction * u)`, with `u` drawn
    /// uniformly from `[0, 1)` per generation: jitter only ever shortens a
    /// lifetime, so the TTL stays an upper bound. `0.0` turns jitter off.
    ///
    /// Default is `0.1`: lifetimes uniform between 90% and 100% of the TTL.
    /// (For scale, gRPC's max connection age jitters by ±10%, HikariCP by
    /// 2.5%.)
    ///
    /// # Panics
    ///
    /// Panics if `fraction` is NaN or outside `0.0..=1.0`.
    pub fn jitter(mut self, fraction: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&fraction),
            "RotatingClientLayer::jitter: `jitter` must be within 0.0..=1.0, got {fraction}"
        );
        self.config.jitter = fraction;
        self
    }

    /// Caps the live generations, the current one plus those draining.
    ///
    /// At the cap, a rotation (timed or from `rotate()`) is postponed until
    /// a draining generation retires; in-flight responses are never cut to
    /// make room. While postponed, the current generation keeps serving
    /// past its TTL. With `n = 1`, a rotation waits until the current
    /// generation has nothing in flight (checked every 100 ms).
    ///
    /// Default is no cap: the TTL is honoured however many generations are
    /// still draining. Combine a cap with [`drain_timeout`] to bound both.
    ///
    /// [`drain_timeout`]: RotatingClientLayer::drain_timeout
    ///
    /// # Panics
    ///
    /// Panics if `n` is zero.
    pub fn max_live_generations(mut self, n: usize) -> Self {
        assert!(
            n > 0,
            "RotatingClientLayer::max_live_generations: `max_live_generations` must be at least 1"
        );
        self.config.max_live = Some(n);
        self
    }

    /// Lets go of a draining generation `timeout` after it stopped being
    /// current, even if responses from it are still open.
    ///
    /// When it fires, the generation counts as retired: it leaves
    /// [`Stats::live_generations`](crate::Stats::live_generations) (making
    /// room under the cap) and the layer drops its copy of the client
    /// without calling the retire hook, which never sees a client with
    /// responses in flight. The open responses are not touched by the
    /// layer: they keep whatever the inner client's own futures and bodies
    /// hold. With hyper-util's `Client` they run to completion on their
    /// connection; with a client that closes its connections when its last
    /// clone is dropped, they fail with the inner client's error, passed
    /// through unchanged. Handles may still hold a stale clone of the
    /// client until they are next polled.
    ///
    /// The timeout is enforced by tasks of the layer, which stop when the
    /// last handle is dropped; after that, draining generations retire
    /// when their last response ends.
    ///
    /// Default is no timeout: a generation drains for as long as its
    /// responses run.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = Some(timeout);
        self
    }

    /// Gives up on an async build after `timeout`; the build counts as
    /// failed and is retried with backoff while the current generation
    /// keeps serving.
    ///
    /// Applies to background builds and to
    /// [`rotate`](RotatingClient::rotate), not to the first build of
    /// [`layer_async`](RotatingClientLayer::layer_async). A sync factory
    /// cannot be interrupted and has no timeout.
    ///
    /// Default is 30 seconds.
    ///
    /// # Panics
    ///
    /// Panics if `timeout` is zero.
    pub fn build_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "RotatingClientLayer::build_timeout: `build_timeout` must be greater than zero"
        );
        self.config.build_timeout = timeout;
        self
    }

    /// How long before a generation expires an async factory starts
    /// building its successor, so that the swap itself never waits for a
    /// connection. It is capped at the generation's lifetime. A sync
    /// factory is called at expiry.
    ///
    /// If a build takes longer than this, the current generation serves
    /// until the build is done, past its TTL.
    ///
    /// Default is a tenth of the generation's lifetime, at most 10 seconds.
    pub fn build_ahead(mut self, ahead: Duration) -> Self {
        self.config.build_ahead = Some(ahead);
        self
    }

    /// Backoff between retries of a failed background build: `min` after
    /// the first failure, doubling on each consecutive failure up to
    /// `max`, with up to half of each delay taken off at random.
    ///
    /// Default is 250 ms up to 30 seconds. Delays are capped at one day
    /// whatever `max` is.
    ///
    /// # Panics
    ///
    /// Panics if `min` is zero or greater than `max`.
    pub fn build_backoff(mut self, min: Duration, max: Duration) -> Self {
        assert!(
            !min.is_zero() && min <= max,
            "RotatingClientLayer::build_backoff: `min` must be greater than zero and at most `max`"
        );
        self.config.backoff_min = min;
        self.config.backoff_max = max;
        self
    }

    /// Rotates after a generation has served `n` requests: Envoy's
    /// per-connection request cap, applied to a whole client. The
    /// rotation is requested by the `n`th call and carried out by the
    /// background task, like a timed one; calls made meanwhile still go to
    /// the old generation, so it may serve a few more than `n`.
    ///
    /// Default is no cap.
    ///
    /// # Panics
    ///
    /// Panics if `n` is zero.
    pub fn max_requests_per_generation(mut self, n: u64) -> Self {
        assert!(
            n > 0,
            "RotatingClientLayer::max_requests_per_generation: `max_requests_per_generation` must be at least 1"
        );
        self.config.max_requests = Some(n);
        self
    }

    /// Rotates after `threshold` consecutive failures of the current
    /// generation, but at most once per `min_interval`, so that a broken
    /// upstream does not cause a rebuild storm.
    ///
    /// `is_failure` judges each call when its response head arrives (or its
    /// call fails); a call it does not call a failure resets the count. It
    /// sees the inner error through [`CallOutcome::error`] (downcast to the
    /// inner service's error type), or the response status and headers, for
    /// example a 503 from a dead pool. Responses in flight are untouched,
    /// as with every rotation. Failures of draining generations do not
    /// count.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_rotating_client::{CallOutcome, RotatingClientLayer};
    ///
    /// let layer = RotatingClientLayer::new(Duration::from_secs(3600)).rotate_on_failures(
    ///     5,
    ///     Duration::from_secs(30),
    ///     |outcome: &CallOutcome<'_>| {
    ///         outcome.error::<std::io::Error>().is_some()
    ///             || outcome.status() == Some(http::StatusCode::SERVICE_UNAVAILABLE)
    ///     },
    /// );
    /// # let _ = layer;
    /// ```
    ///
    /// Default is off.
    ///
    /// # Panics
    ///
    /// Panics if `threshold` is zero.
    pub fn rotate_on_failures<P>(
        mut self,
        threshold: u32,
        min_interval: Duration,
        is_failure: P,
    ) -> Self
    where
        P: Fn(&CallOutcome<'_>) -> bool + Send + Sync + 'static,
    {
        assert!(
            threshold > 0,
            "RotatingClientLayer::rotate_on_failures: `threshold` must be at least 1"
        );
        self.config.failures = Some(FailurePolicy {
            threshold,
            min_interval,
            is_failure: Arc::new(is_failure),
        });
        self
    }

    /// Adds a [`GenerationId`](crate::GenerationId) to the extensions of
    /// every response, so that logs can tie a response to the client that
    /// served it.
    ///
    /// Default is off: inserting an extension allocates, and the hot path
    /// otherwise allocates nothing.
    pub fn generation_extension(mut self, enabled: bool) -> Self {
        self.config.generation_extension = enabled;
        self
    }

    /// Spreads the *first* rotation of each instance over the whole TTL:
    /// the first generation lives `ttl * u`, `u` uniform in `(0, 1]`, drawn
    /// per instance. Replicas started by one deploy then rotate at
    /// unrelated moments from the start, instead of within the last
    /// `jitter` of the TTL. Later generations are jittered as usual. The
    /// TTL stays an upper bound.
    ///
    /// Default is off: the first generation is jittered like every other
    /// one (which already keeps instances apart by a random fraction of
    /// `jitter * ttl`).
    pub fn stagger_first_rotation(mut self, enabled: bool) -> Self {
        self.config.stagger_first = enabled;
        self
    }

    /// Hands each retired client to `hook` once its last in-flight response
    /// has finished, for clients that need an explicit graceful close.
    ///
    /// The hook is called exactly once per generation, including the last
    /// one when every handle and response is gone, and never for a
    /// generation with a response still in flight. See [`RetireHook`] for
    /// where it runs. Closure parameters need their types written out:
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::service_fn;
    /// use tower_layer::Layer;
    /// use tower_rotating_client::{RetiredGeneration, RotatingClientLayer};
    ///
    /// # type Client = tower::util::BoxCloneSyncService<http::Request<()>, http::Response<String>, std::io::Error>;
    /// # fn make_client() -> Client {
    /// #     Client::new(service_fn(|_req| async { Ok(http::Response::new(String::new())) }))
    /// # }
    /// let client = RotatingClientLayer::new(Duration::from_secs(600))
    ///     .on_retire(|client: Client, generation: RetiredGeneration| {
    ///         println!("generation {} served {} requests", generation.id, generation.requests);
    ///         drop(client);
    ///     })
    ///     .layer(make_client);
    /// # let _ = client;
    /// ```
    ///
    /// Default is `()`: the retired client is dropped.
    pub fn on_retire<H2>(self, hook: H2) -> RotatingClientLayer<H2> {
        RotatingClientLayer {
            config: self.config,
            hook: Arc::new(hook),
        }
    }

    /// Builds a [`RotatingClient`] from an async, fallible factory, such as
    /// tonic's `Endpoint::connect` or a client that loads TLS material.
    ///
    /// The first generation is built before this returns, so its error
    /// reaches the caller unchanged. Later generations are built in the
    /// background ahead of expiry ([`build_ahead`]); a failed, panicking or
    /// timed-out build leaves the current generation serving and is
    /// retried with backoff ([`build_backoff`]).
    ///
    /// [`build_ahead`]: RotatingClientLayer::build_ahead
    /// [`build_backoff`]: RotatingClientLayer::build_backoff
    pub async fn layer_async<M, Fut, S, E>(&self, make: M) -> Result<RotatingClient<S>, E>
    where
        M: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, E>> + Send + 'static,
        E: Into<BoxError>,
        S: Clone + Send + 'static,
        H: RetireHook<S>,
    {
        let first = make().await?;
        let factory = Factory::from_async(make);
        Ok(RotatingClient::from_parts(
            self.config.clone(),
            Arc::clone(&self.hook) as Arc<dyn RetireHook<S>>,
            factory,
            first,
        ))
    }
}

impl<H> RotatingClientLayer<H> {
    /// Builds a [`RotatingClient`] from a sync factory that can fail, such
    /// as `reqwest::Client::builder().build()`.
    ///
    /// The first generation is built before this returns, so its error
    /// reaches the caller unchanged. A later build that fails (or panics)
    /// leaves the current generation serving, is counted in
    /// [`Stats::failed_builds`](crate::Stats::failed_builds) and is retried
    /// with backoff ([`build_backoff`]), as with
    /// [`layer_async`](RotatingClientLayer::layer_async).
    ///
    /// ```
    /// # #[derive(Clone)] struct Client;
    /// # impl tower_service::Service<http::Request<()>> for Client {
    /// #     type Response = http::Response<String>;
    /// #     type Error = std::io::Error;
    /// #     type Future = std::future::Ready<Result<http::Response<String>, std::io::Error>>;
    /// #     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), std::io::Error>> { std::task::Poll::Ready(Ok(())) }
    /// #     fn call(&mut self, _: http::Request<()>) -> Self::Future { std::future::ready(Ok(http::Response::default())) }
    /// # }
    /// # fn load_client() -> Result<Client, std::io::Error> { Ok(Client) }
    /// use std::time::Duration;
    /// use tower_rotating_client::RotatingClientLayer;
    ///
    /// let client = RotatingClientLayer::new(Duration::from_secs(300)).try_layer(load_client)?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    ///
    /// [`build_backoff`]: RotatingClientLayer::build_backoff
    pub fn try_layer<F, S, E>(&self, factory: F) -> Result<RotatingClient<S>, E>
    where
        F: Fn() -> Result<S, E> + Send + Sync + 'static,
        E: Into<BoxError>,
        S: Clone + Send + 'static,
        H: RetireHook<S>,
    {
        let first = factory()?;
        Ok(RotatingClient::from_parts(
            self.config.clone(),
            Arc::clone(&self.hook) as Arc<dyn RetireHook<S>>,
            Factory::from_try_sync(factory),
            first,
        ))
    }
}

impl<F, S, H> Layer<F> for RotatingClientLayer<H>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Clone + Send + 'static,
    H: RetireHook<S>,
{
    type Service = RotatingClient<S>;

    /// Builds the first generation by calling `factory` (a panic in it
    /// reaches the caller) and returns the service. No runtime is needed
    /// here: the rotation timer starts now if a Tokio runtime is present,
    /// otherwise on first use inside one.
    fn layer(&self, factory: F) -> RotatingClient<S> {
        let first = factory();
        RotatingClient::from_parts(
            self.config.clone(),
            Arc::clone(&self.hook) as Arc<dyn RetireHook<S>>,
            Factory::from_sync(factory),
            first,
        )
    }
}

impl<H> fmt::Debug for RotatingClientLayer<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingClientLayer")
            .field("ttl", &self.config.ttl)
            .field("jitter", &self.config.jitter)
            .field("max_live_generations", &self.config.max_live)
            .field("drain_timeout", &self.config.drain_timeout)
            .field("build_timeout", &self.config.build_timeout)
            .field("build_ahead", &self.config.build_ahead)
            .field(
                "build_backoff",
                &(self.config.backoff_min..self.config.backoff_max),
            )
            .field("max_requests_per_generation", &self.config.max_requests)
            .field("rotate_on_failures", &self.config.failures)
            .field("generation_extension", &self.config.generation_extension)
            .field("stagger_first_rotation", &self.config.stagger_first)
            .field("on_retire", &std::any::type_name::<H>())
            .finish()
    }
}
