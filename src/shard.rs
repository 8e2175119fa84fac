//! [`Shard`]: one of a generation's lease counters, alone on its cache line.
//!
//! A lease is a strong reference to a shard, and a shard holds its
//! generation, type-erased, so that a lease is one thin `Arc<Shard>` and the
//! response future and body stay generic over the inner future and body
//! only. Each thread takes its leases on the shard of its own lane
//! (see `generation.rs`), so on the request path a thread writes only its
//! own shard's line: one compare-exchange to take a lease (`Weak::upgrade`),
//! one decrement to release it, and a plain store to count the request.
//! Nothing on that path touches a line that another thread writes.
//!
//! When a shard's last reference goes, `Drop` folds its request count into
//! the generation and releases the hold it had on it; the generation
//! retires when the last of its shards, and its place in the lanes, are
//! gone. That makes retirement exact without ever summing counters that
//! are still moving.

use std::any::Any;
use std::fmt;
use std::sync::atomic::Ordering;

use http::{HeaderMap, StatusCode};

use crate::stats::GenerationId;
use crate::sync::{self, AtomicU64};

/// What a shard belongs to: a generation (or, in unit tests, a stand-in).
pub(crate) trait Holder: Send + Sync + 'static {
    /// The generation's id.
    fn id(&self) -> u64;

    /// Counts one request on the holder itself, for a shard that does not
    /// count alone (the request cap needs every request at once).
    fn count_request(&self);

    /// A shard is gone: fold in the `requests` it counted and release the
    /// hold it had.
    fn shard_dropped(&self, requests: u64);

    /// A response head arrived from this generation's client. Returns the
    /// id to add to the response's extensions, if that is on.
    fn on_response(&self, _status: StatusCode, _headers: &HeaderMap) -> Option<GenerationId> {
        None
    }

    /// This generation's client returned an error.
    fn on_error(&self, _error: &dyn Any) {}
}

/// The holder, type-erased: an `Arc<dyn Holder>`, or under loom (whose
/// `Arc` cannot be unsized) a box around the facade's `Arc`.
#[cfg(not(loom))]
type Erased = std::sync::Arc<dyn Holder>;
#[cfg(loom)]
type Erased = Box<dyn Holder>;

#[cfg(loom)]
impl<T: Holder> Holder for sync::Arc<T> {
    fn id(&self) -> u64 {
        T::id(self)
    }

    fn count_request(&self) {
        T::count_request(self);
    }

    fn shard_dropped(&self, requests: u64) {
        T::shard_dropped(self, requests);
    }

    fn on_response(&self, status: StatusCode, headers: &HeaderMap) -> Option<GenerationId> {
        T::on_response(self, status, headers)
    }

    fn on_error(&self, error: &dyn Any) {
        T::on_error(self, error);
    }
}

/// One lease counter of a generation: the strong count of its `Arc`, plus
/// the requests counted on it. Aligned so that no other allocation shares
/// its cache line (128 bytes: adjacent-line prefetch pairs 64-byte lines).
#[repr(align(128))]
pub(crate) struct Shard {
    holder: Erased,
    /// The thread that counts on `owned` with a plain store; `None` when
    /// every request is counted on the holder.
    owner: Option<usize>,
    /// Whether the holder looks at every outcome (failure trigger,
    /// generation extension): read by each response future, on this line.
    observes: bool,
    /// Requests counted by the owner thread: written by that thread only,
    /// so a load and a store count exactly, without a read-modify-write.
    owned: AtomicU64,
    /// Requests counted by any other thread that took a lease here (a
    /// handle that moved, or more threads than lanes).
    shared: AtomicU64,
}

impl Shard {
    /// A shard of `holder` whose requests are counted alone by the thread
    /// `owner`, or, with `None`, each on the holder. `observes`: whether
    /// the holder looks at every outcome of its client.
    pub(crate) fn new<T: Holder>(
        holder: sync::Arc<T>,
        owner: Option<usize>,
        observes: bool,
    ) -> Self {
        #[cfg(not(loom))]
        let holder: Erased = holder;
        #[cfg(loom)]
        let holder: Erased = Box::new(holder);
        Shard {
            holder,
            owner,
            observes,
            owned: AtomicU64::new(0),
            shared: AtomicU64::new(0),
        }
    }

