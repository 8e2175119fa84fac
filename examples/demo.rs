//! Two acts, at a compressed time scale.
//!
//! Act 1, the cautionary tale: a cache that closes the client it evicts.
//! The reported incident: an LLM proxy cached its upstream HTTP clients with
//! a one-hour TTL and closed each client the cache evicted. Closing a client
//! closes its connections, so every response still streaming through it was
//! cut, and callers saw a burst of read timeouts every hour.
//!
//! This demo starts a streaming server on loopback and runs many concurrent
//! long streams twice, through the very same client type:
//!
//! 1. through a naive TTL cache that drops (closes) the evicted client;
//! 2. through `RotatingClientLayer` with the same TTL, which keeps a retired
//!    client alive until its last response has finished.
//!
//! Act 2, the scale-up: three backends on 127.0.0.1, .2 and .3 behind one
//! made-up name, and a resolver that lists only the first until the
//! "change" at t = 1 s, then all three, round robin. A long-lived
//! hyper-util client keeps its pooled connections (its single HTTP/2
//! connection) to backend 1 and never sends the new backends a request;
//! the same client under `RotatingClientLayer` with a 300 ms TTL moves
//! about two thirds of its traffic to them within a TTL, failing nothing.
//!
//! ```sh
//! cargo run --release --example demo              # ~14 s, both acts
//! cargo run --release --example demo -- --http1   # act 2 over HTTP/1.1
//! cargo run --release --example demo -- --help
//! ```
//!
//! Exit code: 0 if, in act 1, the rotating side cut nothing while the naive
//! side did (with rotations on both) and, in act 2, the rotating side failed
//! no request and sent at least a third of the requests after the change to
//! the new backends; 1 otherwise; 2 for a bad flag.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::{timeout, Instant, Interval, MissedTickBehavior};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_rotating_client::RotatingClientLayer;

type BoxError = Box<dyn Error + Send + Sync>;

const CHUNK: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"token\"}}]}\n\n";

const HELP: &str = "\
Act 1: runs long concurrent streams through a naive TTL client cache that
closes evicted clients, then through RotatingClientLayer with the same TTL,
and compares how many streams each one cut.
Act 2: three backends on 127.0.0.1-3 behind one name whose resolver lists
only the first until the change, then all three (round robin); request
loops run through a plain hyper-util client built once and through the same
client under RotatingClientLayer, and show each backend's share per second.

Usage: cargo run --release --example demo -- [FLAGS]

Act 1 flags:
  --concurrency N      concurrent streams, 1..=500      [default: 50]
  --ttl-ms N           client TTL in milliseconds        [default: 1000]
  --chunks N           chunks per streamed response      [default: 20]
  --chunk-delay-ms N   delay between chunks              [default: 20]
  --duration-s N       seconds each phase starts streams [default: 5]

Act 2 flags:
  --http1              use HTTP/1.1 (pooled connections) instead of HTTP/2
                       (h2c prior knowledge, one connection per client)
  --loops N            request loops per client, 1..=256 [default: 8]
  --scale-ttl-ms N     TTL of the rotating client        [default: 300]
  --change-ms N        when the resolver starts listing all three backends
                                                         [default: 1000]
  --scale-duration-s N seconds of load, > the change     [default: 3]

  --act N              run only act 1 or act 2           [default: both]
  -h, --help           print this help

Exit code: 0 if every act that ran passed: in act 1 the rotating side cut
no stream and the run proved something (rotations happened, the naive cache
did cut streams); in act 2 the rotating side failed no request and sent at
least a third of the requests after the change to the new backends. 1
otherwise; 2 for a bad flag.";

#[derive(Clone, Copy, Debug)]
struct Config {
    concurrency: u64,
    ttl: Duration,
    chunks: u64,
    chunk_delay: Duration,
    duration: Duration,
    act: Option<u64>,
    scale: ScaleConfig,
}

/// Act 2's knobs.
#[derive(Clone, Copy, Debug)]
struct ScaleConfig {
    http1: bool,
    loops: u64,
    ttl: Duration,
    change_at: Duration,
    duration: Duration,
}

impl Config {
    fn stream_time(&self) -> Duration {
        self.chunk_delay * (self.chunks.saturating_sub(1) as u32)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n(see --help)");
            return ExitCode::from(2);
        }
    };

    let mut ok = true;
    if config.act != Some(2) {
        ok &= act_1(config).await;
    }
    if config.act != Some(1) {
        if config.act.is_none() {
            println!();
        }
        ok &= act_2(config.scale).await;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The cautionary tale: `true` if it showed what it should.
async fn act_1(config: Config) -> bool {
    let server = match StreamServer::start(config).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: cannot start the loopback server: {e}");
            return false;
        }
    };
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

fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

// ---------------------------------------------------------------------------
// The server: `chunks` chunks, `chunk_delay` apart.
// ---------------------------------------------------------------------------

struct StreamServer {
    addr: SocketAddr,
    accept: AbortHandle,
}

impl StreamServer {
    async fn start(config: Config) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    // Out of file descriptors, most likely: back off.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let respond = hyper::service::service_fn(move |_request| async move {
                    let mut tick =
                        tokio::time::interval(config.chunk_delay.max(Duration::from_micros(1)));
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    let chunks = Chunks {
                        left: config.chunks,
                        tick,
                    };
                    Ok::<_, Infallible>(Response::new(chunks))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), respond),
                );
            }
        })
        .abort_handle();
        Ok(StreamServer { addr, accept })
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A chunked body: the first chunk at once, then one per tick.
struct Chunks {
    left: u64,
    tick: Interval,
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        ready!(self.tick.poll_tick(cx));
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

// ---------------------------------------------------------------------------
// Flags and output.
// ---------------------------------------------------------------------------

/// `Ok(None)` means `--help`.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Config>, String> {
    let mut config = Config {
        concurrency: 50,
        ttl: Duration::from_millis(1000),
        chunks: 20,
        chunk_delay: Duration::from_millis(20),
        duration: Duration::from_secs(5),
        act: None,
        scale: ScaleConfig {
            http1: false,
            loops: 8,
            ttl: Duration::from_millis(300),
            change_at: Duration::from_millis(1000),
            duration: Duration::from_secs(3),
        },
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        if matches!(flag.as_str(), "-h" | "--help") {
            return Ok(None);
        }
        if flag == "--http1" {
            config.scale.http1 = true;
            continue;
        }
        let (min, max) = match flag.as_str() {
            "--concurrency" => (1, 500),
            "--ttl-ms" | "--chunks" | "--duration-s" => (1, 3_600_000),
            "--chunk-delay-ms" => (0, 3_600_000),
            "--loops" => (1, 256),
            "--scale-ttl-ms" | "--change-ms" => (1, 3_600_000),
            "--scale-duration-s" => (1, 3_600),
            "--act" => (1, 2),
            _ => return Err(format!("unknown flag `{flag}`")),
        };
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .parse()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                format!("{flag}: expected an integer in {min}..={max}, got `{value}`")
            })?;
        match flag.as_str() {
            "--concurrency" => config.concurrency = n,
            "--ttl-ms" => config.ttl = Duration::from_millis(n),
            "--chunks" => config.chunks = n,
            "--chunk-delay-ms" => config.chunk_delay = Duration::from_millis(n),
            "--duration-s" => config.duration = Duration::from_secs(n),
            "--loops" => config.scale.loops = n,
            "--scale-ttl-ms" => config.scale.ttl = Duration::from_millis(n),
            "--change-ms" => config.scale.change_at = Duration::from_millis(n),
            "--scale-duration-s" => config.scale.duration = Duration::from_secs(n),
            _ => config.act = Some(n),
        }
    }
    if config.scale.change_at >= config.scale.duration {
        return Err(format!(
            "--change-ms ({} ms) must come before the end of the load (--scale-duration-s, {} s)",
            config.scale.change_at.as_millis(),
            config.scale.duration.as_secs()
        ));
    }
    Ok(Some(config))
}

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

fn verdict(naive: &Report, rotating: &Report) -> bool {
    let failure = if rotating.cut > 0 {
        Some("RotatingClientLayer cut streams")
    } else if rotating.rotations == 0 {
        Some("no rotation happened on the rotating side: lower --ttl-ms or raise --duration-s")
    } else if naive.cut == 0 {
        Some("the naive cache cut nothing, so the run shows nothing: make streams longer (--chunks, --chunk-delay-ms) or --ttl-ms shorter")
    } else {
        None
    };
    match failure {
        Some(why) => {
            println!("\nFAIL: {why}");
            false
        }
        None => {
            println!(
                "\nOK: the naive cache cut {} streams; RotatingClientLayer rotated {} times and cut none",
                naive.cut, rotating.rotations
            );
            true
        }
    }
}

// ---------------------------------------------------------------------------
// Act 2: backends added behind DNS.
// ---------------------------------------------------------------------------

