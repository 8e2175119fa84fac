//! The probe trigger: look often, rotate only when something changed.
//!
//! [`Probe`] is what the user hands to
//! [`rotate_on_change`](crate::RotatingClientLayer::rotate_on_change). The
//! rotation side runs it in a task of its own ([`ProbeRunner::start`]),
//! which sees the rotating client only through [`Target`]: the current
//! generation's id, a way to ask for a rotation, and a few counters. The
//! decision itself ([`Watch`]) is a pure state machine over
//! `(generation, value, now)`, tested on its own.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{BoxError, ProbeError};
use crate::factory::{guarded, BuildFuture};

/// Default number of probes in a row that must see the same new value.
pub(crate) const DEFAULT_CONFIRMATIONS: u32 = 2;
/// Default minimum time between two rotations the probe asks for.
pub(crate) const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Upper bound of the default probe timeout (which is the period).
pub(crate) const DEFAULT_TIMEOUT_MAX: Duration = Duration::from_secs(10);
/// Each wait between two probes is the period less up to this fraction,
/// drawn anew each time, so that replicas started together drift apart.
pub(crate) const PROBE_JITTER: f64 = 0.1;

type MakeProbe<V> = dyn Fn() -> BuildFuture<V> + Send + Sync;
type Changed<V> = dyn Fn(&V, &V) -> bool + Send + Sync;

/// A probe for
/// [`rotate_on_change`](crate::RotatingClientLayer::rotate_on_change): an
/// async, fallible look at something the client depends on (a DNS answer,
/// a certificate file's digest, a secret's version), run every `period`.
///
/// The rotating client remembers the value seen for its current generation
/// and rotates when the probe sees a different one, [`confirmations`] times
/// in a row, at most once per [`min_interval`]. The value that triggered a
/// rotation becomes the new generation's value. Values are compared, never
/// printed or traced.
///
/// ```
/// use std::time::Duration;
/// use tower_rotating_client::{Probe, RotatingClientLayer};
///
/// // Rotate when the API key file's contents change; look every 5 s.
/// let key_file = "/run/secrets/upstream-key";
/// let layer = RotatingClientLayer::new(Duration::from_secs(6 * 3600)).rotate_on_change(
///     Probe::new(Duration::from_secs(5), move || async move {
///         tokio::fs::read(key_file).await // compared as bytes, never logged
///     })
///     .confirmations(1),
/// );
/// # let _ = layer;
/// ```
///
/// See [`Probe::dns`] for the ready DNS probe, and the
/// [guide](crate::guide#credentials-without-a-clock) for credentials.
///
/// [`confirmations`]: Probe::confirmations
/// [`min_interval`]: Probe::min_interval
pub struct Probe<V> {
    period: Duration,
    confirmations: u32,
    min_interval: Duration,
    timeout: Option<Duration>,
    probe: Arc<MakeProbe<V>>,
    changed: Arc<Changed<V>>,
}

impl<V> Probe<V>
where
    V: PartialEq + Send + Sync + 'static,
{
    /// Runs `probe` every `period` (less up to 10% each time, at random, so
    /// that replicas do not probe in step). The first probe runs when the
    /// rotating client starts, and its value is the first generation's. A
    /// `period` too long to add to an `Instant` (`Duration::MAX`) probes
    /// once.
    ///
    /// A probe that returns an error, panics or exceeds its
    /// [`timeout`](Probe::timeout) changes nothing: it is counted in
    /// [`Stats::failed_probes`](crate::Stats::failed_probes), traced
    /// without its value, and the next probe runs as scheduled. It neither
    /// confirms nor breaks a run of [`confirmations`](Probe::confirmations).
    ///
    /// `probe` is polled on the runtime like any async code: blocking work
    /// in it belongs in `tokio::task::spawn_blocking` (tokio's own file and
    /// DNS functions do that already).
    ///
    /// # Panics
    ///
    /// Panics if `period` is zero.
    pub fn new<F, Fut, E>(period: Duration, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<V, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        assert!(
            !period.is_zero(),
            "Probe::new: `period` must be greater than zero"
        );
        Probe {
            period,
            confirmations: DEFAULT_CONFIRMATIONS,
            min_interval: DEFAULT_MIN_INTERVAL,
            timeout: None,
            probe: Arc::new(move || {
                let fut = probe();
                Box::pin(async move { fut.await.map_err(Into::into) }) as BuildFuture<V>
            }),
            changed: Arc::new(|seen: &V, now: &V| seen != now),
        }
    }
}

