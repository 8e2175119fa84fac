//! Act 1, the cautionary tale: long streams through a TTL cache that closes
//! the client it evicts, then through `RotatingClientLayer` with the same
//! TTL over the very same client type.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::{timeout, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_rotating_client::RotatingClientLayer;

use crate::loopback::{error_chain, BoxError, StreamServer, CHUNK};

/// Act 1's knobs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub concurrency: u64,
    pub ttl: Duration,
    pub chunks: u64,
    pub chunk_delay: Duration,
    pub duration: Duration,
}

impl Config {
    fn stream_time(&self) -> Duration {
        self.chunk_delay * (self.chunks.saturating_sub(1) as u32)
    }
}

/// The cautionary tale: what it showed, or why it showed nothing.
pub async fn run(config: Config) -> Result<String, String> {
    let server = StreamServer::start(config.chunks, config.chunk_delay)
        .await
        .map_err(|e| format!("cannot start the loopback server: {e}"))?;
    let addr = server.addr;
    eprintln!("Act 1: a client cache that closes the client it evicts");
    eprintln!(
        "{} concurrent streams of {} ms, client TTL {} ms, {} s per phase",
        config.concurrency,
        config.stream_time().as_millis(),
        config.ttl.as_millis(),
        config.duration.as_secs(),
    );

    // Phase 1: the bug.
    let closes = Arc::new(CloseCounters::default());
    let naive = NaiveCache::new(config.ttl, {
        let closes = Arc::clone(&closes);
        move || Client::new(addr, Arc::clone(&closes))
    });
    let naive_rotations = {
        let naive = naive.clone();
        move || naive.rotations.load(Relaxed)
    };
    let naive = run_phase("naive cache", config, naive, naive_rotations, &closes).await;

    // Phase 2: the fix, over the very same client type and TTL.
    let closes = Arc::new(CloseCounters::default());
    let rotating = ServiceBuilder::new()
        .layer(RotatingClientLayer::new(config.ttl))
        .service({
            let closes = Arc::clone(&closes);
            move || Client::new(addr, Arc::clone(&closes))
        });
    let rotating_rotations = {
        let rotating = rotating.clone();
        move || rotating.stats().rotations
    };
    let rotating = run_phase(
        "RotatingClientLayer",
        config,
        rotating,
        rotating_rotations,
        &closes,
    )
    .await;
    drop(server);

    print_table(&naive, &rotating);
    verdict(&naive, &rotating)
}

// ---------------------------------------------------------------------------
// The client: owns its connections, and closes them when dropped.
// ---------------------------------------------------------------------------

/// A minimal HTTP/1.1 client (one connection per request) that owns its
/// connection tasks, as pooled clients do: when its last clone is dropped,
/// the client is closed and every connection task is aborted, cutting the
/// responses still streaming through it.
///
/// The response future holds a clone until the response head arrives; the
/// body does not, exactly like a real client's pool.
#[derive(Clone)]
struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    addr: SocketAddr,
    connections: Mutex<Vec<AbortHandle>>,
    closes: Arc<CloseCounters>,
}

/// Counts client closes, and the connections that were still busy (a
/// response streaming) when their client closed.
#[derive(Default)]
struct CloseCounters {
    clients: AtomicU64,
    busy_connections: AtomicU64,
}

impl Client {
    fn new(addr: SocketAddr, closes: Arc<CloseCounters>) -> Self {
        Client {
            inner: Arc::new(ClientInner {
                addr,
                connections: Mutex::default(),
                closes,
            }),
        }
    }
}

impl Drop for ClientInner {
    // Closing the client: abort every connection, busy or not.
    fn drop(&mut self) {
        let connections = std::mem::take(self.connections.get_mut().expect("not poisoned"));
        let busy = connections.iter().filter(|c| !c.is_finished()).count();
        connections.iter().for_each(AbortHandle::abort);
        self.closes.clients.fetch_add(1, Relaxed);
        self.closes.busy_connections.fetch_add(busy as u64, Relaxed);
    }
}

