//! The rotation side: the state that all handles of one rotating client
//! share, and the background task that builds clients and decides when to
//! swap.
//!
//! One task per rotating client (the *driver*) sleeps until the current
//! generation is due, builds its successor (ahead of time for async
//! factories), waits for room under `max_live_generations`, and swaps.
//! Triggers (the request cap, failures, a probe's changed value) only ask
//! it for a rotation; a probe runs in a second task of its own. Both hold
//! only a `Weak` reference to the shared state, so they never keep the
//! service alive, and the state aborts them when the last handle drops.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::futures::Notified;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{Config, OnRetire};
use crate::error::RotateError;
use crate::factory::Factory;
use crate::generation::{Core, Generation, Generations};
use crate::probe::Target;
use crate::schedule::{self, Reason, MAX_SLEEP};
use crate::stats::{GenerationId, Stats};

/// State shared by all handles of one rotating client.
pub(crate) struct Rotator<S: 'static> {
    generations: Generations<S>,
    factory: Factory<S>,
    /// Serialises swaps, so that the cap check and the swap are one step.
    rotation_lock: Arc<tokio::sync::Mutex<()>>,
    driver_started: AtomicBool,
    /// Probes that failed, panicked or timed out.
    failed_probes: AtomicU64,
    /// Changes the probe has seen (rotations it asked for). A client whose
    /// build started before the latest one may predate it.
    changes: AtomicU64,
    /// The driver, the probe and the drain timers; aborted when the last
    /// handle goes.
    tasks: Mutex<Vec<AbortHandle>>,
}

