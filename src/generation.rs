//! Generation state: the current slot, the lanes that hand out leases, each
//! built client with its bookkeeping, and retirement.
//!
//! # Who holds a generation
//!
//! A [`Generation`] retires when its *holds* reach zero. The holds are:
//!
//! - one while it is attached: current, or still being taken out of the
//!   lanes by the swap that replaced it;
//! - one per live [`Shard`]. A lease is a strong reference to a shard, so
//!   a shard lives while its lane keeps it (only while the generation is
//!   current) or while any reservation, response future or body leased on
//!   it is alive.
//!
//! Idle handles hold only a `Weak` to a shard, which keeps neither the
//! shard's hold nor the client. When the last hold goes, the generation
//! retires: the client is handed to the retire hook (or dropped), the live
//! count goes down, and anybody waiting for room under
//! `max_live_generations` is woken. A hold count that has reached zero
//! never rises again (shards are made only in a lane, and a lane holds
//! only attached generations), so no generation retires twice, and none
//! while a response that came from it is still alive.
//!
//! The one exception is `drain_timeout`: [`Generation::force_retire`] lets
//! go of a detached generation's template client early, without the hook.
//! The `retired` flag makes sure that the later release of the last hold
//! does not retire it a second time.
//!
//! # Lanes
//!
//! Each thread takes its leases in its own *lane* (`thread index mod lane
//! count`), a cache-padded mutex with the current generation's shard for
//! that lane and a clone of its client. A handle that has used its lane
//! once keeps a `Weak` to the lane's shard and, while that generation is
//! current, takes each later lease by upgrading it: no lock, no shared
//! line. A swap walks the lanes and empties them, so that the outgoing
//! generation's shards live only as long as their leases.
//!
//! The loom models (`loom_models.rs`) check this protocol through the
//! facade in `sync.rs`, the fast path's `Weak::upgrade` included: lanes,
//! leases, swaps, the last lease, forced retirement.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{CallOutcome, Config, OnRetire};
use crate::schedule::{Reason, Rng};
use crate::shard::{Holder, Shard};
use crate::stats::{GenerationId, GenerationStats};
use crate::sync::{self, Arc, AtomicBool, AtomicU64, AtomicUsize, Mutex, MutexGuard, Swap, Weak};

/// The generations of one rotating client: the current slot, the lanes,
/// and the bookkeeping behind them.
pub(crate) struct Generations<S: 'static> {
    current: Swap<Generation<S>>,
    /// The id of the generation in `current`, for the fast path of
    /// `poll_ready`: a handle whose cached client has this id only needs
    /// to upgrade its `Weak`, not to lock its lane.
    current_id: AtomicU64,
    /// One per `thread index & mask`; the length is a power of two.
    lanes: Box<[Lane<S>]>,
    /// `lanes.len() - 1`, kept so that picking a lane is one `and` and a
    /// bounds check.
    mask: usize,
    /// Keeps the slot, `current_id` and the lanes in step when two swaps
    /// race. The service serialises its swaps with its rotation lock
    /// already; this makes `install` safe on its own, which the loom models
    /// check without that lock.
    install: Mutex<()>,
    core: Arc<Core<S>>,
}

/// One lane: its lock is taken by a handle that moves to a generation (or
/// to another thread), and by a swap.
#[repr(align(128))]
struct Lane<S: 'static>(Mutex<LaneState<S>>);

struct LaneState<S: 'static> {
    /// The current generation, or, while a swap walks the lanes, the one
    /// it replaces. Always attached.
    generation: Arc<Generation<S>>,
    /// This lane's shard of `generation`, made on first use.
    shard: Option<Arc<Shard>>,
    /// A clone of `generation`'s client for handles to clone from, made on
    /// first use, so that they need not lock the template.
    client: Option<S>,
}

impl<S: 'static> LaneState<S> {
    fn new(generation: Arc<Generation<S>>) -> Self {
        LaneState {
            generation,
            shard: None,
            client: None,
        }
    }
}

/// A lease from [`Generations::take_lease`], with what the handle needs to
/// take the next one without the lane.
pub(crate) struct Taken<S: 'static> {
    /// The generation's id.
    pub(crate) id: u64,
    pub(crate) lease: Arc<Shard>,
    pub(crate) renewal: Renewal<S>,
}

/// A lease from [`Generations::take_fresh`], with a clone of the client.
pub(crate) struct Fresh<S: 'static> {
    /// The generation's id.
    pub(crate) id: u64,
    pub(crate) lease: Arc<Shard>,
    pub(crate) client: S,
}

