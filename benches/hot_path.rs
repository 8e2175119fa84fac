//! The per-request cost of the layer, without any I/O.
//!
//! One request is `poll_ready` + `call` + polling the response future +
//! draining a one-chunk body, on a trivial in-memory client whose future is
//! `std::future::Ready`. Futures are polled by hand with a no-op waker, so
//! the figure is the layer and nothing else.
//!
//! Variants, all in the same run:
//!
//! - `bare`: the trivial client alone;
//! - `floor`: the trivial client plus two atomic read-modify-writes per
//!   request on its handle's own counter, and one shared `Arc` bumped per
//!   clone: the least a design that keeps a generation alive can pay (see
//!   [`Floor`]);
//! - `guarded`: the floor's two atomics as an `Arc` guard that the response
//!   future hands to the body, which drops it at the end of the stream, and
//!   nothing else: the least a design that keeps a generation alive until
//!   the body ends pays (see [`Guarded`]). Long-lived handles only: not in
//!   `clone_per_request`;
//! - `rotating/no_rotation`: `RotatingClient` with a 1 h TTL;
//! - `rotating/rotate_every_1000`: `RotatingClient`, `rotate()` about every
//!   1,000 requests (a sync factory, so a rotation is a build plus a swap);
//! - `alt/*`: other ways to swap a client, written here, that do the same
//!   work per request (reserve the current generation in `poll_ready`,
//!   reuse a cached clone of its client, count the request, keep the
//!   generation alive until the body is drained): a `RwLock<Arc<_>>`, a
//!   `Mutex<Arc<_>>` and arc-swap's `load_full()`, plus `weak_upgrade`, the
//!   layer's own fast path stripped of its features (see `WeakClient`).
//!   Like a `RotatingClient`, a clone of one starts with nothing cached.
//!   These clone the generation's client through a shared reference, so
//!   they need `S: Sync`; `rwlock_arc_send_only` is the `RwLock` design
//!   over a client that is only `Send`, as `RotatingClient` allows: the
//!   generation keeps it behind a `Mutex`, locked to clone it (see
//!   [`Locked`]).
//!
//! Groups, the columns of the final table, each with every variant (but
//! `guarded`, as above):
//!
//! - `single_thread`: one long-lived handle on one thread, over `Trivial`;
//! - `two_threads`, `four_threads`: `n` threads, each with its own
//!   long-lived clone of one shared service, over `Trivial`. The figure is
//!   wall time per request: from the first thread's start to the last
//!   thread's end, over the total number of requests. In
//!   `rotate_every_1000`, thread 0 rotates after every `1000 / n` of its own
//!   requests, so about every 1,000 requests overall. On a machine with
//!   fewer than four cores (the reference machine has two), four threads are
//!   oversubscribed: they take turns on the cores, and a thread preempted
//!   inside a critical section (`alt/mutex_arc`, `alt/rwlock_arc`) holds up
//!   the others;
//! - `clone_per_request`: one thread; every request goes through a fresh
//!   clone of a stored service, dropped after its request (what axum's
//!   `State` and `ServiceExt::oneshot` do). The inner client is
//!   `SharedTrivial`, whose clone bumps one `Arc` like a real client's
//!   handle, so `bare` is that clone plus the request; a fresh
//!   `RotatingClient` (or `alt/*`) handle finds nothing cached and clones
//!   the current generation's client on its first `poll_ready`.
//!   `rotate_every_1000` rotates every 1,000 requests.
//!
//! After criterion's own report, two tables of medians and ratios to the
//! `bare` of the same column are printed, with the cost of one atomic
//! operation (group `calibration`) and the speed-up of `bare` on two and
//! four threads:
//!
//! - criterion's: each benchmark's samples, taken one benchmark after the
//!   other. On a shared VM the machine's speed drifts over a run (the same
//!   `bare` loop measured 41 and 55 ns a few minutes apart), and that drift
//!   lands on whichever variant runs at the time;
//! - the interleaved pass, the reference: after criterion's samples of a
//!   group, 31 rounds in which every variant of the group runs in turn as
//!   many requests (per thread) as `bare` serves in 10 ms, at least
//!   100,000, each round starting one variant further. Drift then falls on all variants alike, and the medians over
//!   the rounds compare designs within one column.
//!
//! Each benchmark warms up for 0.5 s and measures for 2 s (criterion's
//! defaults: 3 s + 5 s), and criterion draws no HTML plots. A full
//! `cargo bench --bench hot_path` (41 benchmarks and the interleaved pass)
//! took 3 min 21 s on the reference machine (two cores);
//! `cargo bench --bench hot_path -- --quick` is a shorter run;
//! `cargo test --bench hot_path` runs each variant once, as a smoke test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError, RwLock, Weak};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tower_rotating_client::RotatingClientLayer;