/// The made-up name the backends are reached by; only [`Dns`] knows it.
const BACKENDS_HOST: &str = "backends.test";
/// Response header carrying the index (1-based) of the backend that served.
const BACKEND_HEADER: &str = "x-backend";
/// Bar width, in characters, of the per-second shares.
const BAR: usize = 20;

type Legacy = hyper_util::client::legacy::Client<HttpConnector<Dns>, Empty<Bytes>>;

/// Three small servers, on 127.0.0.1, 127.0.0.2 and 127.0.0.3, all on the
/// same port, so that every client (whatever it does with a port from a
/// resolver) reaches them as `http://backends.test:PORT/`.
struct Backends {
    addrs: Vec<SocketAddr>,
    accept: Vec<AbortHandle>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backends {
    async fn start() -> std::io::Result<Self> {
        let mut last_error = None;
        // Port 0 on 127.0.0.1, then the same port on .2 and .3; another
        // process may hold it there, so try a few ports.
        for _ in 0..20 {
            let first = TcpListener::bind("127.0.0.1:0").await?;
            let port = first.local_addr()?.port();
            let mut listeners = vec![first];
            for ip in ["127.0.0.2", "127.0.0.3"] {
                match TcpListener::bind((ip, port)).await {
                    Ok(listener) => listeners.push(listener),
                    Err(e) => {
                        last_error = Some(e);
                        break;
                    }
                }
            }
            if listeners.len() == 3 {
                return Ok(Self::serve(listeners));
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no free port")))
    }

    fn serve(listeners: Vec<TcpListener>) -> Self {
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let mut addrs = Vec::new();
        let mut accept = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            addrs.push(
                listener
                    .local_addr()
                    .expect("a bound listener has an address"),
            );
            let connections = Arc::clone(&connections);
            let task = tokio::spawn(async move {
                let tag = http::HeaderValue::from(index + 1);
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let tag = tag.clone();
                    let respond = hyper::service::service_fn(move |_request| {
                        let tag = tag.clone();
                        async move {
                            // A millisecond of "work" keeps the request
                            // rate, and the CPU, modest.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            let mut response =
                                Response::new(http_body_util::Full::new(Bytes::from_static(b"ok")));
                            response.headers_mut().insert(BACKEND_HEADER, tag);
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let connection = tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), respond)
                            .await;
                    });
                    let mut connections = connections.lock().expect("not poisoned");
                    connections.retain(|c| !c.is_finished());
                    connections.push(connection.abort_handle());
                }
            });
            accept.push(task.abort_handle());
        }
        Backends {
            addrs,
            accept,
            connections,
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.accept.iter().for_each(AbortHandle::abort);
        let connections = self.connections.lock().map(|mut c| std::mem::take(&mut *c));
        connections
            .unwrap_or_default()
            .iter()
            .for_each(AbortHandle::abort);
    }
}

/// The resolver the demo controls: `backends.test` resolves to backend 1
/// alone until [`Dns::scale_up`], then to all three, the list rotated by
/// one per lookup (round robin) so that new connections spread. Each
/// client gets its own round-robin position; the scale-up is shared.
#[derive(Clone)]
struct Dns {
    backends: Arc<Vec<SocketAddr>>,
    scaled_up: Arc<AtomicBool>,
    next: Arc<AtomicUsize>,
}

impl Dns {
    fn new(backends: &[SocketAddr]) -> Self {
        Dns {
            backends: Arc::new(backends.to_vec()),
            scaled_up: Arc::default(),
            next: Arc::default(),
        }
    }

    /// The same records, with a round-robin position of its own.
    fn for_another_client(&self) -> Self {
        Dns {
            next: Arc::default(),
            ..self.clone()
        }
    }

    fn scale_up(&self) {
        self.scaled_up.store(true, Relaxed);
    }

    fn lookup(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
        if host != BACKENDS_HOST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}: unknown host"),
            ));
        }
        let listed = if self.scaled_up.load(Relaxed) {
            self.backends.len()
        } else {
            1
        };
        let start = self.next.fetch_add(1, Relaxed) % listed;
        Ok((0..listed)
            .map(|i| self.backends[(start + i) % listed])
            .collect())
    }
}

/// hyper-util's resolver hook: a `Service<Name>` answering socket addresses.
impl Service<Name> for Dns {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        std::future::ready(self.lookup(name.as_str()).map(Vec::into_iter))
    }
}

/// A hyper-util client that resolves through `dns`: HTTP/2 with prior
/// knowledge (one connection per client) or pooled HTTP/1.1.
fn build_client(dns: Dns, http1: bool) -> Legacy {
    let mut connector = HttpConnector::new_with_resolver(dns);
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(!http1)
        .build(connector)
}

