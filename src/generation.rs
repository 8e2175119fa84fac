//! Generation state: one built client and the bookkeeping that decides
//! when it is retired.
//!
//! A [`Generation`] lives in an `Arc`. The strong references to it are
//! exactly the things that keep it alive:
//!
//! - the `current` slot of the service, while it is the current generation;
//! - a handle between a Ready `poll_ready` and its `call` (a reservation);
//! - every response future and response body that came from it (a
//!   [`Lease`]).
//!
//! Idle handles hold no strong reference. When the last strong reference
//! goes, `Drop` retires the generation: the client is handed to the retire
//! hook (or dropped), the live count goes down, and anybody waiting for room
//! under `max_live_generations` is woken. `Drop` runs exactly once, so every
//! generation is retired exactly once, and never while a response that came
//! from it is still alive.
//!
//! The one exception is `drain_timeout`: [`Generation::force_retire`] lets
//! go of the template client early. The `retired` flag makes sure that the
//! later `Drop` does not retire it a second time.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::driver::Rng;
use crate::layer::RetireHook;
use crate::stats::{GenerationStats, RetiredGeneration};
use crate::sync::{
    self, Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Swap, SwapGuard,
};
use crate::trigger::{CallOutcome, FailurePolicy, GenerationId, Reason};

/// The generations of one rotating client: the current slot and the
/// bookkeeping behind it. This is the whole protocol that loom checks.
pub(crate) struct Generations<S: 'static> {
    current: Swap<Generation<S>>,
    /// The id of the generation in `current`, for the fast path of
    /// `poll_ready`: a handle whose cached client has this id only needs
    /// to upgrade its `Weak`, not to read the slot.
    current_id: AtomicU64,
    /// Makes the swap and the `current_id` store one step.
    install: Mutex<()>,
    core: Arc<Core<S>>,
}

impl<S: Send + 'static> Generations<S> {
    /// The first generation, current from now for `lifetime`.
    pub(crate) fn new(
        hook: std::sync::Arc<dyn RetireHook<S>>,
        triggers: Triggers,
        first: S,
        lifetime: Duration,
    ) -> Self {
        let core = Core::new(hook, triggers);
        let generation = Core::new_generation(&core, first, lifetime);
        Generations {
            current_id: AtomicU64::new(generation.id),
            current: Swap::new(generation),
            install: Mutex::new(()),
            core,
        }
    }

    /// Makes `client` current for `lifetime`. Returns the new id and the
    /// old generation, which starts draining and retires when the caller
    /// drops it and nothing else holds it.
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
        Arc::strong_count(&current) <= 2
    }

    pub(crate) fn core(&self) -> &Arc<Core<S>> {
        &self.core
    }
}

impl<S: 'static> Generations<S> {
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
    hook: std::sync::Arc<dyn RetireHook<S>>,
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
    pub(crate) triggers: Triggers,
    /// A rotation requested by a trigger: the generation it is for, and why.
    request: std::sync::Mutex<Option<(u64, Reason)>>,
    pub(crate) rotations: AtomicU64,
    pub(crate) failed_builds: AtomicU64,
    pub(crate) forced_retirements: AtomicU64,
    /// Jitter and backoff randomness, per rotating client.
    pub(crate) rng: Rng,
}