/// Requests between two rotations in `rotating/rotate_every_1000`, overall.
const ROTATE_EVERY: u64 = 1_000;

// ---------------------------------------------------------------------------
// The trivial client
// ---------------------------------------------------------------------------

// The trivial client and one request through a service polled by hand,
// shared with the allocation test.
#[path = "../tests/test_utils/trivial.rs"]
mod trivial;

use trivial::{one_request, SharedTrivial, Trivial};

/// `n` requests. One function per variant, never inlined into the
/// harness, so that every variant's loop is compiled alike whatever else
/// the bench contains.
#[inline(never)]
fn requests<S, B>(service: &mut S, cx: &mut Context<'_>, n: u64)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    for _ in 0..n {
        std::hint::black_box(one_request(service, cx));
    }
}

/// `n` requests, each on a fresh clone of `stored`, dropped after its
/// request. One function per variant, never inlined, like [`requests`].
#[inline(never)]
fn requests_fresh<S, B>(stored: &S, cx: &mut Context<'_>, n: u64)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let mut service = stored.clone();
        std::hint::black_box(one_request(&mut service, cx));
        drop(service);
    }
}

/// `n` requests, run in chunks by `run(chunk)`, calling `rotate` after
/// every `every`-th request (counted across calls in `count`).
fn with_rotations(
    mut n: u64,
    count: &mut u64,
    every: u64,
    mut run: impl FnMut(u64),
    rotate: &dyn Fn(),
) {
    while n > 0 {
        let chunk = n.min(every - *count % every);
        run(chunk);
        n -= chunk;
        *count += chunk;
        if *count % every == 0 {
            rotate();
        }
    }
}

/// Times `iters` requests sent by `chunk(n)` (n requests at a time),
/// rotating every `ROTATE_EVERY` requests (counted across calls in `count`)
/// if `rotate` is given.
fn timed(
    iters: u64,
    count: &mut u64,
    rotate: Option<&(dyn Fn() + Sync)>,
    mut chunk: impl FnMut(u64),
) -> Duration {
    let start = Instant::now();
    match rotate {
        Some(rotate) => with_rotations(iters, count, ROTATE_EVERY, chunk, rotate),
        None => chunk(iters),
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------
// Alternative designs
// ---------------------------------------------------------------------------

/// The floor: the trivial client plus the two atomic read-modify-writes
/// that any design keeping a generation alive per request needs (take a
/// lease, release it), both on a line only this handle writes. A clone
/// also bumps one shared `Arc`, as a handle on shared state does; so a
/// fresh clone per request costs six read-modify-writes (the client's
/// clone and drop, the handle's, the lease's), the floor of that column.
struct Floor<S> {
    inner: S,
    shared: Arc<()>,
    leases: AtomicU64,
}

impl<S> Floor<S> {
    fn new(inner: S) -> Self {
        Floor {
            inner,
            shared: Arc::new(()),
            leases: AtomicU64::new(0),
        }
    }
}

impl<S: Clone> Clone for Floor<S> {
    fn clone(&self) -> Self {
        Floor {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
            leases: AtomicU64::new(0),
        }
    }
}

impl<S: Service<Request<()>>> Service<Request<()>> for Floor<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        std::hint::black_box(&self.leases).fetch_add(1, Ordering::AcqRel);
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request<()>) -> S::Future {
        std::hint::black_box(&self.leases).fetch_sub(1, Ordering::AcqRel);
        self.inner.call(request)
    }
}

/// The floor's two read-modify-writes carried the way any design that keeps
/// a generation alive until the body ends must carry them: `poll_ready`
/// clones an `Arc` that only this handle uses, the response future hands
/// the clone to the body, and the body drops it when the stream ends.
/// Nothing else: no slot, no generation, no count. So `floor` is bare plus
/// the two atomics with nothing carried, and `guarded` is the least a
/// design that wraps the response pays.
///
/// A clone makes its own `Arc` (an allocation), so `guarded` runs only in
/// the columns of long-lived handles, not per fresh clone.
struct Guarded<S> {
    inner: S,
    guard: Arc<()>,
    reserved: Option<Arc<()>>,
}