impl ClientInner {
    async fn send(
        &self,
        mut request: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, BoxError> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let task = tokio::spawn(connection).abort_handle();
        {
            let mut connections = self.connections.lock().expect("not poisoned");
            connections.retain(|c| !c.is_finished());
            connections.push(task);
        }
        request
            .headers_mut()
            .insert(header::HOST, self.addr.to_string().parse()?);
        sender.ready().await?;
        Ok(sender.send_request(request).await?)
    }
}

impl Service<Request<Empty<Bytes>>> for Client {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Empty<Bytes>>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.send(request).await })
    }
}

// ---------------------------------------------------------------------------
// The bug: a TTL cache that closes the client it evicts.
// ---------------------------------------------------------------------------

/// Hands out the cached client, replacing it on the first request after its
/// TTL. Replacing it drops the old client, which closes it, whatever is
/// still streaming through it.
#[derive(Clone)]
struct NaiveCache<F> {
    ttl: Duration,
    make: Arc<F>,
    slot: Arc<Mutex<(Instant, Client)>>,
    rotations: Arc<AtomicU64>,
}

impl<F: Fn() -> Client> NaiveCache<F> {
    fn new(ttl: Duration, make: F) -> Self {
        let first = make();
        NaiveCache {
            ttl,
            make: Arc::new(make),
            slot: Arc::new(Mutex::new((Instant::now(), first))),
            rotations: Arc::default(),
        }
    }
}

impl<F: Fn() -> Client> Service<Request<Empty<Bytes>>> for NaiveCache<F> {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = <Client as Service<Request<Empty<Bytes>>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Empty<Bytes>>) -> Self::Future {
        let mut client = {
            let mut slot = self.slot.lock().expect("not poisoned");
            if slot.0.elapsed() >= self.ttl {
                // The old client is dropped, and so closed, right here.
                *slot = (Instant::now(), (self.make)());
                self.rotations.fetch_add(1, Relaxed);
            }
            slot.1.clone()
        };
        client.call(request)
    }
}

// ---------------------------------------------------------------------------
// The load: `concurrency` workers streaming back to back.
// ---------------------------------------------------------------------------

/// What one phase measured.
struct Report {
    name: &'static str,
    completed: u64,
    cut: u64,
    rotations: u64,
    retired: u64,
    busy_connections_closed: u64,
    times: Vec<Duration>,
    first_error: Option<String>,
}

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    cut: AtomicU64,
    times: Mutex<Vec<Duration>>,
    first_error: Mutex<Option<String>>,
}

async fn run_phase<S, B>(
    name: &'static str,
    config: Config,
    service: S,
    rotations: impl Fn() -> u64 + Send + Sync + 'static,
    closes: &CloseCounters,
) -> Report
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + config.duration;

    // Stagger the workers over one stream time, so that streams are open at
    // every instant, as in production.
    let stagger = config.stream_time() / config.concurrency as u32;
    let workers: Vec<_> = (0..config.concurrency)
        .map(|i| {
            let service = service.clone();
            let tally = Arc::clone(&tally);
            tokio::spawn(async move {
                tokio::time::sleep(stagger * i as u32).await;
                worker(service, config, deadline, &tally).await;
            })
        })
        .collect();

    // One progress line a second, to stderr.
    let rotations = Arc::new(rotations);
    let progress = {
        let tally = Arc::clone(&tally);
        let rotations = Arc::clone(&rotations);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!(
                    "[{name:>19}] {:>3} s  completed {:>5}  cut {:>5}  rotations {:>3}",
                    start.elapsed().as_secs(),
                    tally.completed.load(Relaxed),
                    tally.cut.load(Relaxed),
                    rotations(),
                );
            }
        })
    };

    // Every worker stops starting streams at the deadline, and every stream
    // has a timeout, so this is a backstop.
    let backstop = config.duration + stream_timeout(config) * 2;
    for mut worker in workers {
        let remaining = (start + backstop).saturating_duration_since(Instant::now());
        if timeout(remaining, &mut worker).await.is_err() {
            eprintln!("[{name:>19}] a worker did not finish in time; counting it as cut");
            worker.abort();
            tally.cut.fetch_add(1, Relaxed);
        }
    }
    progress.abort();

    let completed = tally.completed.load(Relaxed);
    let cut = tally.cut.load(Relaxed);
    let mut times = std::mem::take(&mut *tally.times.lock().expect("not poisoned"));
    times.sort_unstable();
    let first_error = tally.first_error.lock().expect("not poisoned").take();
    // Every stream and every worker handle is gone, so every client that
    // stopped being current has been closed by now; the current one is
    // still held by `service`.
    let report = Report {
        name,
        completed,
        cut,
        rotations: rotations(),
        retired: closes.clients.load(Relaxed),
        busy_connections_closed: closes.busy_connections.load(Relaxed),
        times,
        first_error,
    };
    drop(service);
    report
}