    /// Whether the generation looks at every outcome of its client.
    #[inline]
    pub(crate) fn observes(&self) -> bool {
        self.observes
    }

    /// The id of the generation this shard belongs to.
    pub(crate) fn generation_id(&self) -> u64 {
        self.holder.id()
    }

    /// Lets the generation judge a response head (see [`Holder`]).
    pub(crate) fn on_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<GenerationId> {
        self.holder.on_response(status, headers)
    }

    /// Lets the generation judge an error of its client.
    pub(crate) fn on_error(&self, error: &dyn Any) {
        self.holder.on_error(error);
    }

    /// Counts one request served under a lease on this shard. Returns the
    /// calling thread's `sync::thread_index()`, which it reads anyway, so
    /// that the handle can tell whether it has moved to another thread.
    #[inline]
    pub(crate) fn count_request(&self) -> usize {
        let thread = sync::thread_index();
        if self.owner == Some(thread) {
            // Only the owner writes `owned`: no read-modify-write needed.
            let owned = self.owned.load(Ordering::Relaxed);
            self.owned.store(owned + 1, Ordering::Relaxed);
        } else {
            self.count_shared();
        }
        thread
    }

    #[cold]
    #[inline(never)]
    fn count_shared(&self) {
        match self.owner {
            None => self.holder.count_request(),
            Some(_) => {
                self.shared.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The requests counted on this shard so far.
    pub(crate) fn requests(&self) -> u64 {
        self.owned.load(Ordering::Relaxed) + self.shared.load(Ordering::Relaxed)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // The last reference is gone, so every count happened before this.
        // Read them with read-modify-writes, which see the latest value
        // whatever the memory model's fine print: loom 0.7 let a plain
        // load here miss the owner's last stores even after the strong
        // count's acquire. Once per shard, off the request path.
        let requests = self.owned.swap(0, Ordering::AcqRel) + self.shared.swap(0, Ordering::AcqRel);
        self.holder.shard_dropped(requests);
    }
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("generation", &self.generation_id())
            .field("owner", &self.owner)
            .field("requests", &self.requests())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{Holder, Shard};
    use crate::sync::thread_index;

    /// Records what its shards report.
    #[derive(Default)]
    struct Recorder {
        counted: AtomicU64,
        dropped: Mutex<Vec<u64>>,
    }

    impl Holder for Recorder {
        fn id(&self) -> u64 {
            7
        }

        fn count_request(&self) {
            self.counted.fetch_add(1, Ordering::Relaxed);
        }

        fn shard_dropped(&self, requests: u64) {
            self.dropped.lock().expect("not poisoned").push(requests);
        }
    }

    #[test]
    fn a_shard_is_alone_on_its_cache_line() {
        assert_eq!(std::mem::align_of::<Shard>(), 128);
    }

    #[test]
    fn owner_and_other_threads_both_count_exactly() {
        let recorder = Arc::new(Recorder::default());
        let shard = Arc::new(Shard::new(
            Arc::clone(&recorder),
            Some(thread_index()),
            false,
        ));
        for _ in 0..5 {
            shard.count_request();
        }
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        shard.count_request();
                    }
                });
            }
        });
        assert_eq!(shard.requests(), 2_005, "owner stores and others' adds");
        assert_eq!(recorder.counted.load(Ordering::Relaxed), 0);
        drop(shard);
        assert_eq!(
            *recorder.dropped.lock().expect("not poisoned"),
            [2_005],
            "the count is folded into the holder once, at drop"
        );
    }

    #[test]
    fn a_shard_without_owner_counts_each_request_on_its_holder() {
        let recorder = Arc::new(Recorder::default());
        let shard = Shard::new(Arc::clone(&recorder), None, false);
        shard.count_request();
        shard.count_request();
        assert_eq!(recorder.counted.load(Ordering::Relaxed), 2);
        assert_eq!(shard.requests(), 0);
        drop(shard);
        assert_eq!(*recorder.dropped.lock().expect("not poisoned"), [0]);
    }
}
