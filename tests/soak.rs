//! Soak: a simulated day of long streams through a rotating client.
//!
//! 24 hours of paused tokio time: a TTL of one hour with the default
//! jitter, `max_live_generations(4)`, and 100,000 streams arriving in waves
//! (one wave a minute for 21 hours, so that the longest stream ends within
//! the day), each lasting a random time up to three TTLs. Streams that
//! long keep up to three generations draining next to the current one, so
//! the cap is reached and postpones rotations: the test checks that it
//! does, and that it holds.
//!
//! The in-memory client is built to expose a cut: the retire hook marks its
//! client's generation dead, and every stream body checks, on every chunk,
//! that the generation it was served by is not dead, and fails if it is. A
//! generation retired while one of its responses was still streaming would
//! therefore show up as a failed stream.
//!
//! Run with `-- --nocapture` to see the figures.

mod test_utils;

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant, Sleep};
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{GenerationStats, RotatingClient, RotatingClientLayer};

use test_utils::XorShift;

const TTL: Duration = Duration::from_secs(60 * 60);
const MAX_LIVE: u64 = 4;
const STREAMS: u64 = 100_000;
const WAVE: Duration = Duration::from_secs(60);
/// The longest stream, in TTLs.
const LONGEST: u32 = 3;
/// Arrivals stop `LONGEST` TTLs (the longest stream) before the day ends.
const WAVES: u64 = (24 - LONGEST as u64) * 60;
/// Streams open at once, at most.
const MAX_CONCURRENT: usize = 10_000;
const SEED: u64 = 0x5EED_2024;

/// What the test knows about the generations, from the factory and the
/// retire hook.
#[derive(Default)]
struct World {
    /// Ids of the clients whose generation retired.
    dead: Mutex<HashSet<u64>>,
    built: AtomicU64,
    retired: AtomicU64,
    /// Live generations right after each swap, at most.
    max_live: AtomicU64,
    retirements: Mutex<Vec<GenerationStats>>,
}

impl World {
    fn is_dead(&self, client: u64) -> bool {
        self.dead.lock().expect("not poisoned").contains(&client)
    }
}

/// The client one generation holds; its id is the build number, so it
/// equals the generation id (no build fails here).
#[derive(Clone)]
struct SoakClient {
    id: u64,
    world: Arc<World>,
}

/// A stream of `chunks` one-byte chunks, `interval` apart.
struct Plan {
    chunks: u32,
    interval: Duration,
}

impl Service<Request<Plan>> for SoakClient {
    type Response = Response<SoakBody>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<SoakBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Plan>) -> Self::Future {
        let plan = request.into_body();
        std::future::ready(Ok(Response::new(SoakBody {
            client: self.id,
            world: Arc::clone(&self.world),
            left: plan.chunks,
            interval: plan.interval,
            sleep: Box::pin(sleep(plan.interval)),
        })))
    }
}

/// Fails with [`Cut`] if the client that served it retired mid-stream.
struct SoakBody {
    client: u64,
    world: Arc<World>,
    left: u32,
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
}

#[derive(Debug)]
struct Cut {
    client: u64,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client {} retired mid-stream", self.client)
    }
}

impl std::error::Error for Cut {}