/// Requests per backend, per second of the run and after the change.
struct Shares {
    per_second: Vec<[AtomicU64; 3]>,
    after_change: [AtomicU64; 3],
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shares {
    fn new(seconds: usize) -> Self {
        Shares {
            per_second: (0..seconds).map(|_| Default::default()).collect(),
            after_change: Default::default(),
            failed: AtomicU64::new(0),
            first_error: Mutex::default(),
        }
    }

    fn second(&self, second: usize) -> [u64; 3] {
        self.per_second
            .get(second)
            .map_or([0; 3], |counts| counts.each_ref().map(|c| c.load(Relaxed)))
    }

    fn after_change(&self) -> [u64; 3] {
        self.after_change.each_ref().map(|c| c.load(Relaxed))
    }
}

/// The share of backends 2 and 3, in `0.0..=1.0` (0 for no requests).
fn new_share(counts: [u64; 3]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        0.0
    } else {
        (counts[1] + counts[2]) as f64 / total as f64
    }
}

/// `100%  0%  0% 11111111111111111111`: each backend's share, then a bar
/// of [`BAR`] characters, each the index of the backend it stands for.
fn share_cell(counts: [u64; 3]) -> String {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return format!("{:>4} {:>4} {:>4} {:BAR$}", "-", "-", "-", "");
    }
    let percent = counts.map(|c| format!("{}%", (c * 100 + total / 2) / total));
    // Cumulative rounding, so the bar is always exactly BAR wide.
    let mut bar = String::new();
    let mut cumulative = 0;
    for (i, count) in counts.iter().enumerate() {
        cumulative += count;
        let end = ((cumulative * BAR as u64 + total / 2) / total) as usize;
        while bar.len() < end {
            bar.push(char::from(b'1' + i as u8));
        }
    }
    format!(
        "{:>4} {:>4} {:>4} {bar}",
        percent[0], percent[1], percent[2]
    )
}

/// Sends requests back to back until `deadline`, recording which backend
/// served each one.
async fn request_loop<S, B>(
    service: S,
    uri: http::Uri,
    start: Instant,
    change_at: Duration,
    deadline: Instant,
    shares: Arc<Shares>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    while Instant::now() < deadline {
        let sent = start.elapsed();
        let one = async {
            let request = Request::get(uri.clone()).body(Empty::new())?;
            let response = service.clone().oneshot(request).await.map_err(Into::into)?;
            let backend = response
                .headers()
                .get(BACKEND_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|b| (1..=3).contains(b))
                .ok_or("response without a backend tag")?;
            response.into_body().collect().await.map_err(Into::into)?;
            Ok::<_, BoxError>(backend - 1)
        };
        match timeout(Duration::from_secs(2), one).await {
            Ok(Ok(backend)) => {
                if let Some(counts) = shares.per_second.get(sent.as_secs() as usize) {
                    counts[backend].fetch_add(1, Relaxed);
                }
                if sent >= change_at {
                    shares.after_change[backend].fetch_add(1, Relaxed);
                }
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => error_chain(&*e),
                    _ => "timed out".to_owned(),
                };
                shares.failed.fetch_add(1, Relaxed);
                shares
                    .first_error
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert(error);
            }
        }
    }
}