impl<V: Send + Sync + 'static> Probe<V> {
    /// How many probes in a row must see the same new value before the
    /// client rotates. A value that differs from the current generation's
    /// but also from the previous probe's starts a new run, so a DNS
    /// server that answers with a rotating subset of a large pool never
    /// confirms anything.
    ///
    /// Default is 2.
    ///
    /// # Panics
    ///
    /// Panics if `n` is zero.
    pub fn confirmations(mut self, n: u32) -> Self {
        assert!(
            n > 0,
            "Probe::confirmations: `confirmations` must be at least 1"
        );
        self.confirmations = n;
        self
    }

    /// The least time between two rotations asked for by this probe. A
    /// change confirmed sooner waits, and is acted on by the first probe
    /// after the interval that still sees it. Rotations by the TTL,
    /// `rotate()` and other triggers are not held back.
    ///
    /// Default is 30 seconds: at most 120 probe-driven rotations an hour,
    /// however the value flaps. `Duration::ZERO` turns the limit off;
    /// `Duration::MAX` allows one probe-driven rotation in all.
    pub fn min_interval(mut self, interval: Duration) -> Self {
        self.min_interval = interval;
        self
    }

    /// How long one probe may take before it counts as failed.
    ///
    /// Default is the period, at most 10 seconds.
    ///
    /// # Panics
    ///
    /// Panics if `timeout` is zero.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "Probe::timeout: `timeout` must be greater than zero"
        );
        self.timeout = Some(timeout);
        self
    }

    /// What counts as a change: `changed(seen, now)` is called with the
    /// value of the current generation and a newly probed one, and a run
    /// of [`confirmations`](Probe::confirmations) counts probes for which
    /// it is `true` that returned equal values.
    ///
    /// Default is `seen != now`, except for [`Probe::dns`], which counts
    /// only added addresses.
    pub fn changed_when<F>(mut self, changed: F) -> Self
    where
        F: Fn(&V, &V) -> bool + Send + Sync + 'static,
    {
        self.changed = Arc::new(changed);
        self
    }
}

#[cfg(feature = "dns")]
impl Probe<std::collections::BTreeSet<std::net::SocketAddr>> {
    /// A DNS probe: resolves `authority` (`host:port`, as given to
    /// `tokio::net::lookup_host`, which asks the system resolver on the
    /// blocking pool) every `period`, and compares the answers as sets of
    /// addresses.
    ///
    /// By default it rotates only when an answer holds an address that the
    /// current generation's answer did not: a new backend gets traffic
    /// only from a new client, while a removed one is left by the old
    /// client on its own, as its connections close and new ones are
    /// resolved afresh. A removal or an answer that lists fewer addresses
    /// (a health-checked record set flapping, a partial answer) then costs
    /// no reconnect of every pooled connection. To rotate on any change:
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tower_rotating_client::Probe;
    /// let probe = Probe::dns("backend.internal:8080", Duration::from_secs(5))
    ///     .changed_when(|seen, now| seen != now);
    /// # let _ = probe;
    /// ```
    ///
    /// An answer with no address counts as a failed probe. Answers are
    /// compared, not logged.
    ///
    /// # Panics
    ///
    /// Panics if `period` is zero.
    #[cfg_attr(docsrs, doc(cfg(feature = "dns")))]
    pub fn dns(authority: impl Into<String>, period: Duration) -> Self {
        let authority: Arc<str> = authority.into().into();
        Probe::new(period, move || {
            let authority = Arc::clone(&authority);
            async move {
                let answer: std::collections::BTreeSet<_> =
                    tokio::net::lookup_host(&*authority).await?.collect();
                if answer.is_empty() {
                    return Err(BoxError::from("the DNS answer holds no address"));
                }
                Ok(answer)
            }
        })
        .changed_when(|seen, now| !now.is_subset(seen))
    }
}