impl<S> Rotator<S>
where
    S: Send + 'static,
{
    /// The shared state around a first client, already built. Starts the
    /// driver if a Tokio runtime is present.
    pub(crate) fn new(
        config: Config,
        hook: Arc<dyn OnRetire<S>>,
        factory: Factory<S>,
        first: S,
    ) -> Arc<Self> {
        let lifetime = schedule::first_lifetime(&config, schedule::Rng::new().next_f64());
        let rotator = Arc::new(Rotator {
            generations: Generations::new(config, hook, first, lifetime),
            factory,
            rotation_lock: Arc::new(tokio::sync::Mutex::new(())),
            driver_started: AtomicBool::new(false),
            failed_probes: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
        });
        if Handle::try_current().is_ok() {
            rotator.start_driver();
        }
        rotator
    }

    /// Makes `client` the current generation. The old one starts draining
    /// and retires as soon as nothing holds it. `changes` is what
    /// [`Rotator::changes`] read when the client's build started: if the
    /// probe has seen a change since, the new client may predate it, and
    /// is asked to rotate in turn (one extra rotation, never a missed
    /// change).
    fn install(&self, client: S, reason: Reason, changes: u64) -> u64 {
        let config = &self.core().config;
        let lifetime = schedule::lifetime(config.ttl, config.jitter, self.core().rng.next_f64());
        let (id, outgoing) = self.generations.install(client, lifetime);
        // After the swap, which cleared the requests for the old
        // generation under the request lock: a change asked for before
        // that is counted here; one asked for after it sees the new id
        // (`ProbeTarget::request_rotation`).
        if self.changes() != changes {
            self.core().request_rotation(id, Reason::Changed);
        }
        let old = outgoing.generation();
        // Every reservation and lease still out. Approximate: a handle that
        // read the old id just before the swap may still lease it through
        // its `Weak` after this count.
        let in_flight = old.in_flight();
        crate::trace::swapped(
            &old.figures(Instant::now(), in_flight, false),
            id,
            reason.as_str(),
        );
        let weak = crate::sync::Arc::downgrade(old);
        // Detached from here: it retires with its last lease, perhaps now.
        drop(outgoing);
        if let (Some(timeout), true) = (config.drain_timeout, in_flight > 0) {
            if let Some(deadline) = Instant::now().checked_add(timeout) {
                self.spawn(async move {
                    tokio::time::sleep_until(deadline).await;
                    if let Some(generation) = weak.upgrade() {
                        Generation::force_retire(&generation);
                    }
                });
            }
        }
        id
    }

    /// Starts the rotation timer unless it runs already. Cheap after the
    /// first call: one atomic load.
    #[inline]
    pub(crate) fn ensure_driver(self: &Arc<Self>) {
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
        let task = runtime.spawn(drive(
            Arc::downgrade(self),
            crate::sync::Arc::clone(self.core()),
        ));
        tasks.push(task.abort_handle());
        if let Some(probe) = &self.core().config.probe {
            let target = Box::new(ProbeTarget(Arc::downgrade(self)));
            tasks.push(runtime.spawn(probe.start(target)).abort_handle());
        }
        self.driver_started.store(true, Ordering::Release);
    }

    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
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

    /// `RotatingClient::rotate`: build now, wait for room, swap.
    pub(crate) async fn rotate(self: &Arc<Self>) -> Result<GenerationId, RotateError> {
        self.ensure_driver();
        let core = self.core();
        let _rotation = self.rotation_lock.lock().await;
        let changes = self.changes();
        let client = match self.factory.build(core.config.build_timeout).await {
            Ok(client) => client,
            Err(error) => {
                core.failed_builds.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        wait_for_room(core, &Arc::downgrade(self)).await;
        Ok(GenerationId(self.install(client, Reason::Rotate, changes)))
    }

    /// How many changes the probe has seen so far.
    fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }
}

impl<S: 'static> Rotator<S> {
    pub(crate) fn generations(&self) -> &Generations<S> {
        &self.generations
    }

    pub(crate) fn core(&self) -> &crate::sync::Arc<Core<S>> {
        self.generations.core()
    }

    /// Id, birth and expiry of the current generation.
    fn current_deadline(&self) -> (u64, Instant, Option<Instant>) {
        let current = self.generations.current();
        (current.id, current.born, current.expires_at)
    }

    pub(crate) fn stats(&self) -> Stats {
        let current_generation = self.generations.current().id;
        let core = self.core();
        Stats {
            current_generation: GenerationId(current_generation),
            rotations: core.rotations.load(Ordering::Relaxed),
            failed_builds: core.failed_builds.load(Ordering::Relaxed),
            failed_probes: self.failed_probes.load(Ordering::Relaxed),
            forced_retirements: core.forced_retirements.load(Ordering::Relaxed),
            generations: core.snapshot(current_generation),
        }
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<AbortHandle>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The probe task's view of the rotating client: a `Weak`, so that the
/// probe never keeps a client alive.
struct ProbeTarget<S: 'static>(Weak<Rotator<S>>);

impl<S: Send + 'static> Target for ProbeTarget<S> {
    fn current(&self) -> Option<u64> {
        Some(self.0.upgrade()?.generations.current_id())
    }

    fn request_rotation(&self, id: u64) {
        let Some(rotator) = self.0.upgrade() else {
            return;
        };
        rotator.changes.fetch_add(1, Ordering::SeqCst);
        rotator.core().request_rotation(id, Reason::Changed);
        // A swap that cleared the request (under the same lock) before the
        // request was made installed a client that may predate the change.
        let current = rotator.generations.current_id();
        if current != id {
            rotator.core().request_rotation(current, Reason::Changed);
        }
    }

    fn probe_failed(&self) {
        if let Some(rotator) = self.0.upgrade() {
            rotator.failed_probes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn random(&self) -> f64 {
        self.0
            .upgrade()
            .map_or(0.0, |rotator| rotator.core().rng.next_f64())
    }
}

impl<S: 'static> Drop for Rotator<S> {
    fn drop(&mut self) {
        for task in self.lock_tasks().drain(..) {
            task.abort();
        }
    }
}

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
async fn wait_for_room<S: Send + 'static>(core: &Core<S>, rotator: &Weak<Rotator<S>>) {
    let Some(max) = core.config.max_live else {
        return;
    };
    loop {
        let mut retired = pin!(core.retired.notified());
        retired.as_mut().enable();
        let live = core.live_count();
        if max >= 2 && live < max {
            return;
        }
        if max == 1 {
            // Room only once the current generation itself is idle.
            let idle = rotator
                .upgrade()
                .is_none_or(|rotator| rotator.generations.current_is_idle());
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
    core: &Core<S>,
    current_id: u64,
    failures: &mut u32,
) -> Result<S, Duration> {
    let started = Instant::now();
    crate::trace::build_started(current_id);
    match factory.build(core.config.build_timeout).await {
        Ok(client) => {
            crate::trace::build_succeeded(current_id, started.elapsed());
            *failures = 0;
            Ok(client)
        }
        Err(error) => {
            core.failed_builds.fetch_add(1, Ordering::Relaxed);
            *failures = failures.saturating_add(1);
            let delay = schedule::backoff(&core.config, *failures, core.rng.next_f64());
            crate::trace::build_failed(current_id, &error, *failures, delay);
            Err(delay)
        }
    }
}

/// The background task. Returns when the shared state is gone.
async fn drive<S>(rotator: Weak<Rotator<S>>, core: crate::sync::Arc<Core<S>>)
where
    S: Send + 'static,
{
    let config = &core.config;
    let mut failures: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    // When the last rotation on failures happened, for its minimum interval.
    let mut last_failure_rotation: Option<Instant> = None;
    // A client built for the successor of generation `.0`, and the
    // probe's changes when its build started.
    let mut prebuilt: Option<(u64, u64, S)> = None;
    loop {
        let mut changed = pin!(core.changed.notified());
        changed.as_mut().enable();

        let Some(state) = rotator.upgrade() else {
            return;
        };
        let (current_id, born, expires_at) = state.current_deadline();
        let factory = state.factory.clone();
        let changes = state.changes();
        drop(state);

        if prebuilt
            .as_ref()
            .is_some_and(|(id, built, _)| *id != current_id || *built != changes)
        {
            // Somebody rotated while we were building, or the probe saw a
            // change since: the prebuilt client may carry what that
            // rotation meant to replace, or predate the change.
            prebuilt = None;
        }

        // When the current generation is due, and why: its TTL, or a
        // trigger (request cap, failures, a changed probe value) if that
        // comes first.
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
                Some(due - schedule::build_ahead(config, lifetime))
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
            match build(&factory, &core, current_id, &mut failures).await {
                Ok(client) => {
                    retry_at = None;
                    prebuilt = Some((current_id, changes, client));
                }
                Err(delay) => retry_at = Some(Instant::now() + delay),
            }
            continue;
        }

        // The current generation is due: swap, one rotation at a time.
        let Some(state) = rotator.upgrade() else {
            return;
        };
        let lock = Arc::clone(&state.rotation_lock);
        drop(state);
        let _rotation = lock.lock().await;
        wait_for_room(&core, &rotator).await;
        let Some(state) = rotator.upgrade() else {
            return;
        };
        if state.current_deadline().0 != current_id {
            // `rotate()` swapped while we waited: start over.
            continue;
        }
        let changes = state.changes();
        drop(state);
        let (changes, client) = match prebuilt.take() {
            Some((_, built, client)) => (built, client),
            None => match build(&factory, &core, current_id, &mut failures).await {
                Ok(client) => (changes, client),
                Err(delay) => {
                    retry_at = Some(Instant::now() + delay);
                    continue;
                }
            },
        };
        retry_at = None;
        let Some(state) = rotator.upgrade() else {
            return;
        };
        state.install(client, reason, changes);
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
