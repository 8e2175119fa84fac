//! [`RotatingClient`]: the service that routes each request to the current
//! generation and leases that generation to the response.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tower_service::Service;

use crate::error::RotateError;
use crate::future::ResponseFuture;
use crate::generation::Renewal;
use crate::lease::Lease;
use crate::response::ClientResponse;
use crate::rotator::Rotator;
use crate::shard::Shard;
use crate::stats::{GenerationId, Stats};
use crate::sync;

/// A client service that is rebuilt on a TTL without cutting in-flight
/// responses. Made by [`RotatingClientLayer`](crate::RotatingClientLayer).
///
/// Handles are cheap to clone and all clones share one set of generations.
/// A clone starts with nothing reserved and no client of its own. See the
/// [crate docs](crate) for the lifecycle.
///
/// `RotatingClient<S>` is `Send + Sync` whenever `S: Send`: the inner
/// client need not be `Sync` (tower's `BoxCloneService` is not).
///
/// # What a handle holds
///
/// - *Stored and cloned only* (like axum `State`): nothing but a reference
///   to the shared state. It pins no generation.
/// - *Between a Ready `poll_ready` and `call`*: a reservation of the
///   generation its client came from, which keeps that generation alive,
///   as tower's `Service` contract requires. Dropping the handle releases
///   it.
/// - *After `call`*: a clone of the client it used, reused for the next
///   request while that generation is current, and (from its second
///   request on) a `Weak` reference to its thread's shard of the
///   generation. Neither pins the generation, which retires and is handed
///   to the retire hook as usual; but the clone itself, and whatever it
///   shares with the other clones (a pool, a connection task), lives until
///   the handle is next polled or dropped. A long-lived worker handle can
///   therefore keep a retired client's connections open after the
///   generation has retired; drop or re-poll it, or use a fresh clone per
///   request (as `ServiceExt::oneshot` on a clone does).
///
/// # Cost per request
///
/// Leases are spread over *shards*, one per lane, and each thread uses the
/// lane `thread number mod lanes` (four lanes per available core, rounded
/// up to a power of two). A long-lived handle whose generation is current,
/// used on the thread it last used, pays two atomic read-modify-writes,
/// both on its thread's shard: one to take the lease in `poll_ready` (a
/// `Weak` upgrade) and one to release it when the body ends. Besides that:
/// one atomic load (which generation is current), one thread-local read
/// (in `call`, which thread counts the request) and a plain store to count
/// it. Nothing on this path writes a cache line that another thread
/// writes, allocates, reads a clock or reads the shared configuration
/// (whether responses need a look, for the failure trigger or the
/// generation extension, is kept in each shard and tested once per
/// response).
///
/// A handle on a generation it has not used before (every fresh clone, and
/// every handle after a rotation), on its second request, or after a
/// request on another thread (which `call` notices, and which still used
/// the old thread's shard), takes the lease under its lane's lock instead,
/// and clones the client kept in the lane. The lane also keeps one clone of
/// the current client per lane in use, dropped at the next swap. The first
/// request in a lane after a swap allocates that lane's shard (256 bytes).
/// The lanes themselves take 128 bytes each, per rotating client: 1 KiB on
/// 2 cores, 32 KiB on 64 (at most 1,024 lanes).
///
/// With `max_requests_per_generation` set, every request is also counted
/// on the generation itself (one more read-modify-write, on a line shared
/// by all threads), which keeps the cap exact.
///
/// # Panics
///
/// `call` panics unless the last `poll_ready` returned Ready. `poll_ready`
/// and `rotate` panic outside a Tokio runtime if the rotation timer has not
/// started yet (it starts at construction when a runtime is present).
pub struct RotatingClient<S: 'static> {
    rotator: Arc<Rotator<S>>,
    cached: Option<Cached<S>>,
    reserved: Option<sync::Arc<Shard>>,
}

