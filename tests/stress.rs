//! The lease and counting protocol under real thread interleaving: more OS
//! threads than lanes, each sending requests through a long-lived handle,
//! through fresh clones and through handles that wander from thread to
//! thread, holding some response futures and bodies across requests, while
//! rotations race every few hundred requests.
//!
//! A binary of its own: it keeps the machine's cores busy for about a
//! second, which would slow the paused-clock tests beside it, and they
//! would blur its interleaving.
//!
//! Seen failing against: every thread counting a shard's requests with
//! the owner's plain load and store (`if self.owner.is_some()` in
//! `Shard::count_request`), which loses requests when two threads of one
//! lane count at the same moment: "generation 378 retired with requests =
//! 326 but its client served 330". That takes two cores at once: on a
//! 2-core machine shared with other builds (load average 5.5) it failed 19
//! runs in 20; the lost requests come from the turns in which only the
//! threads of one lane send.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use tower::{Layer, Service};
use tower_rotating_client::{GenerationStats, ResponseBody, RotatingClient, RotatingClientLayer};

/// Requests over all threads.
const TOTAL: usize = 640_000;
/// Rounds of turns in which only the threads of one lane send.
const PAIR_ROUNDS: usize = 12;
/// A rotation after every this many requests, counted over all threads.
const ROTATE_EVERY: usize = 300;

/// What the test knows about one built client: what it served, which of
/// its responses are still open, and how many copies of it are alive.
#[derive(Debug)]
struct Ledger {
    build: usize,
    served: AtomicU64,
    /// Responses whose body has not yet yielded its last frame (or been
    /// dropped). The inner body closes its entry before the layer's body
    /// sees the last frame, so a generation retired with a response open
    /// shows here.
    open: AtomicUsize,
    copies: AtomicUsize,
}

/// The inner client: answers at once with a one-frame body, and keeps its
/// [`Ledger`].
#[derive(Debug)]
struct LedgerClient(Arc<Ledger>);

impl LedgerClient {
    fn new(build: usize) -> (Self, Arc<Ledger>) {
        let ledger = Arc::new(Ledger {
            build,
            served: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            copies: AtomicUsize::new(1),
        });
        (LedgerClient(Arc::clone(&ledger)), ledger)
    }
}

impl Clone for LedgerClient {
    fn clone(&self) -> Self {
        self.0.copies.fetch_add(1, Ordering::SeqCst);
        LedgerClient(Arc::clone(&self.0))
    }
}