/// Scale-up: `true` if the rotating side failed nothing and moved at least
/// a third of its traffic after the change to the new backends.
async fn act_2(config: ScaleConfig) -> bool {
    let backends = match Backends::start().await {
        Ok(backends) => backends,
        Err(e) => {
            eprintln!("error: cannot start three backends on 127.0.0.1-3: {e}");
            return false;
        }
    };
    let port = backends.addrs[0].port();
    let uri: http::Uri = match format!("http://{BACKENDS_HOST}:{port}/").parse() {
        Ok(uri) => uri,
        Err(e) => {
            eprintln!("error: {e}");
            return false;
        }
    };
    let protocol = if config.http1 {
        "HTTP/1.1"
    } else {
        "HTTP/2 (h2c)"
    };
    eprintln!("Act 2: backends added behind DNS");
    eprintln!(
        "{BACKENDS_HOST} resolves to 127.0.0.1 until t = {:.1} s, then to 127.0.0.1-3 (round robin)",
        config.change_at.as_secs_f64()
    );
    eprintln!(
        "{} request loops per client for {} s over {protocol}, rotating TTL {} ms",
        config.loops,
        config.duration.as_secs(),
        config.ttl.as_millis(),
    );

    let dns = Dns::new(&backends.addrs);
    let http1 = config.http1;
    let plain = build_client(dns.for_another_client(), http1);
    let retired = Arc::new(AtomicU64::new(0));
    let rotating = RotatingClientLayer::new(config.ttl)
        .on_retire({
            let retired = Arc::clone(&retired);
            move |client: Legacy, _generation| {
                drop(client);
                retired.fetch_add(1, Relaxed);
            }
        })
        .layer({
            let dns = dns.for_another_client();
            move || build_client(dns.clone(), http1)
        });

    let seconds = config.duration.as_secs() as usize;
    let plain_shares = Arc::new(Shares::new(seconds));
    let rotating_shares = Arc::new(Shares::new(seconds));
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut loops = Vec::new();
    for _ in 0..config.loops {
        loops.push(tokio::spawn(request_loop(
            plain.clone(),
            uri.clone(),
            start,
            config.change_at,
            deadline,
            Arc::clone(&plain_shares),
        )));
        loops.push(tokio::spawn(request_loop(
            rotating.clone(),
            uri.clone(),
            start,
            config.change_at,
            deadline,
            Arc::clone(&rotating_shares),
        )));
    }

    // The change, then one line a second.
    let change = {
        let dns = dns.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + config.change_at).await;
            dns.scale_up();
        })
    };
    let cell_width = 15 + BAR;
    eprintln!(
        "{:<7} {:<cell_width$}   RotatingClientLayer",
        "second", "plain client"
    );
    eprintln!(
        "{:<7} {:>4} {:>4} {:>4} {:BAR$}   {:>4} {:>4} {:>4}",
        "", "b1", "b2", "b3", "", "b1", "b2", "b3"
    );
    for second in 0..seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second as u64 + 1)).await;
        eprintln!(
            "{:<7} {}   {}",
            format!("{}-{} s", second, second + 1),
            share_cell(plain_shares.second(second)),
            share_cell(rotating_shares.second(second)),
        );
    }
    let _ = change.await;
    for request_loop in loops {
        let _ = request_loop.await;
    }
    // Every loop is done, so every generation but the current one has
    // drained and retired by now.
    let stats = rotating.stats();
    let retired = retired.load(Relaxed);
    drop((plain, rotating));

    let plain_after = plain_shares.after_change();
    let rotating_after = rotating_shares.after_change();
    let last = seconds.saturating_sub(1);
    let row = |label: &str, plain: String, rotating: String| {
        println!("{label:<26} {plain:>14} {rotating:>20}");
    };
    let percent = |share: f64| format!("{:.1}%", share * 100.0);
    println!();
    println!(
        "{:<26} {:>14} {:>20}",
        "", "plain client", "RotatingClientLayer"
    );
    row(
        "requests after the change",
        plain_after.iter().sum::<u64>().to_string(),
        rotating_after.iter().sum::<u64>().to_string(),
    );
    row(
        "new backends, after change",
        percent(new_share(plain_after)),
        percent(new_share(rotating_after)),
    );
    row(
        "new backends, last second",
        percent(new_share(plain_shares.second(last))),
        percent(new_share(rotating_shares.second(last))),
    );
    row(
        "requests failed",
        plain_shares.failed.load(Relaxed).to_string(),
        rotating_shares.failed.load(Relaxed).to_string(),
    );
    row("rotations", "-".to_owned(), stats.rotations.to_string());
    row("generations retired", "-".to_owned(), retired.to_string());
    for (name, shares) in [
        ("plain client", &plain_shares),
        ("RotatingClientLayer", &rotating_shares),
    ] {
        if let Some(e) = &*shares.first_error.lock().expect("not poisoned") {
            println!("\nfirst failed request, {name}: {e}");
        }
    }
    drop(backends);

    let rotating_failed = rotating_shares.failed.load(Relaxed);
    let moved = new_share(rotating_after);
    let failure = if rotating_failed > 0 {
        Some(format!(
            "RotatingClientLayer failed {rotating_failed} requests"
        ))
    } else if moved < 1.0 / 3.0 {
        Some(format!(
            "RotatingClientLayer sent only {} of its requests after the change to the new backends: \
             lower --scale-ttl-ms or raise --scale-duration-s",
            percent(moved)
        ))
    } else {
        None
    };
    match failure {
        Some(why) => {
            println!("\nFAIL: {why}");
            false
        }
        None => {
            println!(
                "\nOK: after the change the plain client sent {} of its requests to the new backends; \
                 RotatingClientLayer sent {} and failed none",
                percent(new_share(plain_after)),
                percent(moved)
            );
            true
        }
    }
}