/// What a handle keeps from a lane.
pub(crate) enum Renewal<S: 'static> {
    /// The handle already has this generation's client: a `Weak` to the
    /// lane's shard, for the fast path of its next requests.
    Weak(Weak<Shard>),
    /// The handle moves to this generation: a clone of its client. No
    /// `Weak` yet, so that a handle used once (a fresh clone per request)
    /// pays for none; it takes one on its second request.
    Client(S),
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
        let lanes: Box<[Lane<S>]> = (0..sync::shard_count())
            .map(|_| Lane(Mutex::new(LaneState::new(Arc::clone(&generation)))))
            .collect();
        Generations {
            current_id: AtomicU64::new(generation.id),
            current: Swap::new(generation),
            mask: lanes.len() - 1,
            lanes,
            install: Mutex::new(()),
            core,
        }
    }

    /// Makes `client` current for `lifetime`. Returns the new generation's
    /// id and the outgoing generation, which starts draining, is detached
    /// when the returned guard drops, and retires once its last lease is
    /// gone.
    pub(crate) fn install(&self, client: S, lifetime: Duration) -> (u64, Outgoing<S>) {
        let generation = Core::new_generation(&self.core, client, lifetime);
        let id = generation.id;
        let installing = self
            .install
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.current.swap(Arc::clone(&generation));
        self.current_id.store(id, Ordering::Release);
        // Empty every lane: from here on, the outgoing generation's shards
        // live only as long as their leases, and no new shard of it can be
        // made. Its clients and shard references are dropped outside the
        // lane's lock.
        for lane in &self.lanes[..] {
            let replaced =
                std::mem::replace(&mut *lane.lock(), LaneState::new(Arc::clone(&generation)));
            if replaced.shard.is_some() {
                replaced.generation.in_lanes.fetch_sub(1, Ordering::AcqRel);
            }
            drop(replaced);
        }
        drop(installing);
        old.start_draining();
        self.core.rotations.fetch_add(1, Ordering::Relaxed);
        // A trigger fired on the old generation is served by this swap.
        self.core.take_request(old.id);
        self.core.changed.notify_one();
        (id, Outgoing(old))
    }

    /// Whether no lease is out on the current generation.
    pub(crate) fn current_is_idle(&self) -> bool {
        self.current().in_flight() == 0
    }
}

impl<S: 'static> Generations<S> {
    pub(crate) fn core(&self) -> &Arc<Core<S>> {
        &self.core
    }

    /// The current generation. Off the request path.
    pub(crate) fn current(&self) -> Arc<Generation<S>> {
        self.current.load_full()
    }

    /// The id of the current generation. One atomic load.
    #[inline]
    pub(crate) fn current_id(&self) -> u64 {
        self.current_id.load(Ordering::Acquire)
    }

    /// Takes a lease in the lane of thread `thread`. `have` is the
    /// generation whose client the handle holds already, if any.
    ///
    /// `None` only if the lane's generation has lost its client to
    /// `drain_timeout`, which needs it detached, so out of the lanes: a
    /// retry sees a newer one.
    pub(crate) fn take_lease(&self, thread: usize, have: Option<u64>) -> Option<Taken<S>>
    where
        S: Clone + Send,
    {
        let mut lane = self.lane(thread).lock();
        let (id, lease) = lane.lease(thread);
        let renewal = match (have == Some(id), &lane.shard) {
            (true, Some(shard)) => Renewal::Weak(Arc::downgrade(shard)),
            _ => Renewal::Client(lane.client()?),
        };
        Some(Taken { id, lease, renewal })
    }

    /// [`take_lease`](Self::take_lease) for a handle with no client yet:
    /// the lease and a clone of the client, without the `Weak`.
    #[inline]
    pub(crate) fn take_fresh(&self, thread: usize) -> Option<Fresh<S>>
    where
        S: Clone + Send,
    {
        let mut lane = self.lane(thread).lock();
        let (id, lease) = lane.lease(thread);
        let client = lane.client()?;
        Some(Fresh { id, lease, client })
    }

    #[inline]
    fn lane(&self, thread: usize) -> &Lane<S> {
        &self.lanes[thread & self.mask]
    }
}