impl<V> fmt::Debug for Probe<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Probe")
            .field("period", &self.period)
            .field("confirmations", &self.confirmations)
            .field("min_interval", &self.min_interval)
            .field("timeout", &self.probe_timeout())
            .field("value", &std::any::type_name::<V>())
            .finish_non_exhaustive()
    }
}

impl<V> Probe<V> {
    fn probe_timeout(&self) -> Duration {
        self.timeout
            .unwrap_or_else(|| self.period.min(DEFAULT_TIMEOUT_MAX))
    }
}

/// What the probe task sees of the rotating client.
pub(crate) trait Target: Send + Sync + 'static {
    /// The current generation's id, or `None` once the client is gone.
    fn current(&self) -> Option<u64>;
    /// Asks for generation `id` to be rotated away: its value changed.
    fn request_rotation(&self, id: u64);
    /// Counts a probe that failed, panicked or timed out.
    fn probe_failed(&self);
    /// Uniform in `[0, 1)`, for the jitter.
    fn random(&self) -> f64;
}

type Run = dyn Fn(Box<dyn Target>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync;

/// A [`Probe`] with its value type erased, as the configuration keeps it.
#[derive(Clone)]
pub(crate) struct ProbeRunner {
    run: Arc<Run>,
    describe: Arc<dyn fmt::Debug + Send + Sync>,
}

impl ProbeRunner {
    pub(crate) fn new<V>(probe: Probe<V>) -> Self
    where
        V: PartialEq + Send + Sync + 'static,
    {
        let probe = Arc::new(probe);
        let describe = Arc::clone(&probe) as Arc<dyn fmt::Debug + Send + Sync>;
        ProbeRunner {
            run: Arc::new(move |target| Box::pin(run(Arc::clone(&probe), target))),
            describe,
        }
    }

    /// The probe loop, to be spawned. It returns once `target` is gone.
    pub(crate) fn start(&self, target: Box<dyn Target>) -> impl Future<Output = ()> + Send {
        (self.run)(target)
    }
}

impl fmt::Debug for ProbeRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe.fmt(f)
    }
}

/// The probe loop: probe, decide, sleep; until the client is gone.
async fn run<V>(probe: Arc<Probe<V>>, target: Box<dyn Target>)
where
    V: PartialEq + Send + Sync + 'static,
{
    let mut watch = Watch::new(probe.confirmations, probe.min_interval);
    let timeout = probe.probe_timeout();
    loop {
        let Some(current) = target.current() else {
            return;
        };
        let started = Instant::now();
        match guarded(&*probe.probe, timeout).await.map_err(ProbeError) {
            Ok(value) => {
                // The client may have rotated while the probe ran; the
                // value is judged against the generation current now.
                let Some(current) = target.current() else {
                    return;
                };
                if watch.observe(current, value, &*probe.changed, Instant::now()) {
                    crate::trace::probe_changed(current, probe.confirmations);
                    target.request_rotation(current);
                }
            }
            Err(error) => {
                target.probe_failed();
                crate::trace::probe_failed(current, &error);
            }
        }
        let Some(next) = next_probe(started, probe.period, target.random()) else {
            // A period past the end of time (`Duration::MAX`): no next probe.
            return;
        };
        // A probe slower than the period runs the next one at once, never
        // two at a time.
        tokio::time::sleep_until(next).await;
    }
}

