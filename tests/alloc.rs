//! The layer adds no heap allocation per request, on a long-lived handle
//! or on a fresh clone of a stored one per request.
//!
//! Its own test binary, because it installs a counting global allocator.
//! Allocations are counted per thread, so the test harness and other tests
//! running in parallel do not disturb the count.

mod test_utils;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::convert::Infallible;
use std::future::Ready;
use std::task::{Context, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower::{Layer, Service};
use tower_rotating_client::{ResponseBody, ResponseFuture, RotatingClientLayer};

use test_utils::{one_request, SharedTrivial, Trivial, TRIVIAL_BODY};

/// Counts the allocations (and reallocations) of the current thread.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with`: the allocator may run while thread-locals are torn down.
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

// SAFETY: every method forwards to `System` unchanged; counting touches only
// a const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Allocations made by `requests` calls of `one` (one request each,
/// returning the body bytes it read), after 100 warm-up calls (which take a
/// handle's client clone and `Weak`, make its lane's shard, and set up
/// arc-swap's per-thread state).
fn count(requests: usize, mut one: impl FnMut(&mut Context<'_>) -> usize) -> u64 {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        one(&mut cx);
    }
    let before = allocations();
    let mut bytes = 0;
    for _ in 0..requests {
        bytes += one(&mut cx);
    }
    let allocated = allocations() - before;
    assert_eq!(
        bytes,
        requests * TRIVIAL_BODY.len(),
        "every request read the whole body"
    );
    allocated
}

/// Allocations made by `requests` requests through `service`.
fn count_allocations<S, B>(service: &mut S, requests: usize) -> u64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    count(requests, |cx| one_request(service, cx))
}

/// Allocations made by `requests` requests, each on a fresh clone of
/// `stored` dropped after its request (axum's `State`, `oneshot`).
fn count_fresh_allocations<S, B>(stored: &S, requests: usize) -> u64
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    count(requests, |cx| one_request(&mut stored.clone(), cx))
}

const REQUESTS: usize = 10_000;

#[test]
fn the_layer_adds_no_allocation_per_request() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let _entered = runtime.enter();

    let before = allocations();
    let probe = std::hint::black_box(Box::new(7u8));
    assert_eq!(allocations(), before + 1, "the counter counts");
    drop(probe);

    let bare = count_allocations(&mut Trivial, REQUESTS);
    assert_eq!(bare, 0, "the trivial client itself allocates nothing");

    let client = RotatingClientLayer::new(Duration::from_secs(3600)).layer(|| Trivial);
    let layered = count_allocations(&mut client.clone(), REQUESTS);
    println!("allocations over {REQUESTS} requests: bare {bare}, RotatingClient {layered}");
    assert_eq!(
        layered, bare,
        "RotatingClient allocates nothing per request without rotation"
    );
    assert_eq!(
        client.stats().generations[0].requests,
        REQUESTS as u64 + 100,
        "every request went through the layer"
    );
}

#[test]
fn a_fresh_handle_per_request_adds_no_allocation() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
    let _entered = runtime.enter();

    let shared = SharedTrivial::default();
    let bare = count_fresh_allocations(&shared, REQUESTS);
    assert_eq!(
        bare, 0,
        "a SharedTrivial cloned per request (one Arc increment) allocates nothing"
    );

    let client = RotatingClientLayer::new(Duration::from_secs(3600)).layer(move || shared.clone());
    let layered = count_fresh_allocations(&client, REQUESTS);
    println!(
        "allocations over {REQUESTS} requests, each on a fresh clone: \
         bare {bare}, RotatingClient {layered}"
    );
    assert_eq!(
        layered, bare,
        "a fresh RotatingClient handle per request allocates nothing without rotation"
    );
    let stats = client.stats();
    assert_eq!(stats.rotations, 0, "no rotation during the count");
    assert_eq!(
        stats.generations[0].requests,
        REQUESTS as u64 + 100,
        "every request went through the layer"
    );
}

#[test]
fn the_response_wrappers_stay_small() {
    type Inner = Full<Bytes>;
    type InnerFuture = Ready<Result<Response<Inner>, Infallible>>;
    let body = size_of::<ResponseBody<Inner>>() - size_of::<Inner>();
    let future = size_of::<ResponseFuture<InnerFuture>>() - size_of::<InnerFuture>();
    println!("size_of::<ResponseBody<B>>() - size_of::<B>() = {body} bytes (B = Full<Bytes>)");
    println!("size_of::<ResponseFuture<F>>() - size_of::<F>() = {future} bytes (F = Ready<..>)");
    // The lease: one thin pointer to a shard, whose `None` is the null
    // niche.
    assert!(body <= 8, "ResponseBody adds {body} bytes, more than 8");
    // The lease alone: whether the outcome hooks run is read from its
    // shard.
    assert!(
        future <= 8,
        "ResponseFuture adds {future} bytes, more than 8"
    );
}