impl<S> Guarded<S> {
    fn new(inner: S) -> Self {
        Guarded {
            inner,
            guard: Arc::new(()),
            reserved: None,
        }
    }
}

impl<S: Clone> Clone for Guarded<S> {
    fn clone(&self) -> Self {
        Guarded::new(self.inner.clone())
    }
}

impl<S, B> Service<Request<()>> for Guarded<S>
where
    S: Service<Request<()>, Response = Response<B>>,
    B: Body,
{
    type Response = Response<GuardBody<B, Arc<()>>>;
    type Error = S::Error;
    type Future = GuardFuture<S::Future, Arc<()>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        ready!(self.inner.poll_ready(cx))?;
        self.reserved = Some(Arc::clone(&self.guard));
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: Request<()>) -> Self::Future {
        GuardFuture {
            inner: self.inner.call(request),
            guard: self.reserved.take(),
        }
    }
}

/// A generation of an alternative design: an id, the client, and a count
/// of requests served (`RotatingClient` counts them too, for `stats()` and
/// `max_requests_per_generation`).
struct Generation<S> {
    id: u64,
    client: S,
    served: AtomicU64,
}

impl<S> Generation<S> {
    fn first(client: S) -> Arc<Self> {
        Arc::new(Generation {
            id: 1,
            client,
            served: AtomicU64::new(0),
        })
    }
}

/// Where an alternative design keeps the current generation.
trait Slot<T>: Send + Sync + 'static {
    fn new(value: Arc<T>) -> Self;
    /// An owned reference to the current value.
    fn load(&self) -> Arc<T>;
}

struct RwLockSlot<T>(RwLock<Arc<T>>);

impl<T: Send + Sync + 'static> Slot<T> for RwLockSlot<T> {
    fn new(value: Arc<T>) -> Self {
        RwLockSlot(RwLock::new(value))
    }

    #[inline]
    fn load(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }
}

struct MutexSlot<T>(Mutex<Arc<T>>);

impl<T: Send + Sync + 'static> Slot<T> for MutexSlot<T> {
    fn new(value: Arc<T>) -> Self {
        MutexSlot(Mutex::new(value))
    }

    #[inline]
    fn load(&self) -> Arc<T> {
        Arc::clone(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

struct ArcSwapSlot<T>(ArcSwap<T>);

impl<T: Send + Sync + 'static> Slot<T> for ArcSwapSlot<T> {
    fn new(value: Arc<T>) -> Self {
        ArcSwapSlot(ArcSwap::new(value))
    }

    #[inline]
    fn load(&self) -> Arc<T> {
        self.0.load_full()
    }
}

/// A client as a design that asks only `S: Send` of it (as `RotatingClient`
/// does) must keep it in a generation that all threads share: behind a
/// `Mutex`, so that cloning it locks, where `S: Sync` would let any thread
/// clone it through a shared reference. A handle's own copy is used through
/// `get_mut`, without locking.
struct Locked<S>(Mutex<S>);

impl<S: Clone> Clone for Locked<S> {
    fn clone(&self) -> Self {
        let client = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Locked(Mutex::new(client))
    }
}

impl<S: Service<R>, R> Service<R> for Locked<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: R) -> S::Future {
        self.0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .call(request)
    }
}

/// An alternative swapping client. Does the same per-request work as
/// `RotatingClient`: reserves the current generation in `poll_ready`,
/// reuses its cached clone of the client while that generation is current,
/// and hands the reservation to the response future and then the body.
struct AltClient<L, S> {
    slot: Arc<L>,
    cached: Option<(u64, S)>,
    reserved: Option<Arc<Generation<S>>>,
}

impl<L: Slot<Generation<S>>, S> AltClient<L, S> {
    fn new(client: S) -> Self {
        AltClient {
            slot: Arc::new(L::new(Generation::first(client))),
            cached: None,
            reserved: None,
        }
    }
}

impl<L, S> Clone for AltClient<L, S> {
    fn clone(&self) -> Self {
        AltClient {
            slot: Arc::clone(&self.slot),
            cached: None,
            reserved: None,
        }
    }
}

