//! A sync factory that blocks must not stall the runtime: its builds after
//! the first run on tokio's blocking pool, for timed rotations and for
//! `rotate()` alike.
//!
//! Real time, because what is measured is whether a runtime thread was
//! free while a build held another one: a 1 ms ticker on a current-thread
//! runtime, and a factory that sleeps 60 ms. Its own binary, so that no
//! other test competes for the cores. Only the ticker gaps that overlap a
//! build are judged, so a stall of the machine between builds cannot fail
//! it.

mod test_utils;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_layer::Layer;
use tower_rotating_client::{GenerationId, RotatingClientLayer};

use test_utils::Trivial;

/// How long the factory blocks its thread.
const BUILD: Duration = Duration::from_millis(60);
/// The longest gap allowed between two ticks while a build runs.
const MAX_GAP: Duration = Duration::from_millis(20);

/// When each build after the first started and ended.
type Windows = Arc<Mutex<Vec<(Instant, Instant)>>>;

/// A factory that blocks for [`BUILD`] on every call but the first (which
/// `layer` makes on the caller's thread, before the ticker starts), and
/// records when each of those calls ran.
fn blocking_factory(windows: &Windows) -> impl Fn() -> Trivial + Send + Sync + 'static {
    let windows = Arc::clone(windows);
    let calls = AtomicU32::new(0);
    move || {
        if calls.fetch_add(1, Ordering::Relaxed) > 0 {
            let started = Instant::now();
            std::thread::sleep(BUILD);
            let ended = Instant::now();
            windows.lock().expect("not poisoned").push((started, ended));
        }
        Trivial
    }
}

/// The longest gap between consecutive ticks that overlaps a window, and
/// how many windows had ticks on both sides.
fn worst_gap(ticks: &[Instant], windows: &[(Instant, Instant)]) -> (Duration, usize) {
    let mut worst = Duration::ZERO;
    for pair in ticks.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if windows.iter().any(|&(start, end)| a < end && b > start) {
            worst = worst.max(b - a);
        }
    }
    let covered = windows
        .iter()
        .filter(|&&(start, end)| {
            ticks.first().is_some_and(|&t| t < start) && ticks.last().is_some_and(|&t| t > end)
        })
        .count();
    (worst, covered)
}

/// Waits until `done` holds, polling every 5 ms; panics after 3 s.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The longest ticker gaps during the timed builds and during the build of
/// `rotate()`, in one run on a fresh current-thread runtime.
fn measure() -> (Duration, Duration) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let timed: Windows = Arc::default();
    let manual: Windows = Arc::default();

    let ticks = runtime.block_on(async {
        let ticks = Arc::new(Mutex::new(Vec::with_capacity(1024)));
        let ticker = tokio::spawn({
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    ticks.lock().expect("not poisoned").push(Instant::now());
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;

        // Timed rotations: a 100 ms TTL, two rotations.
        let client = RotatingClientLayer::new(Duration::from_millis(100))
            .jitter(0.0)
            .layer(blocking_factory(&timed));
        wait_for("two timed rotations", || client.stats().rotations >= 2).await;
        drop(client);
        // A build of the dropped client may still be running: it is judged too.
        wait_for("the second timed build to end", || {
            timed.lock().expect("not poisoned").len() >= 2
        })
        .await;
        // Ticks between the phases, so that each stall is measured alone.
        tokio::time::sleep(Duration::from_millis(10)).await;

        // `rotate()`, awaited on the runtime's only thread.
        let client = RotatingClientLayer::new(Duration::MAX).layer(blocking_factory(&manual));
        let generation = client.rotate().await.expect("the build succeeds");
        assert_eq!(generation, GenerationId(2));

        tokio::time::sleep(Duration::from_millis(10)).await;
        ticker.abort();
        let ticks = ticks.lock().expect("not poisoned").clone();
        ticks
    });

    let timed = timed.lock().expect("not poisoned").clone();
    let manual = manual.lock().expect("not poisoned").clone();
    let (timed_gap, timed_covered) = worst_gap(&ticks, &timed);
    let (manual_gap, manual_covered) = worst_gap(&ticks, &manual);
    assert!(
        timed_covered == timed.len() && timed.len() >= 2 && manual_covered == 1,
        "the ticker ran before and after every build ({timed_covered}/{} timed, {manual_covered}/1 rotate)",
        timed.len()
    );
    println!(
        "{} ticks; longest gap during {} timed builds: {timed_gap:?}, during the rotate() build: {manual_gap:?}",
        ticks.len(),
        timed.len(),
    );
    (timed_gap, manual_gap)
}

/// The stall this catches is certain: a build on the runtime's only thread
/// holds it for the whole 60 ms, in every attempt. What it must not fail
/// on is not: a loaded machine can deschedule the process for tens of
/// milliseconds (1 attempt in 20 saw a 33 ms gap while other builds ran).
/// So one of three attempts must see no gap of 20 ms or more during a
/// build; a build that stalls the runtime fails all three.
#[test]
fn a_blocking_sync_factory_never_stalls_a_current_thread_runtime() {
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (timed, manual) = measure();
        if timed < MAX_GAP && manual < MAX_GAP {
            return;
        }
        seen.push((timed, manual));
    }
    panic!(
        "a build stalled the runtime in every attempt: longest ticker gaps \
         (timed builds, rotate() build) {seen:?}, allowed under {MAX_GAP:?}"
    );
}
