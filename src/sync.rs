//! The synchronisation primitives of the generation protocol, behind one
//! small facade so that `loom` can model-check it.
//!
//! Normally these are `std::sync` and arc-swap. Under `--cfg loom` they are
//! loom's, and the arc-swap slot is stood in for by a loom `Mutex<Arc<T>>`:
//! what loom checks is the protocol built on the slot (pin, lease, swap,
//! retire), not arc-swap itself, which has its own test suite.

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use std::sync::{Arc, Mutex, MutexGuard, Weak};

    pub(crate) fn downgrade<T>(this: &Arc<T>) -> Weak<T> {
        Arc::downgrade(this)
    }

    /// The current-generation slot.
    pub(crate) type Swap<T> = arc_swap::ArcSwap<T>;
    /// A short-lived read of the slot: never stored, never held across an
    /// `.await`.
    pub(crate) type SwapGuard<T> = arc_swap::Guard<Arc<T>>;

    /// Turns a read of the slot into an owned reference (a pin).
    #[inline]
    pub(crate) fn into_arc<T>(guard: SwapGuard<T>) -> Arc<T> {
        arc_swap::Guard::into_inner(guard)
    }

    pub(crate) fn now() -> tokio::time::Instant {
        tokio::time::Instant::now()
    }
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};

    /// Loom has no `Weak`. This one never upgrades, so under loom a handle
    /// always takes the slot path in `poll_ready`, which is what the models
    /// check; the fast path's safety is `std`'s `Weak::upgrade`.
    #[derive(Debug)]
    pub(crate) struct Weak<T>(std::marker::PhantomData<fn() -> T>);

    impl<T> Weak<T> {
        pub(crate) fn upgrade(&self) -> Option<Arc<T>> {
            None
        }
    }

    pub(crate) fn downgrade<T>(_this: &Arc<T>) -> Weak<T> {
        Weak(std::marker::PhantomData)
    }

    /// Stands in for `ArcSwap` under loom.
    #[derive(Debug)]
    pub(crate) struct Swap<T>(Mutex<Arc<T>>);

    pub(crate) type SwapGuard<T> = Arc<T>;

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

    pub(crate) fn into_arc<T>(guard: SwapGuard<T>) -> Arc<T> {
        guard
    }

    /// Loom does not model time; any instant will do.
    pub(crate) fn now() -> tokio::time::Instant {
        tokio::time::Instant::from_std(std::time::Instant::now())
    }
}

pub(crate) use imp::*;