impl<L, S, B> Service<Request<()>> for AltClient<L, S>
where
    L: Slot<Generation<S>>,
    S: Service<Request<()>, Response = Response<B>> + Clone,
    B: Body,
{
    type Response = Response<GuardBody<B, Arc<Generation<S>>>>;
    type Error = S::Error;
    type Future = GuardFuture<S::Future, Arc<Generation<S>>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let current = self.slot.load();
        let cached = match &mut self.cached {
            Some((id, client)) if *id == current.id => client,
            cached => &mut cached.insert((current.id, current.client.clone())).1,
        };
        ready!(cached.poll_ready(cx))?;
        self.reserved = Some(current);
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: Request<()>) -> Self::Future {
        let (Some(guard), Some((_, client))) = (self.reserved.take(), self.cached.as_mut()) else {
            panic!("call before poll_ready");
        };
        guard.served.fetch_add(1, Ordering::Relaxed);
        GuardFuture {
            inner: client.call(request),
            guard: Some(guard),
        }
    }
}

/// The layer's own fast path in its minimal form: the current generation's
/// id in a plain atomic, and in each handle a `Weak` to the generation it
/// last used. A request is one load of the id, one `Weak::upgrade` (a
/// compare-exchange on the strong count), the served count and, when the
/// body ends, one decrement: three read-modify-writes instead of arc-swap's
/// five (debt slot, pay, increment, count, decrement). An idle handle's
/// `Weak` keeps the generation's memory but not its client, so idle handles
/// still pin nothing. What it leaves out of `RotatingClient`: the
/// type-erased lease, the request cap, the outcome hooks' flag and the
/// lazy start of the rotation timer.
struct WeakShared<S> {
    current_id: AtomicU64,
    /// For the slow path (a new generation), and for swaps.
    current: ArcSwap<Generation<S>>,
}

struct WeakClient<S> {
    shared: Arc<WeakShared<S>>,
    cached: Option<(Weak<Generation<S>>, u64, S)>,
    reserved: Option<Arc<Generation<S>>>,
}

impl<S> WeakClient<S> {
    fn new(client: S) -> Self {
        WeakClient {
            shared: Arc::new(WeakShared {
                current_id: AtomicU64::new(1),
                current: ArcSwap::new(Generation::first(client)),
            }),
            cached: None,
            reserved: None,
        }
    }
}

impl<S> Clone for WeakClient<S> {
    fn clone(&self) -> Self {
        WeakClient {
            shared: Arc::clone(&self.shared),
            cached: None,
            reserved: None,
        }
    }
}

impl<S, B> Service<Request<()>> for WeakClient<S>
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    B: Body,
{
    type Response = Response<GuardBody<B, Arc<Generation<S>>>>;
    type Error = S::Error;
    type Future = GuardFuture<S::Future, Arc<Generation<S>>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let id = self.shared.current_id.load(Ordering::Acquire);
        let pinned = match &self.cached {
            Some((generation, cached_id, _)) if *cached_id == id => generation.upgrade(),
            _ => None,
        };
        let current = match pinned {
            Some(current) => current,
            None => {
                let current = self.shared.current.load_full();
                self.cached = Some((Arc::downgrade(&current), current.id, current.client.clone()));
                current
            }
        };
        let Some((_, _, client)) = self.cached.as_mut() else {
            unreachable!("cached above")
        };
        ready!(client.poll_ready(cx))?;
        self.reserved = Some(current);
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, request: Request<()>) -> Self::Future {
        let (Some(guard), Some((_, _, client))) = (self.reserved.take(), self.cached.as_mut())
        else {
            panic!("call before poll_ready");
        };
        guard.served.fetch_add(1, Ordering::Relaxed);
        GuardFuture {
            inner: client.call(request),
            guard: Some(guard),
        }
    }
}

pin_project! {
    /// Holds a guard until the response arrives, then moves it to the body.
    struct GuardFuture<F, G> {
        #[pin]
        inner: F,
        guard: Option<G>,
    }
}

impl<F, G, B, E> Future for GuardFuture<F, G>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
{
    type Output = Result<Response<GuardBody<B, G>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        // The guard is taken on a response only, and the result matched
        // rather than mapped through closures: the compiler then builds
        // the output with one copy of the head less (measured: 376 -> 334
        // instructions per request for `guarded`, 17 to 19 fewer for the
        // `alt/*` designs).
        Poll::Ready(match result {
            Ok(response) => {
                let guard = if response.body().is_end_stream() {
                    None
                } else {
                    this.guard.take()
                };
                Ok(response.map(|inner| GuardBody { inner, guard }))
            }
            Err(e) => Err(e),
        })
    }
}