impl Drop for LedgerClient {
    fn drop(&mut self) {
        self.0.copies.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Service<Request<()>> for LedgerClient {
    type Response = Response<LedgerBody>;
    type Error = Infallible;
    type Future = Ready<Result<Response<LedgerBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: Request<()>) -> Self::Future {
        self.0.served.fetch_add(1, Ordering::SeqCst);
        self.0.open.fetch_add(1, Ordering::SeqCst);
        ready(Ok(Response::new(LedgerBody(Some(Arc::clone(&self.0))))))
    }
}

/// One data frame; closes its response's entry in the ledger as it yields
/// it, or when dropped before that.
#[derive(Debug)]
struct LedgerBody(Option<Arc<Ledger>>);

impl Body for LedgerBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|ledger| {
            ledger.open.fetch_sub(1, Ordering::SeqCst);
            Ok(Frame::data(Bytes::from_static(b"x")))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

impl Drop for LedgerBody {
    fn drop(&mut self) {
        if let Some(ledger) = self.0.take() {
            ledger.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What the retire hook saw: the generation's figures, and the ledger of
/// the client it was handed, read at that moment.
#[derive(Debug)]
struct Retired {
    stats: GenerationStats,
    build: usize,
    served: u64,
    open: usize,
}

type Client = RotatingClient<LedgerClient>;
type Leased = Response<ResponseBody<LedgerBody>>;
type Pending = <Client as Service<Request<()>>>::Future;

/// As many lanes as the crate makes: four per core, a power of two.
fn lanes() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    (cores * 4).next_power_of_two().min(1024)
}

fn poll_now<F: Future>(future: Pin<&mut F>) -> F::Output {
    match future.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the ledger client answers at once"),
    }
}

/// `poll_ready` (ready at once) and `call`.
fn call(handle: &mut Client) -> Pending {
    let ready = handle.poll_ready(&mut Context::from_waker(Waker::noop()));
    assert!(
        matches!(ready, Poll::Ready(Ok(()))),
        "the ledger client is always ready"
    );
    handle.call(Request::new(()))
}

fn response(mut future: Pending) -> Leased {
    poll_now(Pin::new(&mut future)).expect("infallible")
}

/// Reads the body to its end.
fn drain(response: Leased) {
    let mut body = response.into_body();
    let mut cx = Context::from_waker(Waker::noop());
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        frame.expect("infallible");
    }
    assert!(!body.holds_generation(), "released at the end");
}

/// One thread's requests, in a fixed mix of long-lived handle, fresh
/// clones, wandering handles, held futures and held bodies. Every
/// `ROTATE_EVERY`-th request overall (`sent`) is followed by a rotation.
struct Worker<'a> {
    client: &'a Client,
    rt: &'a tokio::runtime::Runtime,
    sent: &'a AtomicUsize,
    /// Handles any thread may take for a few requests and put back: each
    /// keeps the shard of the lane it last used, so its next request on
    /// another thread leases that lane's shard and counts there as a
    /// stranger, before the handle moves to its new thread's lane.
    wanderers: &'a Mutex<Vec<Client>>,
    handle: Client,
    held_futures: VecDeque<Pending>,
    held_bodies: VecDeque<Leased>,
    done: usize,
}

impl<'a> Worker<'a> {
    /// A worker whose thread has taken its lane: the first request is sent.
    fn new(
        client: &'a Client,
        rt: &'a tokio::runtime::Runtime,
        sent: &'a AtomicUsize,
        wanderers: &'a Mutex<Vec<Client>>,
    ) -> Self {
        let mut worker = Worker {
            client,
            rt,
            sent,
            wanderers,
            handle: client.clone(),
            held_futures: VecDeque::new(),
            held_bodies: VecDeque::new(),
            done: 0,
        };
        worker.run(1);
        worker
    }

    /// `requests` requests in the full mix.
    fn run(&mut self, requests: usize) {
        for _ in 0..requests {
            let i = self.done;
            self.done += 1;
            let future = if i % 3 == 0 {
                call(&mut self.client.clone())
            } else if i % 8 == 7 {
                self.call_wanderer()
            } else {
                call(&mut self.handle)
            };
            match i % 8 {
                // Held as a future for a few requests, then as a body.
                0 => {
                    self.held_futures.push_back(future);
                    if self.held_futures.len() > 4 {
                        let future = self.held_futures.pop_front().expect("five held");
                        self.held_bodies.push_back(response(future));
                    }
                }
                1 | 4 => {
                    self.held_bodies.push_back(response(future));
                    if self.held_bodies.len() > 6 {
                        drain(self.held_bodies.pop_front().expect("seven held"));
                    }
                }
                // Dropped before it answers.
                2 => drop(future),
                // Dropped with its body unread.
                5 => drop(response(future)),
                _ => drain(response(future)),
            }
            self.sent_one();
        }
    }

    /// One request on a wandering handle: the next one in the pool (which
    /// another thread used last, most of the time), put back at the end.
    fn call_wanderer(&mut self) -> Pending {
        let taken = self
            .wanderers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut handle = taken.unwrap_or_else(|| self.client.clone());
        let future = call(&mut handle);
        self.wanderers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(0, handle);
        future
    }

    /// `requests` requests on the long-lived handle, each read at once:
    /// as many requests a second as this thread can send.
    fn run_tight(&mut self, requests: usize) {
        for _ in 0..requests {
            drain(response(call(&mut self.handle)));
            self.sent_one();
        }
    }

    fn sent_one(&mut self) {
        if self.sent.fetch_add(1, Ordering::Relaxed) % ROTATE_EVERY == ROTATE_EVERY - 1 {
            self.rt
                .block_on(self.client.rotate())
                .expect("a sync build");
        }
    }