impl<S: Send + 'static> Core<S> {
    fn new(hook: std::sync::Arc<dyn RetireHook<S>>, triggers: Triggers) -> Arc<Self> {
        Arc::new(Core {
            hook,
            triggers,
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
            request_cap: this.triggers.max_requests.unwrap_or(u64::MAX),
            observes_responses: this.triggers.failures.is_some()
                || this.triggers.generation_extension,
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
    /// Asks the background task to rotate generation `id` away. The first
    /// request for a generation wins.
    pub(crate) fn request_rotation(&self, id: u64, reason: Reason) {
        let mut request = self
            .request
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Newer generations win; a request for an older one is moot.
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
    /// current generation, whose `current` slot reference is not counted as
    /// in flight.
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
                GenerationStats {
                    id: generation.id,
                    age: now.saturating_duration_since(generation.born),
                    in_flight: strong.saturating_sub(usize::from(is_current)),
                    requests: generation.requests(),
                    current: is_current,
                    draining_for: generation
                        .draining_since()
                        .map(|since| now.saturating_duration_since(since)),
                }
            })
            .collect()
    }

    /// Bookkeeping of a retirement, with the client to hand to the hook.
    /// Runs exactly once per generation (guarded by `Generation::retired`).
    fn retire(&self, id: u64, client: Option<S>, info: RetiredGeneration, drained: bool) {
        self.lock_live().remove(id);
        self.live_count.fetch_sub(1, Ordering::AcqRel);
        crate::trace::retired(&info, drained);
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
    /// The template that handles clone their client from. Emptied only by
    /// `force_retire` and by the final retirement. Locked only when a
    /// handle moves to this generation, so `S` need not be `Sync`.
    client: Mutex<Option<S>>,
    /// Requests served: one relaxed add per call.
    served: AtomicU64,
    /// `max_requests_per_generation`, or `u64::MAX`.
    request_cap: u64,
    /// Whether responses need a look (failure policy, extension).
    pub(crate) observes_responses: bool,
    /// Consecutive failures, for `rotate_on_failures`.
    failures: AtomicU32,
    draining_since: Mutex<Option<Instant>>,
    retired: AtomicBool,
    core: Arc<Core<S>>,
}

impl<S: Clone + 'static> Generation<S> {
    /// A fresh clone of this generation's client, or `None` if the
    /// generation was force-retired by `drain_timeout`.
    pub(crate) fn clone_client(&self) -> Option<S> {
        self.lock_client().clone()
    }
}

impl<S: 'static> Generation<S> {
    fn lock_client(&self) -> MutexGuard<'_, Option<S>> {
        // A panicking `Clone` of the client poisons the lock; the template
        // is still whole.
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a request; requests a rotation when it reaches the cap.
    #[inline]
    pub(crate) fn record_request(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if served == self.request_cap {
            self.core.request_rotation(self.id, Reason::MaxRequests);
        }
    }

    /// Judges a call for `rotate_on_failures`.
    fn observe(&self, outcome: &CallOutcome<'_>) {
        let Some(policy) = &self.core.triggers.failures else {
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

    pub(crate) fn requests(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Marks the moment this generation stopped being current.
    pub(crate) fn start_draining(&self) {
        let mut since = self
            .draining_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        since.get_or_insert_with(sync::now);
    }

    pub(crate) fn draining_since(&self) -> Option<Instant> {
        *self
            .draining_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn retired_info(&self, forced: bool, in_flight: usize) -> RetiredGeneration {
        let now = sync::now();
        RetiredGeneration {
            id: self.id,
            age: now.saturating_duration_since(self.born),
            requests: self.requests(),
            drained_in: self
                .draining_since()
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since)),
            forced,
            in_flight_at_retire: in_flight,
        }
    }

    /// `drain_timeout` expired: the layer lets go of this generation now.
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
        let info = this.retired_info(true, in_flight);
        let client = this.lock_client().take();
        this.core.forced_retirements.fetch_add(1, Ordering::Relaxed);
        this.core.retire(this.id, None, info, true);
        // Dropped outside the lock.
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
        let info = self.retired_info(false, 0);
        // Nobody else can hold a reference now, so the template is ours.
        let client = self.lock_client().take();
        let drained = self.draining_since().is_some();
        self.core.retire(self.id, client, info, drained);
    }
}

/// What a response future or body holds: a type-erased strong reference
/// to its generation. Erasing `S` keeps the future and body types generic
/// over the inner future and body only.
#[cfg(not(loom))]
pub(crate) struct Lease(Arc<dyn Leased>);

/// Under loom, whose `Arc` cannot be unsized, a box around the `Arc`.
#[cfg(loom)]
pub(crate) struct Lease(Box<dyn Leased>);

pub(crate) trait Leased: Send + Sync + 'static {
    fn id(&self) -> u64;

    /// A response head arrived from this generation's client. Returns the
    /// id to add to the response's extensions, if that is on.
    fn on_response(&self, _status: StatusCode, _headers: &HeaderMap) -> Option<GenerationId> {
        None
    }

    /// This generation's client returned an error.
    fn on_error(&self, _error: &dyn Any) {}
}

