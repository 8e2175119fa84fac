//! Model checks of the generation protocol. Run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib loom`.
//!
//! Each model asserts that a generation is never retired while a lease
//! holds it, that every generation is retired exactly once, and that none
//! is leaked (loom also fails a model that leaks an `Arc`).

use std::time::Duration;

use loom::thread;

use crate::config::Config;
use crate::generation::{pin, Generation, Generations};
use crate::lease::Lease;
use crate::stats::GenerationStats;
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
        let hook = move |_client: Client, generation: GenerationStats| {
            log.0
                .lock()
                .expect("loom mutex")
                .push((generation.id.0, false));
        };
        Generations::new(Config::new(TTL), std::sync::Arc::new(hook), Client(1), TTL)
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