pin_project! {
    /// Holds a guard until the end of the stream, like `ResponseBody`.
    struct GuardBody<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B: Body, G> Body for GuardBody<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let over = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(frame)) => frame.is_trailers() || this.inner.is_end_stream(),
        };
        if over {
            *this.guard = None;
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------

/// Every sample criterion took, per benchmark: (iterations, time). Used for
/// the table of medians at the end.
#[derive(Default)]
struct Samples(Mutex<BTreeMap<String, Vec<(u64, Duration)>>>);

impl Samples {
    fn record(&self, id: &str, iters: u64, elapsed: Duration) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_owned())
            .or_default()
            .push((iters, elapsed));
    }

    /// How many samples benchmark `id` has.
    fn count(&self, id: &str) -> usize {
        let samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        samples.get(id).map_or(0, Vec::len)
    }

    /// Median time per iteration, in ns.
    fn median_ns(&self, id: &str) -> Option<f64> {
        let samples = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut per_iter: Vec<f64> = samples
            .get(id)?
            .iter()
            .map(|(iters, elapsed)| elapsed.as_secs_f64() * 1e9 / *iters as f64)
            .collect();
        per_iter.sort_by(f64::total_cmp);
        per_iter.get(per_iter.len() / 2).copied()
    }
}

/// A fresh current-thread runtime with the time driver, for the rotation
/// timer and `rotate()`.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime")
}

/// The variants, in table order.
const VARIANTS: [&str; 10] = [
    "bare",
    "floor",
    "guarded",
    "rotating/no_rotation",
    "rotating/rotate_every_1000",
    "alt/rwlock_arc",
    "alt/mutex_arc",
    "alt/arc_swap_load_full",
    "alt/rwlock_arc_send_only",
    "alt/weak_upgrade",
];

/// How a group runs its requests: one column of the table.
#[derive(Clone, Copy)]
enum Mode {
    /// One long-lived handle on one thread.
    Single,
    /// This many threads, each with its own long-lived clone.
    Threads(u64),
    /// One thread; every request on a fresh clone of the stored service.
    ClonePerRequest,
}

/// The columns of the table, in order.
const COLUMNS: [Mode; 4] = [
    Mode::Single,
    Mode::Threads(2),
    Mode::Threads(4),
    Mode::ClonePerRequest,
];

impl Mode {
    /// The criterion group, which also prefixes the recorded samples.
    fn group(self) -> &'static str {
        match self {
            Mode::Single => "single_thread",
            Mode::Threads(2) => "two_threads",
            Mode::Threads(4) => "four_threads",
            Mode::Threads(n) => panic!("no group for {n} threads"),
            Mode::ClonePerRequest => "clone_per_request",
        }
    }
}

/// One variant in one column, ready to run: `run(n)` sends `n` requests
/// (per thread, for `Threads`) and returns the time per request times `n`.
struct Runner<'a> {
    id: &'static str,
    run: Box<dyn FnMut(u64) -> Duration + 'a>,
    /// Requests given to `run` after which a rotation is due.
    due_after: u64,
    /// Requests given to `run` so far.
    ran: u64,
}

impl Runner<'_> {
    fn run(&mut self, n: u64) -> Duration {
        self.ran += n;
        (self.run)(n)
    }

    /// Whether enough requests ran for at least one rotation to be due.
    fn rotation_due(&self) -> bool {
        self.ran >= self.due_after
    }
}

/// `service` as `mode` runs it. `rotate`, if given, rotates the service
/// about every `ROTATE_EVERY` requests.
fn runner<'a, S, B>(
    mode: Mode,
    id: &'static str,
    service: S,
    rotate: Option<&'a (dyn Fn() + Sync)>,
) -> Runner<'a>
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone + Send + 'a,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let (run, due_after): (Box<dyn FnMut(u64) -> Duration + 'a>, u64) = match mode {
        Mode::Single => {
            let mut service = service;
            let mut cx = Context::from_waker(Waker::noop());
            // A new handle clones its client on first use (and takes its
            // `Weak` on the second), and arc-swap sets up per-thread
            // state: not part of the measurement.
            one_request(&mut service, &mut cx);
            one_request(&mut service, &mut cx);
            // Requests, across samples.
            let mut count = 0;
            let run = move |iters| {
                timed(iters, &mut count, rotate, |chunk| {
                    requests(&mut service, &mut cx, chunk);
                })
            };
            (Box::new(run), ROTATE_EVERY)
        }
        Mode::Threads(n) => {
            let every = ROTATE_EVERY / n;
            // Requests of the rotating thread, across samples.
            let rotation_count = AtomicU64::new(0);
            let run = move |iters| threads(n, &service, iters, every, &rotation_count, rotate);
            (Box::new(run), every)
        }
        Mode::ClonePerRequest => {
            let stored = service;
            let mut cx = Context::from_waker(Waker::noop());
            // arc-swap sets up per-thread state on first use: not part of
            // the measurement. Every measured request pays for its handle.
            requests_fresh(&stored, &mut cx, 1);
            // Requests, across samples.
            let mut count = 0;
            let run = move |iters| {
                timed(iters, &mut count, rotate, |chunk| {
                    requests_fresh(&stored, &mut cx, chunk);
                })
            };
            (Box::new(run), ROTATE_EVERY)
        }
    };
    Runner {
        id,
        run,
        due_after,
        ran: 0,
    }
}

