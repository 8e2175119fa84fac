//! Generation state: the current slot, each built client with its
//! bookkeeping, and retirement.
//!
//! A [`Generation`] lives in an `Arc`. The strong references to it are
//! exactly the things that keep it alive:
//!
//! - the `current` slot, while it is the current generation;
//! - a handle between a Ready `poll_ready` and its `call` (a reservation);
//! - every response future and response body that came from it (a
//!   [`Lease`](crate::lease::Lease));
//! - for a moment, whoever is reading it: the background task, `stats()`,
//!   a drain timer.
//!
//! Idle handles hold only a `Weak`. When the last strong reference goes,
//! `Drop` retires the generation: the client is handed to the retire hook
//! (or dropped), the live count goes down, and anybody waiting for room
//! under `max_live_generations` is woken. `Drop` runs once, so no
//! generation is retired twice, and never while a response that came from
//! it is still alive.
//!
//! The one exception is `drain_timeout`: [`Generation::force_retire`] lets
//! go of the template client early, without the hook. The `retired` flag
//! makes sure that the later `Drop` does not retire it a second time.
//!
//! The loom models (`loom_models.rs`) check this protocol through the
//! facade in `sync.rs`: pin through the slot, lease, swap, retire, force.
//! They do not model the `Weak` fast path of `poll_ready` (loom has no
//! `Weak`); its safety rests on `std`'s `Weak::upgrade`, which never
//! revives a generation whose last strong reference is gone.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{CallOutcome, Config, OnRetire};
use crate::lease::Leased;
use crate::schedule::{Reason, Rng};
use crate::stats::{GenerationId, GenerationStats};
use crate::sync::{
    self, Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Swap, SwapGuard,
};

/// The generations of one rotating client: the current slot and the
/// bookkeeping behind it.
pub(crate) struct Generations<S: 'static> {
    current: Swap<Generation<S>>,
    /// The id of the generation in `current`, for the fast path of
    /// `poll_ready`: a handle whose cached client has this id only needs
    /// to upgrade its `Weak`, not to read the slot.
    current_id: AtomicU64,
    /// Keeps the slot and `current_id` in step when two swaps race. The
    /// service serialises its swaps with its rotation lock already; this
    /// makes `install` safe on its own, which the loom models check
    /// without that lock.
    install: Mutex<()>,
    core: Arc<Core<S>>,
}

impl<S: Send + 'static> Generations<S> {
    /// The first generation, current from now for `lifetime`.
    pub(crate) fn new(
        config: Config,
        hook: std::sync::Arc<dyn OnRetire<S>>,
        first: S,
        lifetime: Duration,
    ) -> Self {
        let core = Core::new(config, hook);
        let generation = Core::new_generation(&core, first, lifetime);
        Generations {
            current_id: AtomicU64::new(generation.id),
            current: Swap::new(generation),
            install: Mutex::new(()),
            core,
        }
    }

    /// Makes `client` current for `lifetime`. Returns the new generation's
    /// id and the old generation, which starts draining and retires when
    /// the caller drops it and nothing else holds it.
    pub(crate) fn install(&self, client: S, lifetime: Duration) -> (u64, Arc<Generation<S>>) {
        let generation = Core::new_generation(&self.core, client, lifetime);
        let id = generation.id;
        let installing = self
            .install
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current.swap(generation);
        self.current_id.store(id, Ordering::Release);
        drop(installing);
        old.start_draining();
        self.core.rotations.fetch_add(1, Ordering::Relaxed);
        // A trigger fired on the old generation is served by this swap.
        self.core.take_request(old.id);
        self.core.changed.notify_one();
        (id, old)
    }

    /// Whether nothing but the slot holds the current generation.
    pub(crate) fn current_is_idle(&self) -> bool {
        let current = self.current.load_full();
        // Ours and the slot's.
        Arc::strong_count(&current) <= 2
    }
}