/// `period * (1 - PROBE_JITTER * u)`.
fn jittered(period: Duration, u: f64) -> Duration {
    period.saturating_sub(period.mul_f64(PROBE_JITTER * u.clamp(0.0, 1.0)))
}

/// When the probe after one that started at `started` runs, or `None` if
/// that is past what an `Instant` can hold.
fn next_probe(started: Instant, period: Duration, u: f64) -> Option<Instant> {
    started.checked_add(jittered(period, u))
}

/// The decision: which value belongs to the current generation, which new
/// value is being confirmed, and whether to ask for a rotation.
#[derive(Debug)]
pub(crate) struct Watch<V> {
    confirmations: u32,
    min_interval: Duration,
    /// The current generation's id and value.
    seen: Option<(u64, V)>,
    /// The latest value, if it counts as changed, and how many probes in a
    /// row returned it.
    candidate: Option<(V, u32)>,
    /// The generation a rotation was asked for, with the value that asked.
    requested: Option<(u64, V)>,
    /// When the last rotation was asked for.
    last_request: Option<Instant>,
}

impl<V: PartialEq> Watch<V> {
    pub(crate) fn new(confirmations: u32, min_interval: Duration) -> Self {
        Watch {
            confirmations,
            min_interval,
            seen: None,
            candidate: None,
            requested: None,
            last_request: None,
        }
    }

    /// Takes in one probed `value` while generation `current` is current.
    /// Returns `true` if generation `current` should be rotated away.
    pub(crate) fn observe(
        &mut self,
        current: u64,
        value: V,
        changed: &(dyn Fn(&V, &V) -> bool + Send + Sync),
        now: Instant,
    ) -> bool {
        self.follow(current);
        let Some((_, seen)) = &self.seen else {
            // The first value: the current generation's.
            self.seen = Some((current, value));
            return false;
        };
        if !changed(seen, &value) {
            self.candidate = None;
            return false;
        }
        let count = match self.candidate.take() {
            Some((candidate, count)) if candidate == value => count.saturating_add(1),
            _ => 1,
        };
        let pending = self
            .requested
            .as_ref()
            .is_some_and(|(id, _)| *id == current);
        // An interval too long to add (`Duration::MAX`) means never again.
        let allowed = self.last_request.is_none_or(|last| {
            last.checked_add(self.min_interval)
                .is_some_and(|at| now >= at)
        });
        if count >= self.confirmations && !pending && allowed {
            self.requested = Some((current, value));
            self.last_request = Some(now);
            return true;
        }
        self.candidate = Some((value, count));
        false
    }