impl Body for SoakBody {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        ready!(self.sleep.as_mut().poll(cx));
        if self.world.is_dead(self.client) {
            self.left = 0;
            return Poll::Ready(Some(Err(Cut {
                client: self.client,
            })));
        }
        self.left -= 1;
        let next = Instant::now() + self.interval;
        self.sleep.as_mut().reset(next);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// Waits `start_in`, then reads one whole stream. Returns the chunks read.
async fn stream(
    client: RotatingClient<SoakClient>,
    plan: Plan,
    start_in: Duration,
    _permit: OwnedSemaphorePermit,
) -> Result<u32, Cut> {
    sleep(start_in).await;
    let expected = plan.chunks;
    let response = client
        .oneshot(Request::new(plan))
        .await
        .expect("infallible");
    let mut body = response.into_body();
    let mut chunks = 0;
    while let Some(frame) = body.frame().await {
        frame?;
        chunks += 1;
    }
    assert_eq!(chunks, expected, "a stream ends only when it is done");
    Ok(chunks)
}

#[derive(Debug, Default)]
struct Tally {
    streams: u64,
    chunks: u64,
    cut: u64,
    first_cut: Option<String>,
}

impl Tally {
    fn add(&mut self, joined: Result<Result<u32, Cut>, tokio::task::JoinError>) {
        self.streams += 1;
        match joined.expect("no stream panics") {
            Ok(chunks) => self.chunks += u64::from(chunks),
            Err(cut) => {
                self.first_cut.get_or_insert_with(|| cut.to_string());
                self.cut += 1;
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_simulated_day_of_streams_cuts_none() {
    let wall = std::time::Instant::now();
    let day_started = Instant::now();
    let world = Arc::new(World::default());
    let factory = {
        let world = Arc::clone(&world);
        move || {
            let id = world.built.fetch_add(1, Ordering::SeqCst) + 1;
            // A sync factory is called at the swap: this is the live count
            // right after it.
            let live = id - world.retired.load(Ordering::SeqCst);
            world.max_live.fetch_max(live, Ordering::SeqCst);
            SoakClient {
                id,
                world: Arc::clone(&world),
            }
        }
    };
    let hook = {
        let world = Arc::clone(&world);
        move |client: SoakClient, generation: GenerationStats| {
            world.dead.lock().expect("not poisoned").insert(client.id);
            world.retired.fetch_add(1, Ordering::SeqCst);
            world
                .retirements
                .lock()
                .expect("not poisoned")
                .push(generation);
        }
    };
    let client = RotatingClientLayer::new(TTL)
        .max_live_generations(MAX_LIVE as usize)
        .on_retire(hook)
        .layer(factory);

    let mut rng = XorShift::new(SEED);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let mut streams = JoinSet::new();
    let mut tally = Tally::default();
    let mut max_open = 0;
    let mut max_live_seen = 0;
    let mut samples_past_ttl = 0;
    for wave in 0..WAVES {
        let wave_started = Instant::now();
        // Spreads exactly `STREAMS` over the waves.
        let arrivals = STREAMS * (wave + 1) / WAVES - STREAMS * wave / WAVES;
        for _ in 0..arrivals {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .expect("never closed");
            // Whole seconds, so that many timers fire together.
            let start_in = Duration::from_secs(rng.below(WAVE.as_secs()));
            let length = 1 + rng.below(u64::from(LONGEST) * TTL.as_secs());
            let chunks = 1 + rng.below(8.min(length)) as u32;
            let plan = Plan {
                chunks,
                interval: Duration::from_secs(length / u64::from(chunks)),
            };
            streams.spawn(stream(client.clone(), plan, start_in, permit));
        }
        while let Some(joined) = streams.try_join_next() {
            tally.add(joined);
        }
        max_open = max_open.max(streams.len());
        let sample = client.stats();
        max_live_seen = max_live_seen.max(sample.live_generations());
        if sample.current_age() > TTL {
            samples_past_ttl += 1;
        }
        sleep_until(wave_started + WAVE).await;
    }
    while let Some(joined) = streams.join_next().await {
        tally.add(joined);
    }
    let simulated = day_started.elapsed();

    let stats = client.stats();
    let built = world.built.load(Ordering::SeqCst);
    let retired = world.retired.load(Ordering::SeqCst);
    let max_live = world.max_live.load(Ordering::SeqCst);
    let retirements = world.retirements.lock().expect("not poisoned").clone();
    // A generation is never current past the TTL unless the cap postponed
    // its rotation (jitter only shortens lifetimes; time is paused, so the
    // driver is never late). This counts postponements that outlasted the
    // jitter's cut: a lower bound on how often the cap postponed.
    let postponed: Vec<Duration> = retirements
        .iter()
        .map(|generation| generation.age - generation.draining_for.unwrap_or_default())
        .filter(|current_for| *current_for > TTL)
        .map(|current_for| current_for - TTL)
        .collect();
    println!(
        "soak: {} streams ({} chunks) over {:.1} simulated hours, {} cut; \
         {} generations built, {} rotations, {} retired before the last handle \
         dropped; at most {} live (cap {}; {} seen by stats once a minute); \
         the cap kept {} of {} generations current past the TTL, by {:.0?} in \
         all (longest {:.0?}); {} samples saw the current generation past the \
         TTL; at most {} streams open; {} live at the end; {:.1?} wall time",
        tally.streams,
        tally.chunks,
        simulated.as_secs_f64() / 3600.0,
        tally.cut,
        built,
        stats.rotations,
        retired,
        max_live,
        MAX_LIVE,
        max_live_seen,
        postponed.len(),
        retirements.len(),
        postponed.iter().sum::<Duration>(),
        postponed.iter().max().copied().unwrap_or_default(),
        samples_past_ttl,
        max_open,
        stats.live_generations(),
        wall.elapsed(),
    );

    assert_eq!(tally.streams, STREAMS);
    assert_eq!(tally.cut, 0, "no stream cut; first: {:?}", tally.first_cut);
    assert!(
        simulated <= Duration::from_secs(24 * 60 * 60),
        "{simulated:?}"
    );
    // Streams of up to three TTLs keep up to three generations draining
    // when one is due: a fourth would exceed the cap without it.
    assert!(max_live <= MAX_LIVE, "the cap holds: {max_live}");
    assert_eq!(max_live, MAX_LIVE, "the load reaches the cap");
    assert!(max_live_seen as u64 <= max_live);
    assert!(
        !postponed.is_empty(),
        "the cap postponed a rotation at least once: {retirements:#?}"
    );
    // Lifetimes of at least 0.9 TTL: at most 26 rotations in 24 h, fewer
    // when the cap postpones.
    assert!(stats.rotations <= 26, "{stats:?}");
    assert_eq!(built, stats.rotations + 1);
    assert_eq!(retired, built - 1, "all but the current one retired");
    assert_eq!(stats.live_generations(), 1, "{stats:?}");
    assert_eq!(stats.in_flight(), 0, "{stats:?}");

    for generation in &retirements {
        let current_for = generation.age - generation.draining_for.unwrap_or_default();
        assert!(
            current_for >= TTL.mul_f64(0.9),
            "current for at least the shortest jittered TTL: {generation:?}"
        );
        assert_eq!(generation.in_flight, 0, "{generation:?}");
        assert!(
            generation.draining_for.unwrap_or_default() <= LONGEST * TTL,
            "drained when its longest stream ended: {generation:?}"
        );
    }

    drop(client);
    assert_eq!(
        world.retired.load(Ordering::SeqCst),
        built,
        "every generation retired once"
    );
    assert_eq!(world.dead.lock().expect("not poisoned").len() as u64, built);
}
