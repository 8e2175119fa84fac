//! The synchronisation primitives of the generation protocol, behind one
//! small facade so that `loom` can model-check it, plus the per-thread
//! index that picks a thread's shard.
//!
//! Normally these are `std::sync` and arc-swap. Under `--cfg loom` they are
//! loom's, with two stand-ins:
//!
//! - the arc-swap slot is a loom `Mutex<Arc<T>>`: what loom checks is the
//!   protocol built on the slot, not arc-swap itself, which has its own
//!   test suite;
//! - loom has no `Weak`, so [`Arc`] and [`Weak`] are a pair written here
//!   on loom's atomics, with `std`'s semantics: a strong count, `upgrade`
//!   as a compare-exchange that fails once the count has reached zero, and
//!   the value dropped when the last strong reference goes. This is what
//!   lets the models run the fast path of `poll_ready` (`Weak::upgrade` on
//!   a shard) against swaps and the last lease.

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard, Weak};

    /// The current-generation slot.
    pub(crate) type Swap<T> = arc_swap::ArcSwap<T>;

    pub(crate) fn now() -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    /// How many shards each generation's leases are spread over: four per
    /// available core, rounded up to a power of two, so that the threads
    /// of a runtime rarely share one. At most 1,024.
    pub(crate) fn shard_count() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        cores.saturating_mul(4).next_power_of_two().min(1024)
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use loom::sync::{Mutex, MutexGuard};

    use loom::sync::atomic::Ordering;

    /// `std::sync::Arc` on loom's atomics, with a [`Weak`].
    ///
    /// The strong count is a loom atomic, so loom explores every
    /// interleaving of clones, drops and upgrades. The value itself sits in
    /// a `std::sync::Arc`, one clone per strong reference plus one in the
    /// shared part that the last strong reference takes out: it drops
    /// exactly when the count reaches zero, as with `std`.
    pub(crate) struct Arc<T> {
        shared: loom::sync::Arc<Shared<T>>,
        value: std::sync::Arc<T>,
    }

    struct Shared<T> {
        strong: AtomicUsize,
        value: Mutex<Option<std::sync::Arc<T>>>,
    }

    impl<T> Arc<T> {
        pub(crate) fn new(value: T) -> Self {
            let value = std::sync::Arc::new(value);
            Arc {
                shared: loom::sync::Arc::new(Shared {
                    strong: AtomicUsize::new(1),
                    value: Mutex::new(Some(std::sync::Arc::clone(&value))),
                }),
                value,
            }
        }

        pub(crate) fn downgrade(this: &Self) -> Weak<T> {
            Weak(loom::sync::Arc::clone(&this.shared))
        }
    }

    impl<T> Clone for Arc<T> {
        fn clone(&self) -> Self {
            self.shared.strong.fetch_add(1, Ordering::Relaxed);
            Arc {
                shared: loom::sync::Arc::clone(&self.shared),
                value: std::sync::Arc::clone(&self.value),
            }
        }
    }

    impl<T> Drop for Arc<T> {
        fn drop(&mut self) {
            // `std` decrements with Release and fences with Acquire after
            // the last one; loom 0.7 does not carry that fence through a
            // chain of read-modify-writes (it let the last reference miss
            // earlier relaxed stores), so the decrement itself is AcqRel,
            // which orders at least as strongly.
            if self.shared.strong.fetch_sub(1, Ordering::AcqRel) == 1 {
                // The last strong reference: let go of the shared clone, so
                // that the value drops with this reference's own clone.
                let last = self.shared.value.lock().map(|mut value| value.take());
                drop(last);
            }
        }
    }

    impl<T> std::ops::Deref for Arc<T> {
        type Target = T;

        fn deref(&self) -> &T {
            &self.value
        }
    }

    impl<T: Default> Default for Arc<T> {
        fn default() -> Self {
            Arc::new(T::default())
        }
    }

    impl<T: std::fmt::Debug> std::fmt::Debug for Arc<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.value.fmt(f)
        }
    }

    /// `std::sync::Weak` for the [`Arc`] above.
    pub(crate) struct Weak<T>(loom::sync::Arc<Shared<T>>);

    impl<T> Weak<T> {
        /// A compare-exchange on the strong count that never moves it off
        /// zero, as in `std`.
        pub(crate) fn upgrade(&self) -> Option<Arc<T>> {
            let mut strong = self.0.strong.load(Ordering::Relaxed);
            loop {
                if strong == 0 {
                    return None;
                }
                match self.0.strong.compare_exchange_weak(
                    strong,
                    strong + 1,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break,
                    Err(now) => strong = now,
                }
            }
            // The count was above zero, so the last reference has not
            // taken the shared clone out.
            let value = self
                .0
                .value
                .lock()
                .expect("loom mutex")
                .clone()
                .expect("a live value while the strong count is above zero");
            Some(Arc {
                shared: loom::sync::Arc::clone(&self.0),
                value,
            })
        }

        pub(crate) fn strong_count(&self) -> usize {
            self.0.strong.load(Ordering::Acquire)
        }
    }

    impl<T> Clone for Weak<T> {
        fn clone(&self) -> Self {
            Weak(loom::sync::Arc::clone(&self.0))
        }
    }

    /// Stands in for `ArcSwap` under loom.
    pub(crate) struct Swap<T>(Mutex<Arc<T>>);

    impl<T> Swap<T> {
        pub(crate) fn new(value: Arc<T>) -> Self {
            Swap(Mutex::new(value))
        }

        pub(crate) fn load(&self) -> Arc<T> {
            Arc::clone(&self.0.lock().expect("loom mutex"))
        }

        pub(crate) fn load_full(&self) -> Arc<T> {
            self.load()
        }

        pub(crate) fn swap(&self, value: Arc<T>) -> Arc<T> {
            std::mem::replace(&mut *self.0.lock().expect("loom mutex"), value)
        }
    }

    /// Loom does not model time; any instant will do.
    pub(crate) fn now() -> tokio::time::Instant {
        tokio::time::Instant::from_std(std::time::Instant::now())
    }

    /// Two shards: the models pick a thread's shard themselves.
    pub(crate) fn shard_count() -> usize {
        2
    }
}

pub(crate) use imp::*;

/// A number for the calling thread, unique among the threads of the
/// process (until 2^64 threads have started), for picking its shard. One
/// thread-local read after the first call on a thread.
///
/// While the thread's locals are being torn down it returns `usize::MAX`,
/// which matches no shard's owner: such a thread takes the shared path.
#[cfg(not(loom))]
#[inline]
pub(crate) fn thread_index() -> usize {
    use std::cell::Cell;

    std::thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(0) };
    }

    #[cold]
    fn assign(index: &Cell<usize>) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let next = NEXT.fetch_add(1, Ordering::Relaxed).max(1);
        index.set(next);
        next
    }

    INDEX
        .try_with(|index| match index.get() {
            0 => assign(index),
            assigned => assigned,
        })
        .unwrap_or(usize::MAX)
}

/// Under loom: numbered per model execution, in the order loom's threads
/// first ask, so that every execution is reproducible.
#[cfg(loom)]
pub(crate) fn thread_index() -> usize {
    use std::cell::Cell;

    loom::lazy_static! {
        static ref NEXT: AtomicUsize = AtomicUsize::new(1);
    }
    loom::thread_local! {
        static INDEX: Cell<usize> = Cell::new(0);
    }

    INDEX.with(|index| match index.get() {
        0 => {
            let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            index.set(next);
            next
        }
        assigned => assigned,
    })
}