    /// After a rotation, whatever made it: the new generation's value is
    /// the one that asked for a rotation, if one did; otherwise the latest
    /// value probed before it (built after that probe, the new client saw
    /// at least as new a world). A change between that probe and the
    /// build then shows as a change and costs one extra rotation, never a
    /// missed one.
    fn follow(&mut self, current: u64) {
        let Some((id, _)) = &self.seen else {
            return;
        };
        if *id == current {
            return;
        }
        let requested = self.requested.take();
        let latest = match (requested, self.candidate.take()) {
            (Some((asked_for, value)), _) if asked_for != current => Some(value),
            (_, Some((value, _))) => Some(value),
            (_, None) => self.seen.take().map(|(_, value)| value),
        };
        self.seen = latest.map(|value| (current, value));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::{jittered, next_probe, Watch};

    fn differ(seen: &u32, now: &u32) -> bool {
        seen != now
    }

    #[test]
    fn a_change_is_asked_for_once_after_n_equal_probes() {
        let t0 = Instant::now();
        let mut watch = Watch::new(3, Duration::ZERO);
        assert!(
            !watch.observe(1, 10, &differ, t0),
            "the first value is the baseline"
        );
        assert!(!watch.observe(1, 10, &differ, t0));
        assert!(!watch.observe(1, 20, &differ, t0), "1 of 3");
        assert!(!watch.observe(1, 20, &differ, t0), "2 of 3");
        assert!(watch.observe(1, 20, &differ, t0), "3 of 3: rotate");
        assert!(
            !watch.observe(1, 20, &differ, t0),
            "asked already; the swap is pending"
        );
        // Generation 2 took the value that asked for it.
        assert!(!watch.observe(2, 20, &differ, t0));
        assert!(!watch.observe(2, 20, &differ, t0));
        assert_eq!(watch.seen, Some((2, 20)));
    }

    #[test]
    fn a_broken_run_starts_over() {
        let t0 = Instant::now();
        let mut watch = Watch::new(2, Duration::ZERO);
        watch.observe(1, 1, &differ, t0);
        for value in [2, 3, 2, 1, 2, 3] {
            assert!(
                !watch.observe(1, value, &differ, t0),
                "{value}: no run of 2"
            );
        }
        assert!(watch.observe(1, 3, &differ, t0), "3, 3");
    }

    #[test]
    fn rotations_are_at_least_the_minimum_interval_apart() {
        let t0 = Instant::now();
        let minute = Duration::from_secs(60);
        let mut watch = Watch::new(1, minute);
        watch.observe(1, 0, &differ, t0);
        assert!(watch.observe(1, 1, &differ, t0));
        assert!(!watch.observe(2, 2, &differ, t0 + minute / 2), "too soon");
        assert!(
            watch.observe(2, 2, &differ, t0 + minute),
            "still changed after the interval"
        );
    }

    #[test]
    fn a_minimum_interval_of_duration_max_means_once() {
        let t0 = Instant::now();
        let mut watch = Watch::new(1, Duration::MAX);
        watch.observe(1, 0, &differ, t0);
        assert!(watch.observe(1, 1, &differ, t0), "the first change");
        assert!(
            !watch.observe(2, 2, &differ, t0 + Duration::from_secs(1 << 40)),
            "never another"
        );
    }

    #[test]
    fn another_rotation_takes_the_latest_value_probed_before_it() {
        let t0 = Instant::now();
        let mut watch = Watch::new(2, Duration::ZERO);
        watch.observe(1, 1, &differ, t0);
        watch.observe(1, 2, &differ, t0); // 1 of 2
                                          // A TTL rotation: the new client was built after 2 was seen.
        assert!(!watch.observe(2, 2, &differ, t0));
        assert!(!watch.observe(2, 2, &differ, t0));
        assert_eq!(watch.seen, Some((2, 2)));
    }

    #[test]
    fn a_custom_comparison_decides_what_counts() {
        let t0 = Instant::now();
        let grew = |seen: &Vec<u8>, now: &Vec<u8>| now.iter().any(|a| !seen.contains(a));
        let mut watch = Watch::new(1, Duration::ZERO);
        watch.observe(1, vec![1, 2, 3], &grew, t0);
        assert!(!watch.observe(1, vec![1, 2], &grew, t0), "a removal");
        assert!(watch.observe(1, vec![1, 2, 4], &grew, t0), "an addition");
    }

    #[test]
    fn a_period_past_the_end_of_time_has_no_next_probe() {
        let now = Instant::now();
        assert_eq!(next_probe(now, Duration::MAX, 0.0), None);
        assert_eq!(
            next_probe(now, Duration::from_secs(10), 0.0),
            Some(now + Duration::from_secs(10))
        );
    }

    #[test]
    fn jitter_only_shortens_the_period_by_at_most_a_tenth() {
        let period = Duration::from_secs(10);
        assert_eq!(jittered(period, 0.0), period);
        assert_eq!(jittered(period, 1.0), Duration::from_secs(9));
        assert_eq!(jittered(period, 7.0), Duration::from_secs(9), "clamped");
    }
}