impl<S: 'static> LaneState<S> {
    /// A lease on this lane's shard of its generation (made on first use,
    /// owned by thread `thread`), and the generation's id.
    #[inline]
    fn lease(&mut self, thread: usize) -> (u64, Arc<Shard>)
    where
        S: Send,
    {
        let LaneState {
            generation, shard, ..
        } = self;
        let shard = match shard {
            Some(shard) => shard,
            None => shard.insert(Generation::new_shard(generation, thread)),
        };
        (generation.id, Arc::clone(shard))
    }

    /// A clone of this lane's client, itself cloned from the generation's
    /// on first use. `None` if the generation has lost its client to
    /// `drain_timeout`.
    #[inline]
    fn client(&mut self) -> Option<S>
    where
        S: Clone,
    {
        let template = match &mut self.client {
            Some(client) => client,
            None => self.client.insert(self.generation.clone_client()?),
        };
        Some(template.clone())
    }
}

impl<S: 'static> Lane<S> {
    fn lock(&self) -> MutexGuard<'_, LaneState<S>> {
        // Never held across user code but `S::clone`; a poisoned lane is
        // still consistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S: 'static> Drop for Generations<S> {
    /// The last handle is gone: empty the lanes and detach the current
    /// generation, which retires once its last lease is gone.
    fn drop(&mut self) {
        let current = self.current();
        for lane in &self.lanes[..] {
            let mut lane = lane.lock();
            if lane.shard.take().is_some() {
                lane.generation.in_lanes.fetch_sub(1, Ordering::AcqRel);
            }
            let client = lane.client.take();
            drop(lane);
            drop(client);
        }
        current.detach();
    }
}

/// The generation a swap replaced. Dropping it detaches the generation,
/// which then retires as soon as no lease holds it (possibly at once).
pub(crate) struct Outgoing<S: 'static>(Arc<Generation<S>>);

impl<S: 'static> Outgoing<S> {
    pub(crate) fn generation(&self) -> &Arc<Generation<S>> {
        &self.0
    }
}

impl<S: 'static> Drop for Outgoing<S> {
    fn drop(&mut self) {
        self.0.detach();
    }
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
            holds: AtomicUsize::new(1),
            detached: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            in_lanes: AtomicUsize::new(0),
            shards: Mutex::new(Vec::new()),
            core: Arc::clone(this),
        });
        this.live_count.fetch_add(1, Ordering::AcqRel);
        this.lock_live().add(&generation);
        generation
    }
}