/// A handle's own clone of one generation's client.
struct Cached<S: 'static> {
    generation: u64,
    /// Only ever used through `get_mut` (no locking): the `Mutex` is what
    /// makes a handle `Sync` when `S` is only `Send`.
    client: Mutex<S>,
    /// The shard of this thread's lane, once the handle has used it twice:
    /// the next `poll_ready` leases it by upgrading this `Weak`, while the
    /// generation is current. `call` drops it when the request was counted
    /// on another thread than `thread`. A `Weak` keeps neither the shard's
    /// hold nor the client.
    shard: Option<sync::Weak<Shard>>,
    /// The thread whose lane `shard` is in, or would be in
    /// (`sync::thread_index`).
    thread: usize,
}

impl<S> Cached<S> {
    /// A handle's clone `client` of generation `generation`, taken in the
    /// lane of thread `thread`; no `Weak` yet.
    #[inline(always)]
    fn new(generation: u64, client: S, thread: usize) -> Self {
        Cached {
            generation,
            client: Mutex::new(client),
            shard: None,
            thread,
        }
    }

    #[inline]
    fn client(&mut self) -> &mut S {
        self.client
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<S> RotatingClient<S>
where
    S: Send + 'static,
{
    /// Builds a fresh generation now and makes it current.
    ///
    /// Resolves once the new generation is current: every `poll_ready`
    /// that starts after this returns uses it. A handle that was already
    /// Ready keeps the generation it reserved for its one `call`. The old
    /// generation drains and retires as usual, and the new one gets a full
    /// (jittered) TTL.
    ///
    /// Use it for credential or TLS reloads, DNS change notices and SIGHUP.
    /// It always builds, even if a timed rotation just happened, since that
    /// build may predate what you want to pick up. Concurrent calls (and
    /// the timed rotation) are serialised, and each makes its own
    /// generation.
    ///
    /// Returns the id of the new generation, or why the build failed
    /// (`build_timeout` applies to async factories). On failure the current
    /// generation keeps serving and the failure is counted in
    /// [`Stats::failed_builds`]; a failed `rotate()` is not retried.
    ///
    /// Under `max_live_generations`, this waits for room like a timed
    /// rotation does, which may take as long as the longest open response;
    /// wrap it in `tokio::time::timeout` if that matters.
    ///
    /// Dropping the future leaves everything as it was: an async build is
    /// cancelled; a sync one, running on Tokio's blocking pool, ends there
    /// and its client is dropped.
    pub async fn rotate(&self) -> Result<GenerationId, RotateError> {
        self.rotator.rotate().await
    }
}

impl<S: 'static> RotatingClient<S> {
    /// The first handle on freshly built shared state.
    pub(crate) fn new(rotator: Arc<Rotator<S>>) -> Self {
        RotatingClient {
            rotator,
            cached: None,
            reserved: None,
        }
    }

    /// A snapshot of the generations and counters. See [`Stats`].
    pub fn stats(&self) -> Stats {
        self.rotator.stats()
    }
}

impl<S: 'static> Clone for RotatingClient<S> {
    /// A new handle on the same generations, with nothing reserved.
    fn clone(&self) -> Self {
        RotatingClient {
            rotator: Arc::clone(&self.rotator),
            cached: None,
            reserved: None,
        }
    }
}

impl<S: 'static> fmt::Debug for RotatingClient<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatingClient")
            .field(
                "current_generation",
                &self.rotator.generations().current_id(),
            )
            .field(
                "cached_generation",
                &self.cached.as_ref().map(|c| c.generation),
            )
            .field(
                "reserved_generation",
                &self.reserved.as_ref().map(|shard| shard.generation_id()),
            )
            .field("config", &self.rotator.core().config)
            .finish()
    }
}