/// Rounds of the interleaved pass.
const ROUNDS: usize = 31;

/// How long `bare` runs in each round of the interleaved pass; the other
/// variants run as many requests, for longer. A fixed 100,000 requests
/// took 1.4 ms on a fast host, too short for the threads of the
/// multi-thread columns to run side by side: `bare` ran no faster on two
/// threads than on one, and no design showed contention.
const ROUND: Duration = Duration::from_millis(10);

/// Requests per variant and round (per thread in the multi-thread
/// columns): as many as `bare` serves in [`ROUND`] by criterion's median
/// of this column, and at least 100,000.
fn per_round(samples: &Samples, mode: Mode) -> u64 {
    let threads = match mode {
        Mode::Threads(n) => n,
        Mode::Single | Mode::ClonePerRequest => 1,
    };
    let bare = samples.median_ns(&format!("{}/bare", mode.group()));
    bare.map_or(100_000, |ns| {
        // `ns` is wall time per request over all threads.
        let requests = ROUND.as_secs_f64() * 1e9 / (ns * threads as f64);
        (requests as u64).max(100_000)
    })
}

/// Benchmarks each runner with criterion, then, unless criterion is only
/// testing (one iteration each), runs the interleaved pass: `ROUNDS`
/// rounds, each running every variant once in turn (starting one further
/// each round), so that the machine's slow and fast phases fall on all
/// variants alike.
fn bench_runners(
    group: &mut BenchmarkGroup<'_, WallTime>,
    samples: &Samples,
    mode: Mode,
    runners: &mut [Runner<'_>],
) {
    for runner in runners.iter_mut() {
        let key = format!("{}/{}", mode.group(), runner.id);
        group.bench_function(runner.id, |b| {
            b.iter_custom(|iters| {
                let elapsed = runner.run(iters);
                samples.record(&key, iters, elapsed);
                elapsed
            })
        });
    }
    if samples.count(&format!("{}/bare", mode.group())) < 10 {
        return;
    }
    let per_round = per_round(samples, mode);
    for round in 0..ROUNDS {
        for k in 0..runners.len() {
            let runner = &mut runners[(round + k) % runners.len()];
            let elapsed = runner.run(per_round);
            let key = format!("interleaved/{}/{}", mode.group(), runner.id);
            samples.record(&key, per_round, elapsed);
        }
    }
}

/// One sample on `n` threads, each with its own clone of `service`, `iters`
/// requests each. Returns wall time per request: from the first thread's
/// start to the last thread's end, over `n`.
///
/// `rotate`, if given, is called by thread 0 every `every` of its requests
/// (counted across samples in `rotation_count`).
fn threads<S, B>(
    n: u64,
    service: &S,
    iters: u64,
    every: u64,
    rotation_count: &AtomicU64,
    rotate: Option<&(dyn Fn() + Sync)>,
) -> Duration
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone + Send,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let barrier = Barrier::new(usize::try_from(n).expect("a few threads"));
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|thread| {
                let mut service = service.clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut cx = Context::from_waker(Waker::noop());
                    // A new handle clones its client on first use, and
                    // arc-swap sets up per-thread state: not part of the
                    // measurement.
                    one_request(&mut service, &mut cx);
                    barrier.wait();
                    let start = Instant::now();
                    match rotate.filter(|_| thread == 0) {
                        Some(rotate) => {
                            let mut count = rotation_count.load(Ordering::Relaxed);
                            with_rotations(
                                iters,
                                &mut count,
                                every,
                                |chunk| requests(&mut service, &mut cx, chunk),
                                rotate,
                            );
                            rotation_count.store(count, Ordering::Relaxed);
                        }
                        None => requests(&mut service, &mut cx, iters),
                    }
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("bench thread"))
            .collect()
    });
    let start = spans.iter().map(|span| span.0).min().expect("n spans");
    let end = spans.iter().map(|span| span.1).max().expect("n spans");
    (end - start) / u32::try_from(n).expect("a few threads")
}