impl<S: Send + 'static> Leased for Generation<S> {
    fn id(&self) -> u64 {
        self.id
    }

    // Called only when `observes_responses` is set: `ResponseFuture` checks
    // the flag it copied at `call`.
    fn on_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<GenerationId> {
        self.observe(&CallOutcome::Response { status, headers });
        self.core
            .triggers
            .generation_extension
            .then_some(GenerationId(self.id))
    }

    fn on_error(&self, error: &dyn Any) {
        self.observe(&CallOutcome::Error(error));
    }
}

#[cfg(loom)]
impl<S: Send + 'static> Leased for Arc<Generation<S>> {
    fn id(&self) -> u64 {
        self.as_ref().id
    }
}

impl Lease {
    #[inline]
    pub(crate) fn new<S: Send + 'static>(generation: Arc<Generation<S>>) -> Self {
        #[cfg(not(loom))]
        return Lease(generation);
        #[cfg(loom)]
        return Lease(Box::new(generation));
    }

    /// A lease on anything, for tests that watch when it is released.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn from_arc(leased: Arc<dyn Leased>) -> Self {
        Lease(leased)
    }

    /// The id of the generation this lease keeps alive.
    pub(crate) fn generation_id(&self) -> u64 {
        self.0.id()
    }

    /// A response head arrived. Returns the id to add to the response's
    /// extensions, if that is on.
    #[inline]
    pub(crate) fn on_head(&self, status: StatusCode, headers: &HeaderMap) -> Option<GenerationId> {
        self.0.on_response(status, headers)
    }

    #[inline]
    pub(crate) fn on_error(&self, error: &dyn Any) {
        self.0.on_error(error);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&self.0.id()).finish()
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

/// Model checks of the generation protocol. Run with
/// `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
///
/// Each model asserts that a generation is never retired while a lease
/// holds it, that every generation is retired exactly once, and that none
/// is leaked (loom also fails a model that leaks an `Arc`).
#[cfg(all(test, loom))]
mod loom_tests {
    use std::time::Duration;

    use loom::thread;

    use super::{pin, Generation, Generations, Lease, Triggers};
    use crate::stats::RetiredGeneration;
    use crate::sync::{Arc, Mutex};

    const TTL: Duration = Duration::from_secs(60);

    #[derive(Clone, Debug)]
    struct Client(u64);

    /// Retirements seen by the hook (client ids), plus forced ones.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<(u64, bool)>>>);

    impl Log {
        fn generations(&self) -> Generations<Client> {
            let log = self.clone();
            let hook = move |_client: Client, generation: RetiredGeneration| {
                log.0
                    .lock()
                    .expect("loom mutex")
                    .push((generation.id, false));
            };
            Generations::new(
                std::sync::Arc::new(hook),
                Triggers::default(),
                Client(1),
                TTL,
            )
        }

        fn record_forced(&self, id: u64) {
            self.0.lock().expect("loom mutex").push((id, true));
        }

        fn is_retired(&self, id: u64) -> bool {
            self.0
                .lock()
                .expect("loom mutex")
                .iter()
                .any(|(retired, _)| *retired == id)
        }

        /// Asserts that exactly `ids` were retired, each exactly once.
        fn assert_retired_once(&self, ids: &[u64]) {
            let mut retired: Vec<u64> = self
                .0
                .lock()
                .expect("loom mutex")
                .iter()
                .map(|(id, _)| *id)
                .collect();
            retired.sort_unstable();
            assert_eq!(retired, ids, "every generation retired exactly once");
        }
    }

    /// What a handle does in `poll_ready` + `call`: read the slot, clone
    /// the client, pin the generation into a lease.
    fn lease_current(generations: &Generations<Client>) -> (u64, Lease) {
        let current = generations.load();
        let client = current
            .clone_client()
            .expect("the current generation is never force-retired");
        assert_eq!(client.0, current.id);
        (current.id, Lease::new(pin(current)))
    }

