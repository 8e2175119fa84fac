//! [`RotatingClientLayer`]: the builder and the `Layer` impl.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::config::{CallOutcome, Config, FailurePolicy, OnRetire};
use crate::error::BoxError;
use crate::factory::Factory;
use crate::probe::{Probe, ProbeRunner};
use crate::rotator::Rotator;
use crate::service::RotatingClient;

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
pub struct RotatingClientLayer<H = ()> {
    config: Config,
    hook: Arc<H>,
}

impl<H> Clone for RotatingClientLayer<H> {
    /// A layer with the same options; its services share the same hook.
    fn clone(&self) -> Self {
        RotatingClientLayer {
            config: self.config.clone(),
            hook: Arc::clone(&self.hook),
        }
    }
}

impl RotatingClientLayer {
    /// A layer whose generations live at most `ttl`, with every other
    /// option at its default.
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
            config: Config::new(ttl),
            hook: Arc::new(()),
        }
    }
}

impl<H> RotatingClientLayer<H> {
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
    /// [`Stats::generations`](crate::Stats::generations) (making
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

    /// Rotates when `probe` sees that something the client depends on
    /// changed: the addresses a name resolves to ([`Probe::dns`]), a
    /// certificate or key file's digest, a secret's version. Look often,
    /// renew only on a change: a scale-up is followed within a probe
    /// period or two, and a stable world costs no rotation at all, so the
    /// TTL can be hours.
    ///
    /// The probe runs in a background task of the rotating client, every
    /// period (jittered), from its first use inside a runtime. When it
    /// sees a value that differs from the current generation's on
    /// [`confirmations`](Probe::confirmations) probes in a row, it asks
    /// for a rotation, which goes like any other: the successor is built
    /// in the background (an async factory's connects before it serves),
    /// `max_live_generations` is respected, responses in flight are
    /// untouched, and the swap is traced with reason `changed`. The value
    /// that asked becomes the new generation's. After a rotation for
    /// another reason (TTL, `rotate()`, failures, the request cap) the new
    /// generation takes the latest value probed before it. A client whose
    /// build started before a change was seen (built ahead of its TTL, or
    /// by a `rotate()` still building) may predate it: it is not used, or,
    /// if it became current meanwhile, rotated away in turn. That costs at
    /// most one extra rotation, and never misses a change.
    ///
    /// A failed, panicking or timed-out probe rotates nothing, touches no
    /// request, and is counted in
    /// [`Stats::failed_probes`](crate::Stats::failed_probes). The probe
    /// and whatever it captures are dropped with the rotating client's
    /// shared state: once the last handle, the last response and the
    /// layer are gone. It holds no client.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_rotating_client::{Probe, RotatingClientLayer};
    ///
    /// # #[cfg(feature = "dns")]
    /// let layer = RotatingClientLayer::new(Duration::from_secs(6 * 3600))
    ///     .rotate_on_change(Probe::dns("backend.internal:8080", Duration::from_secs(5)));
    /// # #[cfg(feature = "dns")]
    /// # let _ = layer;
    /// ```
    ///
    /// Default is no probe. A second call replaces the first probe.
    pub fn rotate_on_change<V>(mut self, probe: Probe<V>) -> Self
    where
        V: PartialEq + Send + Sync + 'static,
    {
        self.config.probe = Some(ProbeRunner::new(probe));
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
    /// The hook is called at most once per generation, never while a
    /// response from it is in flight, and for every generation that drains
    /// normally, including the last one when every handle and response is
    /// gone. It is skipped for a generation let go by
    /// [`drain_timeout`](RotatingClientLayer::drain_timeout) (its client
    /// is just dropped, counted in `Stats::forced_retirements`), and when
    /// the last reference goes while the thread is unwinding from a panic
    /// (a second panic would abort). See [`OnRetire`] for where it runs.
    /// Closure parameters need their types written out:
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::service_fn;
    /// use tower_layer::Layer;
    /// use tower_rotating_client::{GenerationStats, RotatingClientLayer};
    ///
    /// # type Client = tower::util::BoxCloneSyncService<http::Request<()>, http::Response<String>, std::io::Error>;
    /// # fn make_client() -> Client {
    /// #     Client::new(service_fn(|_req| async { Ok(http::Response::new(String::new())) }))
    /// # }
    /// let client = RotatingClientLayer::new(Duration::from_secs(600))
    ///     .on_retire(|client: Client, generation: GenerationStats| {
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
    /// The factory's future runs on the runtime like any task: move
    /// blocking work in it (reading files, building a TLS config) into
    /// `tokio::task::spawn_blocking`. Call this on the layer, outside any
    /// `ServiceBuilder` chain.
    ///
    /// [`build_ahead`]: RotatingClientLayer::build_ahead
    /// [`build_backoff`]: RotatingClientLayer::build_backoff
    pub async fn layer_async<M, Fut, S, E>(&self, make: M) -> Result<RotatingClient<S>, E>
    where
        M: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, E>> + Send + 'static,
        E: Into<BoxError>,
        S: Clone + Send + 'static,
        H: OnRetire<S>,
    {
        let first = make().await?;
        Ok(self.service(Factory::from_async(make), first))
    }

    /// Builds a [`RotatingClient`] from a sync factory that can fail, such
    /// as `reqwest::ClientBuilder::build` or a client that reads TLS
    /// material from disk.
    ///
    /// The first generation is built before this returns, on the caller's
    /// thread, so its error reaches the caller unchanged. Later generations
    /// are built in the background at expiry (and by
    /// [`rotate`](RotatingClient::rotate)), on Tokio's blocking pool, so
    /// the factory may block; a failed or panicking build leaves the
    /// current generation serving, is counted in
    /// [`Stats::failed_builds`](crate::Stats::failed_builds), and is retried
    /// with backoff ([`build_backoff`](RotatingClientLayer::build_backoff)).
    ///
    /// Call it on the layer, not inside a `ServiceBuilder` chain, and put
    /// the client into one with `.service(client)`. Given to
    /// `ServiceBuilder::service`, a factory that returns a `Result` fails
    /// to compile with "the trait bound `E: Clone` is not satisfied ...
    /// required for `Result<S, E>` to implement `Clone`": the builder takes
    /// the `Result` itself for the client.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::service_fn;
    /// use tower_rotating_client::RotatingClientLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), std::io::Error> {
    /// let client = RotatingClientLayer::new(Duration::from_secs(600)).try_layer(|| {
    ///     let certificate = std::fs::read("/dev/null")?; // what a real factory loads
    ///     Ok::<_, std::io::Error>(service_fn(move |_req: http::Request<String>| {
    ///         let length = certificate.len();
    ///         async move { Ok::<_, std::io::Error>(http::Response::new(length.to_string())) }
    ///     }))
    /// })?;
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    pub fn try_layer<F, S, E>(&self, make: F) -> Result<RotatingClient<S>, E>
    where
        F: Fn() -> Result<S, E> + Send + Sync + 'static,
        E: Into<BoxError>,
        S: Clone + Send + 'static,
        H: OnRetire<S>,
    {
        let first = make()?;
        Ok(self.service(Factory::from_sync(make), first))
    }

    fn service<S>(&self, factory: Factory<S>, first: S) -> RotatingClient<S>
    where
        S: Send + 'static,
        H: OnRetire<S>,
    {
        let hook = Arc::clone(&self.hook) as Arc<dyn OnRetire<S>>;
        RotatingClient::new(Rotator::new(self.config.clone(), hook, factory, first))
    }
}

impl<F, S, H> Layer<F> for RotatingClientLayer<H>
where
    F: Fn() -> S + Send + Sync + 'static,
    S: Clone + Send + 'static,
    H: OnRetire<S>,
{
    type Service = RotatingClient<S>;

    /// Builds the first generation by calling `factory` on this thread (a
    /// panic in it reaches the caller) and returns the service. Later
    /// generations are built on Tokio's blocking pool. No runtime is needed
    /// here: the rotation timer starts now if a Tokio runtime is present,
    /// otherwise on first use inside one. For a factory that returns a
    /// `Result`, use [`try_layer`](RotatingClientLayer::try_layer).
    ///
    /// This is the [`Layer`] trait's method: call it with `use tower::Layer;`
    /// (or `use tower_layer::Layer;`) in scope.
    fn layer(&self, factory: F) -> RotatingClient<S> {
        let first = factory();
        self.service(
            Factory::from_sync(move || Ok::<_, std::convert::Infallible>(factory())),
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
            .field("rotate_on_change", &self.config.probe)
            .field("generation_extension", &self.config.generation_extension)
            .field("stagger_first_rotation", &self.config.stagger_first)
            .field("on_retire", &std::any::type_name::<H>())
            .finish()
    }
}