/// Group `mode.group()`: every variant, over the inner client `inner` (the
/// rotating variants' factories clone it).
fn bench_group<C>(c: &mut Criterion, samples: &Samples, mode: Mode, inner: C)
where
    C: Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let rt = runtime();
    let _entered = rt.enter();
    let mut group = c.benchmark_group(mode.group());

    let layer = RotatingClientLayer::new(Duration::from_secs(3600));
    let make = inner.clone();
    let steady = layer.layer(move || make.clone());
    let make = inner.clone();
    let rotating = layer.layer(move || make.clone());
    // `rotate()` builds a sync factory's client on tokio's blocking pool
    // (a hop of some microseconds) and swaps on the runtime, which also
    // lets the driver task see the swap, as it would in production. Every
    // 1,000 requests, that cost is spread over them.
    let rotate = || {
        rt.block_on(rotating.rotate())
            .expect("a sync build succeeds");
    };
    let mut runners = vec![
        runner(mode, "bare", inner.clone(), None),
        runner(mode, "floor", Floor::new(inner.clone()), None),
    ];
    if !matches!(mode, Mode::ClonePerRequest) {
        runners.push(runner(mode, "guarded", Guarded::new(inner.clone()), None));
    }
    runners.extend([
        runner(mode, "rotating/no_rotation", steady, None),
        runner(
            mode,
            "rotating/rotate_every_1000",
            rotating.clone(),
            Some(&rotate),
        ),
        runner(
            mode,
            "alt/rwlock_arc",
            AltClient::<RwLockSlot<_>, _>::new(inner.clone()),
            None,
        ),
        runner(
            mode,
            "alt/mutex_arc",
            AltClient::<MutexSlot<_>, _>::new(inner.clone()),
            None,
        ),
        runner(
            mode,
            "alt/arc_swap_load_full",
            AltClient::<ArcSwapSlot<_>, _>::new(inner.clone()),
            None,
        ),
        runner(
            mode,
            "alt/rwlock_arc_send_only",
            AltClient::<RwLockSlot<_>, _>::new(Locked(Mutex::new(inner.clone()))),
            None,
        ),
        runner(mode, "alt/weak_upgrade", WeakClient::new(inner), None),
    ]);
    if let Some((group, variant, n)) = count_only() {
        // One variant's loop alone, for an instruction count.
        if group == mode.group() {
            if let Some(runner) = runners.iter_mut().find(|runner| runner.id == variant) {
                runner.run(n);
            }
        }
        return;
    }
    bench_runners(&mut group, samples, mode, &mut runners);
    group.finish();
    let rotation_due = runners
        .iter()
        .any(|runner| runner.id == "rotating/rotate_every_1000" && runner.rotation_due());
    assert!(
        !rotation_due || rotating.stats().rotations > 0,
        "the rotating variant did rotate"
    );
}

/// The unit of the hot path's cost: one uncontended atomic
/// read-modify-write (a `lock xadd` on x86), and a plain atomic load.
fn bench_calibration(c: &mut Criterion, samples: &Samples) {
    let mut group = c.benchmark_group("calibration");
    let counter = AtomicU64::new(0);
    group.bench_function("fetch_add", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(&counter).fetch_add(1, Ordering::Relaxed);
            }
            let elapsed = start.elapsed();
            samples.record("calibration/fetch_add", iters, elapsed);
            elapsed
        })
    });
    group.bench_function("load", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(std::hint::black_box(&counter).load(Ordering::Acquire));
            }
            let elapsed = start.elapsed();
            samples.record("calibration/load", iters, elapsed);
            elapsed
        })
    });
    group.finish();
}