impl<S, Req> Service<Req> for RotatingClient<S>
where
    S: Service<Req> + Clone + Send + 'static,
    S::Response: ClientResponse,
    S::Error: 'static,
{
    type Response = <S::Response as ClientResponse>::Leased;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    // `poll_ready`, `call` and the paths below are always inlined: in the
    // caller's frame the reservation and the response's future are built
    // where they are used, not copied out of return slots.
    #[inline(always)]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.reserved.is_some() {
            // Ready already: stay on the reserved generation until `call`.
            return self.poll_cached(cx, None);
        }
        let Some(cached) = &mut self.cached else {
            return self.poll_fresh(cx);
        };
        // Fast path: our client is from the current generation and we know
        // our thread's shard. One atomic load and one reference count on
        // this thread's line; `call` checks the thread.
        if cached.generation == self.rotator.generations().current_id() {
            if let Some(lease) = cached.shard.as_ref().and_then(sync::Weak::upgrade) {
                return match cached.client().poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.reserved = Some(lease);
                        Poll::Ready(Ok(()))
                    }
                    not_ready => self.not_ready(not_ready),
                };
            }
        }
        self.poll_lane(cx)
    }

    // The reservation and the cached client are tested one after the
    // other, not as a pair: matching a tuple of both builds the tuple on
    // the stack (measured: 5 instructions per request on one thread, 7 per
    // fresh clone).
    #[inline(always)]
    fn call(&mut self, req: Req) -> Self::Future {
        let Some(lease) = self.reserved.take() else {
            panic!("RotatingClient::call was called before poll_ready returned Ready; call poll_ready (or ServiceExt::ready) first");
        };
        let Some(cached) = self.cached.as_mut() else {
            unreachable!("a reservation always has a cached client")
        };
        if lease.count_request() != cached.thread {
            // The handle has moved to another thread: this request used
            // the old thread's shard, the next one takes a lease in this
            // thread's lane.
            cached.shard = None;
        }
        ResponseFuture::new(cached.client().call(req), Lease::new(lease))
    }
}

impl<S> RotatingClient<S>
where
    S: Clone + Send + 'static,
{
    /// `poll_ready` of a handle with no client yet (every fresh clone):
    /// takes the lease and a clone of the client in this thread's lane,
    /// under its lock. Inlined: it is the hot path of a fresh clone per
    /// request.
    #[inline(always)]
    fn poll_fresh<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<Req>,
    {
        self.rotator.ensure_driver();
        let thread = sync::thread_index();
        let generations = self.rotator.generations();
        // `None` would mean the lane's generation had lost its client to
        // `drain_timeout`. That takes the client only from a detached
        // generation, which a swap has already taken out of every lane, so
        // the retry finds the newer one.
        let fresh = loop {
            if let Some(fresh) = generations.take_fresh(thread) {
                break fresh;
            }
        };
        self.cached = Some(Cached::new(fresh.id, fresh.client, thread));
        self.poll_cached(cx, Some(fresh.lease))
    }

    /// The slow path of `poll_ready` for a handle with a client: a new
    /// generation, its second request, or its first after a request on
    /// another thread. Takes the lease in this thread's lane, under its
    /// lock.
    #[inline(never)]
    fn poll_lane<Req>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>>
    where
        S: Service<Req>,
    {
        self.rotator.ensure_driver();
        let thread = sync::thread_index();
        let generations = self.rotator.generations();
        loop {
            let have = self.cached.as_ref().map(|cached| cached.generation);
            // `None`: as in `poll_fresh`.
            let Some(taken) = generations.take_lease(thread, have) else {
                continue;
            };
            match taken.renewal {
                Renewal::Weak(shard) => {
                    if let Some(cached) = &mut self.cached {
                        cached.shard = Some(shard);
                        cached.thread = thread;
                    }
                }
                Renewal::Client(client) => {
                    self.cached = Some(Cached::new(taken.id, client, thread));
                }
            }
            return self.poll_cached(cx, Some(taken.lease));
        }
    }
}