impl<S: 'static> Generations<S> {
    pub(crate) fn core(&self) -> &Arc<Core<S>> {
        &self.core
    }

    /// A short-lived read of the current generation.
    #[inline]
    pub(crate) fn load(&self) -> SwapGuard<Generation<S>> {
        self.current.load()
    }

    /// The id of the current generation. One atomic load.
    #[inline]
    pub(crate) fn current_id(&self) -> u64 {
        self.current_id.load(Ordering::Acquire)
    }
}

/// Turns a read of the slot into a reservation of that generation.
#[inline]
pub(crate) fn pin<S>(current: SwapGuard<Generation<S>>) -> Arc<Generation<S>> {
    sync::into_arc(current)
}

/// State shared by every generation of one rotating client.
///
/// It outlives the handles: a generation that is still draining after the
/// last handle is gone needs it to retire itself.
pub(crate) struct Core<S: 'static> {
    pub(crate) config: Config,
    hook: std::sync::Arc<dyn OnRetire<S>>,
    /// Weak references to the live generations, oldest first. Touched only
    /// when a generation is built or retired and by `stats()`.
    live: Mutex<Registry<S>>,
    live_count: AtomicUsize,
    next_id: AtomicU64,
    /// Woken whenever a generation retires (room under the cap).
    pub(crate) retired: Notify,
    /// Wakes the background task: the current generation changed, or a
    /// trigger requested a rotation. `notify_one`, so a wake-up that comes
    /// while the task is busy is kept for its next wait.
    pub(crate) changed: Notify,
    /// A rotation requested by a trigger: the generation it is for, and why.
    request: std::sync::Mutex<Option<(u64, Reason)>>,
    pub(crate) rotations: AtomicU64,
    pub(crate) failed_builds: AtomicU64,
    pub(crate) forced_retirements: AtomicU64,
    /// Jitter and backoff randomness, per rotating client.
    pub(crate) rng: Rng,
}

impl<S: Send + 'static> Core<S> {
    fn new(config: Config, hook: std::sync::Arc<dyn OnRetire<S>>) -> Arc<Self> {
        Arc::new(Core {
            config,
            hook,
            request: std::sync::Mutex::new(None),
            live: Mutex::new(Registry::default()),
            live_count: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            retired: Notify::new(),
            changed: Notify::new(),
            rotations: AtomicU64::new(0),
            failed_builds: AtomicU64::new(0),
            forced_retirements: AtomicU64::new(0),
            rng: Rng::new(),
        })
    }

    /// Wraps a freshly built client into a new generation, born now and
    /// due after `lifetime`, and registers it as live.
    fn new_generation(this: &Arc<Self>, client: S, lifetime: Duration) -> Arc<Generation<S>> {
        let born = sync::now();
        let generation = Arc::new(Generation {
            id: this.next_id.fetch_add(1, Ordering::Relaxed),
            born,
            // An overflow (a TTL of `Duration::MAX`) means never.
            expires_at: born.checked_add(lifetime),
            client: Mutex::new(Some(client)),
            served: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            draining_since: Mutex::new(None),
            retired: AtomicBool::new(false),
            core: Arc::clone(this),
        });
        this.live_count.fetch_add(1, Ordering::AcqRel);
        this.lock_live().add(&generation);
        generation
    }
}

