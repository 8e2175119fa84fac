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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::driver::Rng;
use crate::layer::RetireHook;
use crate::stats::{GenerationStats, RetiredGeneration};

/// State shared by every generation of one rotating client.
///
/// It outlives the handles: a generation that is still draining after the
/// last handle is gone needs it to retire itself.
pub(crate) struct Core<S: 'static> {
    hook: Arc<dyn RetireHook<S>>,
    /// Weak references to the live generations, oldest first. Touched only
    /// when a generation is built or retired and by `stats()`.
    live: Mutex<Vec<(u64, Weak<Generation<S>>)>>,
    live_count: AtomicUsize,
    next_id: AtomicU64,
    /// Woken whenever a generation retires (room under the cap).
    pub(crate) retired: Notify,
    /// Woken whenever the current generation changes.
    pub(crate) changed: Notify,
    pub(crate) rotations: AtomicU64,
    pub(crate) failed_builds: AtomicU64,
    pub(crate) forced_retirements: AtomicU64,
    /// Jitter and backoff randomness, per rotating client.
    pub(crate) rng: Rng,
}

impl<S: Send + Sync + 'static> Core<S> {
    pub(crate) fn new(hook: Arc<dyn RetireHook<S>>) -> Arc<Self> {
        Arc::new(Core {
            hook,
            live: Mutex::new(Vec::new()),
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
    pub(crate) fn new_generation(
        self: &Arc<Self>,
        client: S,
        lifetime: Duration,
    ) -> Arc<Generation<S>> {
        let born = Instant::now();
        let generation = Arc::new(Generation {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            born,
            // An overflow (a TTL of `Duration::MAX`) means never.
            expires_at: born.checked_add(lifetime),
            client: ArcSwapOption::from_pointee(client),
            served: AtomicU64::new(0),
            draining_since: Mutex::new(None),
            retired: AtomicBool::new(false),
            core: Arc::clone(self),
        });
        self.live_count.fetch_add(1, Ordering::AcqRel);
        self.lock_live()
            .push((generation.id, Arc::downgrade(&generation)));
        generation
    }
}

impl<S: 'static> Core<S> {
    /// Current plus draining generations.
    pub(crate) fn live_count(&self) -> usize {
        self.live_count.load(Ordering::Acquire)
    }

    fn lock_live(&self) -> MutexGuard<'_, Vec<(u64, Weak<Generation<S>>)>> {
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
        let generations: Vec<(usize, Arc<Generation<S>>)> = self
            .lock_live()
            .iter()
            .filter_map(|(_, weak)| {
                let strong = weak.strong_count();
                weak.upgrade().map(|generation| (strong, generation))
            })
            .collect();
        let now = Instant::now();
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
    fn retire(&self, id: u64, client: Option<S>, info: RetiredGeneration) {
        {
            let mut live = self.lock_live();
            live.retain(|(live_id, _)| *live_id != id);
        }
        self.live_count.fetch_sub(1, Ordering::AcqRel);
        crate::trace::retired(&info);
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
    /// `force_retire` and by the final retirement.
    client: ArcSwapOption<S>,
    /// Requests served. One relaxed add per call, on the cache line the
    /// reservation already wrote.
    served: AtomicU64,
    draining_since: Mutex<Option<Instant>>,
    retired: AtomicBool,
    core: Arc<Core<S>>,
}

impl<S: Clone + 'static> Generation<S> {
    /// A fresh clone of this generation's client, or `None` if the
    /// generation was force-retired by `drain_timeout`.
    pub(crate) fn clone_client(&self) -> Option<S> {
        self.client.load().as_deref().cloned()
    }
}

impl<S: 'static> Generation<S> {
    #[inline]
    pub(crate) fn record_request(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
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
        since.get_or_insert_with(Instant::now);
    }

    pub(crate) fn draining_since(&self) -> Option<Instant> {
        *self
            .draining_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn retired_info(&self, forced: bool, in_flight: usize) -> RetiredGeneration {
        let now = Instant::now();
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
    pub(crate) fn force_retire(self: &Arc<Self>) -> bool {
        if self.retired.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Our own reference is not in flight.
        let in_flight = Arc::strong_count(self).saturating_sub(1);
        let info = self.retired_info(true, in_flight);
        let client = self.client.swap(None);
        self.core.forced_retirements.fetch_add(1, Ordering::Relaxed);
        self.core.retire(self.id, None, info);
        // Readers that are cloning right now hold their own reference to
        // the template; it goes when they are done.
        drop(client);
        true
    }
}

impl<S: 'static> Drop for Generation<S> {
    fn drop(&mut self) {
        if *self.retired.get_mut() {
            return;
        }
        *self.retired.get_mut() = true;
        let info = self.retired_info(false, 0);
        // Nobody else can hold a reference now, so the template is ours.
        let client = self
            .client
            .swap(None)
            .and_then(|arc| Arc::try_unwrap(arc).ok());
        self.core.retire(self.id, client, info);
    }
}

/// What a response future or body holds: a type-erased strong reference
/// to its generation. Erasing `S` keeps the future and body types generic
/// over the inner future and body only.
pub(crate) struct Lease(Arc<dyn Leased>);

pub(crate) trait Leased: Any + Send + Sync {
    fn id(&self) -> u64;
}

impl<S: Send + Sync + 'static> Leased for Generation<S> {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Lease {
    #[inline]
    pub(crate) fn new<S: Send + Sync + 'static>(generation: Arc<Generation<S>>) -> Self {
        Lease(generation)
    }

    /// A lease on anything, for tests that watch when it is released.
    #[cfg(test)]
    pub(crate) fn from_arc(leased: Arc<dyn Leased>) -> Self {
        Lease(leased)
    }

    /// The id of the generation this lease keeps alive.
    pub(crate) fn generation_id(&self) -> u64 {
        self.0.id()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&self.0.id()).finish()
    }
}
