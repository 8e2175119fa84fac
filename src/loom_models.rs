//! Model checks of the generation protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
//!
//! Each model asserts that a generation is never retired while a lease
//! holds it, that every generation is retired exactly once, and that none
//! is leaked (loom also fails a model that leaks an `Arc`). Leases are
//! taken as the service takes them: in a lane (`take_fresh` for a handle
//! without a client, `take_lease` for one renewing), or on the
//! fast path by upgrading a `Weak` to a shard, through the facade's
//! `Arc`/`Weak` pair, whose strong count is a loom atomic.

use std::time::Duration;

use loom::thread;

use crate::config::Config;
use crate::generation::{Generation, Generations, Renewal};
use crate::lease::Lease;
use crate::stats::GenerationStats;
use crate::sync::{self, Arc, Mutex};

const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
struct Client(u64);

/// Retirements seen by the hook (generation id, requests), plus forced
/// ones (requests: `None`).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(u64, Option<u64>)>>>);

impl Log {
    fn generations(&self) -> Generations<Client> {
        let log = self.clone();
        let hook = move |_client: Client, generation: GenerationStats| {
            log.0
                .lock()
                .expect("loom mutex")
                .push((generation.id.0, Some(generation.requests)));
        };
        Generations::new(Config::new(TTL), std::sync::Arc::new(hook), Client(1), TTL)
    }

    fn record_forced(&self, id: u64) {
        self.0.lock().expect("loom mutex").push((id, None));
    }

    /// The request count the hook saw for generation `id`.
    fn requests(&self, id: u64) -> Option<u64> {
        self.0
            .lock()
            .expect("loom mutex")
            .iter()
            .find(|(retired, _)| *retired == id)
            .and_then(|(_, requests)| *requests)
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

/// What a fresh handle does in `poll_ready` + `call`: lease in its
/// thread's lane, clone the client there, count the request.
fn lease_current(generations: &Generations<Client>) -> (u64, Lease) {
    let fresh = generations
        .take_fresh(sync::thread_index())
        .expect("the lane's generation is never force-retired");
    assert_eq!(fresh.client.0, fresh.id);
    fresh.lease.count_request();
    (fresh.id, Lease::new(fresh.lease))
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
        let current = generations.current().id;
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
        let (_, outgoing) = generations.install(Client(2), TTL);
        let old = Arc::clone(outgoing.generation());
        drop(outgoing);
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

#[test]
fn loom_fast_path_racing_a_swap() {
    model(|| {
        let log = Log::default();
        let generations = Arc::new(log.generations());
        let handle = {
            let (generations, log) = (Arc::clone(&generations), log.clone());
            thread::spawn(move || {
                // Requests served per generation (ids 1 and 2).
                let mut served = [0u64; 2];
                // A handle's first request clones the client.
                let (first, lease) = lease_current(&generations);
                served[first as usize - 1] += 1;
                drop(lease);
                // Its second keeps a `Weak` to its lane's shard, unless the
                // swap came in between: then it moves to generation 2.
                let taken = generations
                    .take_lease(sync::thread_index(), Some(first))
                    .expect("not force-retired");
                taken.lease.count_request();
                served[taken.id as usize - 1] += 1;
                drop(taken.lease);
                // Its third: the fast path of `poll_ready`.
                if let Renewal::Weak(shard) = taken.renewal {
                    if generations.current_id() == taken.id {
                        if let Some(lease) = shard.upgrade() {
                            lease.count_request();
                            served[taken.id as usize - 1] += 1;
                            thread::yield_now();
                            assert!(!log.is_retired(taken.id), "retired under a fast-path lease");
                            drop(lease);
                        }
                    }
                }
                served
            })
        };
        let (id, old) = generations.install(Client(2), TTL);
        assert_eq!(id, 2);
        drop(old);
        let served = handle.join().expect("no panic");
        log.assert_retired_once(&[1]);
        drop(generations);
        log.assert_retired_once(&[1, 2]);
        assert_eq!(
            [log.requests(1), log.requests(2)],
            served.map(Some),
            "every request counted once, on its generation, by retirement"
        );
    });
}

#[test]
fn loom_fast_path_racing_the_last_lease() {
    model(|| {
        let log = Log::default();
        let generations = log.generations();
        let thread = sync::thread_index();
        let (id, first) = lease_current(&generations);
        let taken = generations
            .take_lease(thread, Some(id))
            .expect("not force-retired");
        let Renewal::Weak(shard) = taken.renewal else {
            panic!("a Weak for a handle with this generation's client");
        };
        // Swapped out while two leases are out; the lane lets go of its
        // shard, so the leases alone keep generation 1.
        let (_, old) = generations.install(Client(2), TTL);
        drop(old);
        drop(first);
        let body = thread::spawn(move || drop(taken.lease));
        // A handle that read the old id just before the swap upgrades its
        // `Weak` while the last lease ends: it either leases generation 1,
        // which then waits for it, or finds it gone.
        if let Some(lease) = shard.upgrade() {
            assert!(!log.is_retired(id), "upgraded a retired generation");
            drop(lease);
        }
        body.join().expect("no panic");
        log.assert_retired_once(&[1]);
        drop(generations);
        log.assert_retired_once(&[1, 2]);
    });
}