impl<S: 'static> RotatingClient<S> {
    /// Polls the cached client. On Ready, reserves `current` (or keeps the
    /// existing reservation when `current` is `None`); otherwise lets go.
    #[inline(always)]
    fn poll_cached<Req>(
        &mut self,
        cx: &mut Context<'_>,
        current: Option<sync::Arc<Shard>>,
    ) -> Poll<Result<(), S::Error>>
    where
        S: Service<Req>,
    {
        let Some(cached) = self.cached.as_mut() else {
            unreachable!("a reservation always has a cached client")
        };
        match cached.client().poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                if current.is_some() {
                    self.reserved = current;
                }
                Poll::Ready(Ok(()))
            }
            not_ready => {
                drop(current);
                self.not_ready(not_ready)
            }
        }
    }

    /// The cached client was not ready: a handle waiting for readiness
    /// reserves nothing, and a failed client is not reused (the next poll
    /// takes a fresh clone).
    #[cold]
    #[inline(never)]
    fn not_ready<E>(&mut self, poll: Poll<Result<(), E>>) -> Poll<Result<(), E>> {
        self.reserved = None;
        if let Poll::Ready(Err(_)) = &poll {
            self.cached = None;
        }
        poll
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body::Body;
    use http_body_util::Full;
    use tower_service::Service;

    use super::RotatingClient;
    use crate::config::{Config, OnRetire};
    use crate::factory::Factory;
    use crate::rotator::Rotator;
    use crate::sync::thread_index;

    fn assert_send_sync<T: Send + Sync>() {}

    type Answer = http::Response<Full<Bytes>>;

    /// A client that answers at once with a one-chunk body.
    #[derive(Clone)]
    struct Trivial;

    impl Service<http::Request<()>> for Trivial {
        type Response = Answer;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Answer, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Full::new(Bytes::from_static(b"x")))))
        }
    }

    /// One request, answered and read to its end at once.
    fn request(handle: &mut RotatingClient<Trivial>) {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(handle.poll_ready(&mut cx).is_ready(), "the client is ready");
        let future = pin!(handle.call(http::Request::new(())));
        let Poll::Ready(Ok(response)) = future.poll(&mut cx) else {
            panic!("the client answers at once");
        };
        let mut body = pin!(response.into_body());
        while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(&mut cx) {
            assert!(frame.is_ok(), "an infallible body");
        }
    }

    /// Where the handle's next lease comes from: the thread its shard's
    /// lane is for, if it keeps a `Weak` to one.
    fn weak_lane(handle: &RotatingClient<Trivial>) -> Option<usize> {
        handle
            .cached
            .as_ref()
            .filter(|cached| cached.shard.is_some())
            .map(|cached| cached.thread)
    }

    #[test]
    fn a_handle_that_moved_to_another_thread_takes_its_next_leases_in_its_new_lane() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let _entered = rt.enter();
        let factory = Factory::from_sync(|| Ok::<_, Infallible>(Trivial));
        let hook = std::sync::Arc::new(()) as std::sync::Arc<dyn OnRetire<Trivial>>;
        let config = Config::new(Duration::from_secs(3600));
        let mut handle = RotatingClient::new(Rotator::new(config, hook, factory, Trivial));
        request(&mut handle);
        request(&mut handle);
        let home = thread_index();
        assert_eq!(
            weak_lane(&handle),
            Some(home),
            "the second request took the Weak"
        );
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let here = thread_index();
                assert_ne!(here, home);
                request(&mut handle);
                assert_eq!(
                    weak_lane(&handle),
                    None,
                    "the request on the old thread's shard lets go of its Weak"
                );
                request(&mut handle);
                assert_eq!(
                    weak_lane(&handle),
                    Some(here),
                    "the lease in this thread's lane"
                );
                request(&mut handle);
                assert_eq!(
                    weak_lane(&handle),
                    Some(here),
                    "and the fast path stays there"
                );
            });
        });
        let stats = handle.stats();
        assert_eq!(
            stats.generations[0].requests, 5,
            "every request counted once"
        );
    }

    #[test]
    fn a_handle_is_send_and_sync_over_a_client_that_is_only_send() {
        type Boxed =
            tower::util::BoxCloneService<http::Request<()>, http::Response<String>, std::io::Error>;
        assert_send_sync::<RotatingClient<Boxed>>();
    }
}