impl<S: 'static> Core<S> {
    /// Asks the background task to rotate generation `id` away. Newer
    /// generations win; a request for an older one is moot.
    pub(crate) fn request_rotation(&self, id: u64, reason: Reason) {
        let mut request = self
            .request
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if request.is_none_or(|(requested, _)| requested < id) {
            *request = Some((id, reason));
            drop(request);
            self.changed.notify_one();
        }
    }

    /// The pending request for generation `id`, if any.
    pub(crate) fn requested(&self, id: u64) -> Option<Reason> {
        let request = self
            .request
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        request
            .filter(|(requested, _)| *requested == id)
            .map(|(_, reason)| reason)
    }

    fn take_request(&self, id: u64) {
        let mut request = self
            .request
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if request.is_some_and(|(requested, _)| requested <= id) {
            *request = None;
        }
    }

    /// Current plus draining generations.
    pub(crate) fn live_count(&self) -> usize {
        self.live_count.load(Ordering::Acquire)
    }

    fn lock_live(&self) -> MutexGuard<'_, Registry<S>> {
        // The lock is never held across user code, but a poisoned lock must
        // not turn into a panic in `Drop`.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Per-generation figures, oldest first. `current_id` is the id of the
    /// current generation, whose slot reference is not counted as in
    /// flight.
    pub(crate) fn snapshot(&self, current_id: u64) -> Vec<GenerationStats> {
        // Upgrade under the lock, but drop the strong references only after
        // it is released: dropping the last one retires the generation,
        // which takes the lock again.
        let generations = self.lock_live().upgrade_all();
        let now = sync::now();
        generations
            .iter()
            .filter(|(_, generation)| !generation.retired.load(Ordering::Acquire))
            .map(|(strong, generation)| {
                let is_current = generation.id == current_id;
                // `strong` was read before our own upgrade; the current
                // generation has one more reference, held by the slot.
                let in_flight = strong.saturating_sub(usize::from(is_current));
                generation.figures(now, in_flight, is_current)
            })
            .collect()
    }

    /// Bookkeeping of a retirement, with the client to hand to the hook.
    /// Runs once per generation (guarded by `Generation::retired`).
    fn retire(&self, info: GenerationStats, client: Option<S>, forced: bool) {
        self.lock_live().remove(info.id.0);
        self.live_count.fetch_sub(1, Ordering::AcqRel);
        crate::trace::retired(&info, forced);
        if let Some(client) = client {
            if std::thread::panicking() {
                // A panicking hook would abort the process now; just drop.
                drop(client);
            } else {
                let hook = &self.hook;
                // The hook is user code running inside `Drop`: contain it.
                let _ = catch_unwind(AssertUnwindSafe(|| hook.on_retire(client, info)));
            }
        }
        self.retired.notify_waiters();
    }
}

/// One built client and its bookkeeping.
pub(crate) struct Generation<S: 'static> {
    pub(crate) id: u64,
    pub(crate) born: Instant,
    /// When this generation should stop being current; `None` is never.
    pub(crate) expires_at: Option<Instant>,
    /// The template that handles clone their client from, locked only when
    /// a handle moves to this generation, so that `S` need not be `Sync`.
    /// Emptied only by `force_retire` and by the final retirement.
    client: Mutex<Option<S>>,
    /// Requests served: one relaxed add per call.
    served: AtomicU64,
    /// Consecutive failures, for `rotate_on_failures`.
    failures: AtomicU32,
    draining_since: Mutex<Option<Instant>>,
    retired: AtomicBool,
    pub(crate) core: Arc<Core<S>>,
}