fn stream_timeout(config: Config) -> Duration {
    config.stream_time() * 3 + Duration::from_secs(2)
}

async fn worker<S, B>(service: S, config: Config, deadline: Instant, tally: &Tally)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    while Instant::now() < deadline {
        let started = Instant::now();
        let outcome = timeout(stream_timeout(config), stream_once(service.clone(), config))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        match outcome {
            Ok(()) => {
                tally.completed.fetch_add(1, Relaxed);
                tally
                    .times
                    .lock()
                    .expect("not poisoned")
                    .push(started.elapsed());
            }
            Err(e) => {
                tally.cut.fetch_add(1, Relaxed);
                tally
                    .first_error
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert_with(|| error_chain(&*e));
            }
        }
    }
}

/// Streams one response to its end; `Ok` only if every byte arrived.
async fn stream_once<S, B>(service: S, config: Config) -> Result<(), BoxError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let request = Request::get("/v1/chat/completions").body(Empty::new())?;
    // A fresh handle per request, dropped once the response head is in: only
    // the response itself can keep its client alive.
    let response = service.oneshot(request).await.map_err(Into::into)?;
    let mut body = pin!(response.into_body());
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(Into::into)?.into_data() {
            received += data.remaining();
        }
    }
    let expected = CHUNK.len() * config.chunks as usize;
    if received != expected {
        return Err(format!("body ended after {received} of {expected} bytes").into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The table and the verdict.
// ---------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: usize) -> String {
    match sorted.len() {
        0 => "-".to_owned(),
        n => format!("{} ms", sorted[(n - 1) * p / 100].as_millis()),
    }
}

fn print_table(naive: &Report, rotating: &Report) {
    let row = |label: &str, cell: &dyn Fn(&Report) -> String| {
        println!("{label:<26} {:>14} {:>20}", cell(naive), cell(rotating));
    };
    println!();
    println!("{:<26} {:>14} {:>20}", "", naive.name, rotating.name);
    row("streams completed", &|r| r.completed.to_string());
    row("streams cut", &|r| r.cut.to_string());
    row("rotations", &|r| r.rotations.to_string());
    row("generations retired", &|r| r.retired.to_string());
    row("busy connections closed", &|r| {
        r.busy_connections_closed.to_string()
    });
    row("p50 time (completed)", &|r| percentile(&r.times, 50));
    row("p99 time (completed)", &|r| percentile(&r.times, 99));
    for report in [naive, rotating] {
        if let Some(e) = &report.first_error {
            println!("\nfirst cut stream, {}: {e}", report.name);
        }
    }
}

fn verdict(naive: &Report, rotating: &Report) -> Result<String, String> {
    let why = if rotating.cut > 0 {
        "RotatingClientLayer cut streams"
    } else if rotating.rotations == 0 {
        "no rotation happened on the rotating side: lower --ttl-ms or raise --duration-s"
    } else if naive.cut == 0 {
        "the naive cache cut nothing, so the run shows nothing: make streams longer (--chunks, --chunk-delay-ms) or --ttl-ms shorter"
    } else {
        return Ok(format!(
            "the naive cache cut {} streams; RotatingClientLayer rotated {} times and cut none",
            naive.cut, rotating.rotations
        ));
    };
    Err(why.to_owned())
}