/// Prints medians and ratios to the `bare` of the same column, as a
/// Markdown table, from the samples whose key starts with `prefix`.
/// Skipped when criterion only checked that each benchmark runs (`cargo
/// test --benches`): one iteration says nothing.
fn print_table(samples: &Samples, prefix: &str, title: &str) {
    if samples.count(&format!("{prefix}single_thread/bare")) < 10 {
        println!("\n(test mode, or the single-thread group filtered out: no table of {title})");
        return;
    }
    println!("\n{title}:");
    println!(
        "\n| variant | 1 thread: ns/request | over bare (ns) | ratio to bare \
         | 2 threads: ns/request | ratio to bare \
         | 4 threads: ns/request | ratio to bare \
         | clone per request: ns/request | ratio to bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let median = |mode: Mode, variant: &str| {
        samples.median_ns(&format!("{prefix}{}/{variant}", mode.group()))
    };
    let show =
        |value: Option<f64>, format: &dyn Fn(f64) -> String| value.map_or("-".to_owned(), format);
    for variant in VARIANTS {
        let mut row = format!("| {variant} |");
        for mode in COLUMNS {
            let value = median(mode, variant);
            let bare = median(mode, "bare");
            row += &format!(" {} |", show(value, &|ns| format!("{ns:.1}")));
            if let Mode::Single = mode {
                let over = value.zip(bare).map(|(value, bare)| value - bare);
                row += &format!(" {} |", show(over, &|ns| format!("{ns:+.1}")));
            }
            let ratio = value.zip(bare).map(|(value, bare)| value / bare);
            row += &format!(" {} |", show(ratio, &|ratio| format!("{ratio:.2}x")));
        }
        println!("{row}");
    }
    if let (Some(rmw), Some(load)) = (
        samples.median_ns("calibration/fetch_add"),
        samples.median_ns("calibration/load"),
    ) {
        println!(
            "\none uncontended atomic fetch_add: {rmw:.1} ns; one atomic load: {load:.1} ns \
             (loop included)"
        );
    }
    for mode in COLUMNS {
        if let (Some(layer), Some(floor)) =
            (median(mode, "rotating/no_rotation"), median(mode, "floor"))
        {
            let guarded = median(mode, "guarded").map_or(String::new(), |guarded| {
                format!(
                    "; guarded is {:+.1} ns from the floor, and rotating/no_rotation {:+.1} ns \
                     from guarded",
                    guarded - floor,
                    layer - guarded
                )
            });
            println!(
                "\n{}: rotating/no_rotation is {:+.1} ns from the floor{guarded}",
                mode.group(),
                layer - floor
            );
        }
    }
    let bare_single = median(Mode::Single, "bare");
    if let (Some(single), Some(two)) = (bare_single, median(Mode::Threads(2), "bare")) {
        println!(
            "\nspeed-up of bare on two threads: {:.2} (2.00: the threads ran fully in parallel; \
             near 1: they mostly took turns, and the two-thread figures show little contention)",
            single / two
        );
    }
    if let (Some(single), Some(four)) = (bare_single, median(Mode::Threads(4), "bare")) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "\nspeed-up of bare on four threads: {:.2} (at most the number of cores, {cores})",
            single / four
        );
        if cores < 4 {
            println!(
                "four threads on {cores} cores are oversubscribed: they take turns on the \
                 cores, and a thread preempted inside a critical section (a lock) holds up \
                 the others"
            );
        }
    }
}

/// `HOT_PATH_COUNT=<group>/<variant>=<n>`: run only that variant's loop, `n`
/// requests (per thread), after its warm-up, and print nothing. For
/// instruction counts: under `valgrind --tool=callgrind`, the difference
/// between two values of `n`, over their difference, is the variant's
/// instructions per request (setup and warm-up cancel out).
fn count_only() -> Option<(String, String, u64)> {
    let spec = std::env::var("HOT_PATH_COUNT").ok()?;
    let (path, n) = spec.rsplit_once('=')?;
    let (group, variant) = path.split_once('/')?;
    Some((group.to_owned(), variant.to_owned(), n.parse().ok()?))
}

/// Every column's group, in table order.
fn bench_columns(criterion: &mut Criterion, samples: &Samples) {
    bench_group(criterion, samples, Mode::Single, Trivial);
    bench_group(criterion, samples, Mode::Threads(2), Trivial);
    bench_group(criterion, samples, Mode::Threads(4), Trivial);
    bench_group(
        criterion,
        samples,
        Mode::ClonePerRequest,
        SharedTrivial::default(),
    );
}

fn main() {
    if count_only().is_some() {
        bench_columns(&mut Criterion::default(), &Samples::default());
        return;
    }
    // Shorter than criterion's defaults (3 s + 5 s per benchmark), and no
    // HTML plots (they added over a minute), so that the 41 benchmarks take
    // about 3 minutes; arguments still override the times.
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
        .configure_from_args();
    let samples = Samples::default();
    bench_calibration(&mut criterion, &samples);
    bench_columns(&mut criterion, &samples);
    criterion.final_summary();
    print_table(
        &samples,
        "",
        "medians of criterion's samples (each benchmark in turn)",
    );
    print_table(
        &samples,
        "interleaved/",
        "medians of the interleaved pass (every variant in turn, 31 rounds): the reference",
    );
}