impl<S: 'static> Core<S> {
    /// Asks the background task to rotate generation `id` away. Newer
    /// generations win; a request for an older one is moot. For the same
    /// generation, a changed probe value wins over other triggers: it is
    /// not held back by the failure trigger's minimum interval, and the
    /// swap is traced as `changed`.
    pub(crate) fn request_rotation(&self, id: u64, reason: Reason) {
        let mut request = self
            .request
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if request.is_none_or(|(requested, was)| {
            requested < id || (requested == id && reason == Reason::Changed && was != reason)
        }) {
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

    /// Per-generation figures, oldest first.
    pub(crate) fn snapshot(&self, current_id: u64) -> Vec<GenerationStats> {
        // Upgrade under the lock, but drop the strong references only after
        // it is released (retirement takes the lock).
        let generations = self.lock_live().upgrade_all();
        let now = sync::now();
        generations
            .iter()
            .filter(|generation| !generation.retired.load(Ordering::Acquire))
            .map(|generation| {
                generation.figures(now, generation.in_flight(), generation.id == current_id)
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
    /// The template that lanes clone their client from, locked only when a
    /// lane first serves this generation, so that `S` need not be `Sync`.
    /// Emptied only by `force_retire` and by the final retirement.
    client: Mutex<Option<S>>,
    /// Requests folded in from shards that are gone, plus every request
    /// while the request cap is on.
    served: AtomicU64,
    /// Consecutive failures, for `rotate_on_failures`.
    failures: AtomicU32,
    draining_since: Mutex<Option<Instant>>,
    /// Live shards, plus one while attached. Retires at zero.
    holds: AtomicUsize,
    detached: AtomicBool,
    retired: AtomicBool,
    /// Of the live shards, how many a lane still keeps (each lane keeps one
    /// reference to its shard, which is not a lease).
    in_lanes: AtomicUsize,
    /// Every shard made, for `stats()`. Pruned as shards are made.
    shards: Mutex<Vec<Weak<Shard>>>,
    pub(crate) core: Arc<Core<S>>,
}

impl<S: Clone + 'static> Generation<S> {
    /// A fresh clone of this generation's client, or `None` if the
    /// generation was force-retired by `drain_timeout`.
    fn clone_client(&self) -> Option<S> {
        self.client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl<S: 'static> Generation<S> {
    /// A new shard of `this`, for the lane of thread `thread`. Called with
    /// that lane locked, which keeps `this` attached.
    fn new_shard(this: &Arc<Self>, thread: usize) -> Arc<Shard>
    where
        S: Send,
    {
        // With a request cap, every request is counted on the generation.
        let owner = this.core.config.max_requests.is_none().then_some(thread);
        let observes = this.core.config.observes_responses();
        let shard = Arc::new(Shard::new(Arc::clone(this), owner, observes));
        this.holds.fetch_add(1, Ordering::AcqRel);
        this.in_lanes.fetch_add(1, Ordering::AcqRel);
        let mut shards = this
            .shards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        shards.retain(|shard| shard.strong_count() > 0);
        shards.push(Arc::downgrade(&shard));
        shard
    }

    /// The live shards, upgraded. Drop them only after any lock you hold
    /// that retirement takes: the last reference retires.
    fn live_shards(&self) -> Vec<Arc<Shard>> {
        self.shards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Leases out: reservations, response futures and bodies. A snapshot:
    /// leases taken or released meanwhile may or may not be counted.
    pub(crate) fn in_flight(&self) -> usize {
        let strong: usize = self
            .shards
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(Weak::strong_count)
            .sum();
        strong.saturating_sub(self.in_lanes.load(Ordering::Acquire))
    }

    /// Requests served so far: those of shards that are gone, plus the
    /// live shards' counts.
    fn requests(&self) -> u64 {
        let live = self.live_shards();
        let counted: u64 = live.iter().map(|shard| shard.requests()).sum();
        let served = self.served.load(Ordering::Acquire);
        drop(live);
        served + counted
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

    /// No longer current and out of the lanes: release the attached hold.
    /// Idempotent.
    fn detach(&self) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            self.release_hold();
        }
    }

    fn release_hold(&self) {
        if self.holds.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.retire();
        }
    }

    /// The last hold is gone: hand the client to the hook. Once.
    fn retire(&self) {
        if self.retired.swap(true, Ordering::AcqRel) {
            return;
        }
        // Retired while current only at shutdown, when never detached by a
        // swap.
        let current = self.draining_since().is_none();
        let info = self.figures(sync::now(), 0, current);
        let client = self
            .client
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        self.core.retire(info, client, false);
    }

    /// `drain_timeout` expired: the layer lets go of this generation now.
    /// Returns `false` if it had retired already, or is still attached
    /// (only a detached generation drains).
    ///
    /// The template client is dropped without the retire hook (the hook
    /// never sees a client with responses in flight). Responses still open
    /// keep running on whatever the inner client's own futures and bodies
    /// hold; their leases no longer pin anything.
    pub(crate) fn force_retire(this: &Arc<Self>) -> bool {
        if !this.detached.load(Ordering::Acquire) || this.retired.swap(true, Ordering::AcqRel) {
            return false;
        }
        let info = this.figures(sync::now(), this.in_flight(), false);
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

impl<S: Send + 'static> Holder for Generation<S> {
    fn id(&self) -> u64 {
        self.id
    }

    // Called only when the config observes responses: `ResponseFuture`
    // checks the lease's shard (`Shard::observes`).
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

    /// Counts a request; requests a rotation when it reaches the cap.
    fn count_request(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if self.core.config.max_requests == Some(served) {
            self.core.request_rotation(self.id, Reason::MaxRequests);
        }
    }

    fn shard_dropped(&self, requests: u64) {
        self.served.fetch_add(requests, Ordering::AcqRel);
        self.release_hold();
    }
}

/// Weak references to the live generations, oldest first, for `stats()`.
struct Registry<S: 'static> {
    entries: Vec<(u64, Weak<Generation<S>>)>,
}

impl<S> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            entries: Vec::new(),
        }
    }
}

impl<S> Registry<S> {
    fn add(&mut self, generation: &Arc<Generation<S>>) {
        self.entries
            .push((generation.id, Arc::downgrade(generation)));
    }

    fn remove(&mut self, id: u64) {
        self.entries.retain(|(live_id, _)| *live_id != id);
    }

    /// Each live generation, upgraded. The caller must drop the result
    /// only after releasing the lock: dropping a last reference may retire
    /// a generation, which takes the lock.
    fn upgrade_all(&self) -> Vec<Arc<Generation<S>>> {
        self.entries
            .iter()
            .filter_map(|(_, weak)| weak.upgrade())
            .collect()
    }
}