impl<S: Clone + 'static> Generation<S> {
    /// A fresh clone of this generation's client, or `None` if the
    /// generation was force-retired by `drain_timeout`.
    pub(crate) fn clone_client(&self) -> Option<S> {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl<S: 'static> Generation<S> {
    /// Counts a request; requests a rotation when it reaches the cap.
    #[inline]
    pub(crate) fn record_request(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if self.core.config.max_requests == Some(served) {
            self.core.request_rotation(self.id, Reason::MaxRequests);
        }
    }

    /// Judges a call for `rotate_on_failures`.
    fn observe(&self, outcome: &CallOutcome<'_>) {
        let Some(policy) = &self.core.config.failures else {
            return;
        };
        // The predicate is user code on the request path: a panic in it
        // must not reach the request. It counts as "not a failure".
        let failed =
            catch_unwind(AssertUnwindSafe(|| (policy.is_failure)(outcome))).unwrap_or(false);
        if failed {
            let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            // Failures of a draining generation do not count.
            if failures == policy.threshold && self.draining_since().is_none() {
                self.core.request_rotation(self.id, Reason::Failures);
            }
        } else if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    fn requests(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Marks the moment this generation stopped being current.
    fn start_draining(&self) {
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        since.get_or_insert_with(sync::now);
    }

    fn draining_since(&self) -> Option<Instant> {
        *self
            .draining_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// This generation's figures at `now`.
    pub(crate) fn figures(&self, now: Instant, in_flight: usize, current: bool) -> GenerationStats {
        GenerationStats {
            id: GenerationId(self.id),
            age: now.saturating_duration_since(self.born),
            in_flight,
            requests: self.requests(),
            current,
            draining_for: self
                .draining_since()
                .map(|since| now.saturating_duration_since(since)),
        }
    }

    /// `drain_timeout` expired: the layer lets go of this generation now.
    /// Returns `false` if it had retired already.
    ///
    /// The template client is dropped without the retire hook (the hook
    /// never sees a client with responses in flight). Responses still open
    /// keep running on whatever the inner client's own futures and bodies
    /// hold; their leases no longer pin anything.
    pub(crate) fn force_retire(this: &Arc<Self>) -> bool {
        if this.retired.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Our own reference is not in flight.
        let in_flight = Arc::strong_count(this).saturating_sub(1);
        let info = this.figures(sync::now(), in_flight, false);
        let client = this
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        this.core.forced_retirements.fetch_add(1, Ordering::Relaxed);
        this.core.retire(info, None, true);
        drop(client);
        true
    }
}

impl<S: 'static> Drop for Generation<S> {
    fn drop(&mut self) {
        // A plain swap, not `get_mut`, which loom's atomics lack.
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        let current = self.draining_since().is_none();
        let info = self.figures(sync::now(), 0, current);
        let client = self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        self.core.retire(info, client, false);
    }
}

impl<S: Send + 'static> Leased for Generation<S> {
    fn id(&self) -> u64 {
        self.id
    }

    // Called only when the config observes responses: `ResponseFuture`
    // checks the flag it was given at `call`.
    fn on_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<GenerationId> {
        self.observe(&CallOutcome::Response { status, headers });
        self.core
            .config
            .generation_extension
            .then_some(GenerationId(self.id))
    }

    fn on_error(&self, error: &dyn Any) {
        self.observe(&CallOutcome::Error(error));
    }
}

/// Weak references to the live generations, oldest first, for `stats()`.
/// Loom has no `Weak`; under loom the registry keeps nothing.
struct Registry<S: 'static> {
    #[cfg(not(loom))]
    entries: Vec<(u64, std::sync::Weak<Generation<S>>)>,
    #[cfg(loom)]
    entries: std::marker::PhantomData<S>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            entries: Default::default(),
        }
    }
}

#[cfg(not(loom))]
impl<S> Registry<S> {
    fn add(&mut self, generation: &Arc<Generation<S>>) {
        self.entries
            .push((generation.id, Arc::downgrade(generation)));
    }

    fn remove(&mut self, id: u64) {
        self.entries.retain(|(live_id, _)| *live_id != id);
    }

    /// Each live generation with its strong count, read before upgrading.
    /// The caller must drop the result only after releasing the lock:
    /// dropping the last reference retires, which takes the lock.
    fn upgrade_all(&self) -> Vec<(usize, Arc<Generation<S>>)> {
        self.entries
            .iter()
            .filter_map(|(_, weak)| {
                let strong = weak.strong_count();
                weak.upgrade().map(|generation| (strong, generation))
            })
            .collect()
    }
}

#[cfg(loom)]
impl<S> Registry<S> {
    fn add(&mut self, _generation: &Arc<Generation<S>>) {}

    fn remove(&mut self, _id: u64) {}

    fn upgrade_all(&self) -> Vec<(usize, Arc<Generation<S>>)> {
        Vec::new()
    }
}