    /// Runs `f` under every interleaving loom explores (at most 3
    /// preemptions unless `LOOM_MAX_PREEMPTIONS` says otherwise) and
    /// prints how many that was.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = std::sync::Arc::clone(&runs);
        builder.check(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f();
        });
        println!(
            "explored {} interleavings",
            runs.load(std::sync::atomic::Ordering::Relaxed)
        );
    }

    #[test]
    fn loom_swap_racing_a_pin() {
        model(|| {
            let log = Log::default();
            let generations = Arc::new(log.generations());
            // Two handles pin while the main thread swaps: three threads.
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let (generations, log) = (Arc::clone(&generations), log.clone());
                    thread::spawn(move || {
                        let (id, lease) = lease_current(&generations);
                        thread::yield_now();
                        assert!(!log.is_retired(id), "generation {id} retired under a lease");
                        drop(lease);
                    })
                })
                .collect();
            let (id, old) = generations.install(Client(2), TTL);
            assert_eq!(id, 2);
            drop(old);
            for handle in handles {
                handle.join().expect("no panic");
            }
            assert!(
                log.is_retired(1),
                "generation 1 retires once its lease is gone"
            );
            assert_eq!(generations.core().live_count(), 1);
            drop(generations);
            log.assert_retired_once(&[1, 2]);
        });
    }

    #[test]
    fn loom_body_end_racing_a_swap() {
        model(|| {
            let log = Log::default();
            let generations = Arc::new(log.generations());
            let (id, lease) = lease_current(&generations);
            let body = {
                let log = log.clone();
                thread::spawn(move || {
                    assert!(!log.is_retired(id), "retired while the body streams");
                    drop(lease); // end of stream
                })
            };
            let (_, old) = generations.install(Client(2), TTL);
            drop(old);
            body.join().expect("no panic");
            log.assert_retired_once(&[1]);
            assert_eq!(generations.core().live_count(), 1);
            drop(generations);
            log.assert_retired_once(&[1, 2]);
        });
    }

    #[test]
    fn loom_two_handles_drop_the_last_leases_at_once() {
        model(|| {
            let log = Log::default();
            let generations = log.generations();
            let (_, first) = lease_current(&generations);
            let (_, second) = lease_current(&generations);
            let (_, old) = generations.install(Client(2), TTL);
            drop(old);
            assert!(!log.is_retired(1), "two leases still hold generation 1");
            let a = thread::spawn(move || drop(first));
            let b = thread::spawn(move || drop(second));
            a.join().expect("no panic");
            b.join().expect("no panic");
            log.assert_retired_once(&[1]);
            assert_eq!(generations.core().live_count(), 1);
            drop(generations);
            log.assert_retired_once(&[1, 2]);
        });
    }

    #[test]
    fn loom_rotate_racing_a_timed_swap() {
        model(|| {
            let log = Log::default();
            let generations = Arc::new(log.generations());
            let (_, lease) = lease_current(&generations);
            let rotate = {
                let generations = Arc::clone(&generations);
                thread::spawn(move || {
                    let (id, old) = generations.install(Client(2), TTL);
                    drop(old);
                    id
                })
            };
            // Both swaps race on the slot (in the service they are also
            // serialised by the rotation lock; the slot must not need it).
            let (timed_id, old) = generations.install(Client(3), TTL);
            drop(old);
            let rotate_id = rotate.join().expect("no panic");
            assert_ne!(rotate_id, timed_id, "two swaps, two generations");
            let current = generations.load().id;
            assert!(current == 2 || current == 3);
            assert_eq!(
                generations.current_id(),
                current,
                "the fast-path id matches the slot"
            );
            drop(lease);
            assert_eq!(
                generations.core().live_count(),
                1,
                "only the current one is live"
            );
            drop(generations);
            log.assert_retired_once(&[1, 2, 3]);
        });
    }

    #[test]
    fn loom_drain_timeout_racing_the_last_lease() {
        model(|| {
            let log = Log::default();
            let generations = log.generations();
            let (_, lease) = lease_current(&generations);
            let (_, old) = generations.install(Client(2), TTL);
            // The drain timer's upgraded reference races the body's end.
            let timer = {
                let log = log.clone();
                thread::spawn(move || {
                    if Generation::force_retire(&old) {
                        log.record_forced(old.id);
                    }
                })
            };
            drop(lease);
            timer.join().expect("no panic");
            log.assert_retired_once(&[1]);
            assert_eq!(
                generations.core().live_count(),
                1,
                "retired once, counted once"
            );
            drop(generations);
            log.assert_retired_once(&[1, 2]);
        });
    }
}

/// The trigger settings every generation needs on the request path.
#[derive(Clone, Debug, Default)]
pub(crate) struct Triggers {
    pub(crate) max_requests: Option<u64>,
    pub(crate) failures: Option<FailurePolicy>,
    pub(crate) generation_extension: bool,
}