    /// Lets go of everything held.
    fn finish(self) {
        self.held_futures.into_iter().for_each(drop);
        self.held_bodies.into_iter().for_each(drain);
    }
}

#[test]
fn every_generation_retires_once_with_its_exact_count_under_real_threads() {
    let threads = (2 * lanes()).max(16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .expect("a runtime");
    let ledgers = Arc::new(Mutex::new(Vec::new()));
    let retired = Arc::new(Mutex::new(Vec::new()));
    let client: Client = {
        let _entered = rt.enter();
        let factory = {
            let ledgers = Arc::clone(&ledgers);
            move || {
                let mut ledgers = ledgers.lock().unwrap_or_else(PoisonError::into_inner);
                let (client, ledger) = LedgerClient::new(ledgers.len() + 1);
                ledgers.push(ledger);
                client
            }
        };
        let hook = {
            let retired = Arc::clone(&retired);
            move |client: LedgerClient, stats: GenerationStats| {
                let ledger = &client.0;
                let record = Retired {
                    stats,
                    build: ledger.build,
                    served: ledger.served.load(Ordering::SeqCst),
                    open: ledger.open.load(Ordering::SeqCst),
                };
                retired
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(record);
            }
        };
        RotatingClientLayer::new(Duration::from_secs(3600))
            .on_retire(hook)
            .layer(factory)
    };

    // Threads take their lanes in the order they first send, one after
    // the other, so that threads `t` and `t + lanes` share a lane. A
    // quarter of the requests run on all threads at once, in the full mix;
    // the rest in turns of the threads of one lane, all others waiting, so
    // that two threads counting on one shard run at the same moment
    // whenever the machine gives this test two cores.
    let lanes = lanes();
    let per_thread = TOTAL / threads;
    let sent = AtomicUsize::new(0);
    let wanderers = Mutex::new(Vec::new());
    let turns = Barrier::new(threads);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (started, start) = std::sync::mpsc::channel();
            let (client, rt, sent, turns, wanderers) = (&client, &rt, &sent, &turns, &wanderers);
            scope.spawn(move || {
                let mut worker = Worker::new(client, rt, sent, wanderers);
                started.send(()).expect("the spawning thread waits for it");
                turns.wait();
                worker.run(per_thread / 4);
                for turn in 0..PAIR_ROUNDS * lanes {
                    turns.wait();
                    if thread % lanes == turn % lanes {
                        worker.run_tight(per_thread * 3 / 4 / PAIR_ROUNDS);
                    }
                }
                worker.finish();
            });
            start.recv().expect("the thread sent its first request");
        }
    });
    let rotations = client.stats().rotations;
    let wandered = wanderers
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    drop(client);

    let ledgers = ledgers.lock().unwrap_or_else(PoisonError::into_inner);
    let retired = retired.lock().unwrap_or_else(PoisonError::into_inner);
    let sent = sent.into_inner();
    assert!(
        rotations as usize >= sent / ROTATE_EVERY,
        "{rotations} rotations for {sent} requests"
    );
    assert_eq!(
        retired.len(),
        ledgers.len(),
        "every generation reaches the hook, the current one when the last handle goes"
    );
    let mut ids: Vec<u64> = retired.iter().map(|record| record.stats.id.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), retired.len(), "no generation retires twice");
    for record in retired.iter() {
        let id = record.stats.id.0;
        assert_eq!(
            id as usize, record.build,
            "generation {id} handed the hook its own client"
        );
        assert_eq!(
            (record.open, record.stats.in_flight),
            (0, 0),
            "generation {id} retired with a response open"
        );
        assert_eq!(
            record.stats.requests, record.served,
            "generation {id} retired with requests = {} but its client served {}",
            record.stats.requests, record.served
        );
    }
    let served: u64 = ledgers
        .iter()
        .map(|ledger| ledger.served.load(Ordering::SeqCst))
        .sum();
    assert_eq!(served as usize, sent, "every request was served once");
    for ledger in ledgers.iter() {
        assert_eq!(
            ledger.copies.load(Ordering::SeqCst),
            0,
            "a copy of client {} is left",
            ledger.build
        );
    }
    assert!(wandered >= 2, "{wandered} handles wandered between threads");
    println!(
        "{threads} threads over {} lanes, {wandered} wandering handles: {sent} requests, \
         {rotations} rotations, {} generations retired once each with exact counts",
        lanes,
        retired.len()
    );
}
