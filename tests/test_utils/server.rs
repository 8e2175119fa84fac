//! Loopback servers: a streaming HTTP server and a gRPC health server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use super::BoxError;

/// Default number of chunks streamed by [`StreamServer`].
pub const DEFAULT_CHUNKS: usize = 30;
/// Default delay between chunks, in milliseconds.
pub const DEFAULT_CHUNK_DELAY_MS: u64 = 10;
/// Default chunk size in bytes.
pub const DEFAULT_CHUNK_SIZE: usize = 64;

/// Request header (and query key without `x-`) selecting the chunk count.
pub const H_CHUNKS: &str = "x-chunks";
/// Request header (and query key without `x-`) selecting the delay between chunks.
pub const H_CHUNK_DELAY_MS: &str = "x-chunk-delay-ms";
/// Request header (and query key without `x-`) selecting the chunk size.
pub const H_CHUNK_SIZE: &str = "x-chunk-size";
/// Request header: delay before the response head is sent (default 0).
pub const H_HEADER_DELAY_MS: &str = "x-header-delay-ms";
/// Request header: if present, the body fails (server-side body error) after
/// this many chunks; hyper then aborts the connection (h1) / resets the stream (h2).
pub const H_FAIL_AFTER: &str = "x-fail-after";
/// Request header: if `1`/`true`, the body ends with trailers
/// `x-chunks-sent: <N>` and `x-body-len: <N*K>` (declared in a `trailer`
/// response header). Over HTTP/1.1 hyper only sends them if the request also
/// has `te: trailers`; over h2 they are always sent.
pub const H_TRAILERS: &str = "x-trailers";
/// Sent by [`AbortOnDropClient`] on every request (its [`AbortOnDropClient::id`]);
/// echoed back by [`StreamServer`] in the response headers.
pub const H_CLIENT_ID: &str = "x-client-id";
/// Response header: 1-based sequence number of the request on the server.
pub const H_REQUEST_SEQ: &str = "x-request-seq";

// ---------------------------------------------------------------------------
// Deterministic body
// ---------------------------------------------------------------------------

/// Content of chunk `index` of a `size`-byte-chunk stream: byte `j` is
/// `((index * 31 + j) % 251) as u8`, so reordered, duplicated or truncated
/// chunks are detected by a byte comparison.
pub fn chunk_bytes(index: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|j| ((index.wrapping_mul(31).wrapping_add(j)) % 251) as u8)
        .collect()
}

/// The full body [`StreamServer`] sends for `chunks` chunks of `size` bytes
/// (concatenation of [`chunk_bytes`]`(0..chunks)`).
pub fn expected_body(chunks: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks * size);
    for i in 0..chunks {
        out.extend_from_slice(&chunk_bytes(i, size));
    }
    out
}

/// Builds a `GET` request for [`StreamServer`] with the stream parameters set
/// as headers (`x-chunks`, `x-chunk-delay-ms`, `x-chunk-size`).
pub fn stream_request(
    uri: Uri,
    chunks: usize,
    delay_ms: u64,
    size: usize,
) -> Request<Empty<Bytes>> {
    Request::builder()
        .uri(uri)
        .header(H_CHUNKS, chunks)
        .header(H_CHUNK_DELAY_MS, delay_ms)
        .header(H_CHUNK_SIZE, size)
        .body(Empty::new())
        .expect("valid request")
}

/// Streaming body produced by [`StreamServer`].
struct ChunkBody {
    next: usize,
    chunks: usize,
    size: usize,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    fail_after: Option<usize>,
    trailers: bool,
    done: bool,
}

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.next > 0 && !this.delay.is_zero() && this.next < this.chunks {
            let delay = this.delay;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
            ready!(sleep.as_mut().poll(cx));
            this.sleep = None;
        }
        if this.fail_after.is_some_and(|k| this.next >= k) {
            this.done = true;
            return Poll::Ready(Some(Err("StreamServer: injected body failure".into())));
        }
        if this.next >= this.chunks {
            this.done = true;
            if this.trailers {
                let mut t = HeaderMap::new();
                t.insert("x-chunks-sent", HeaderValue::from(this.chunks));
                t.insert("x-body-len", HeaderValue::from(this.chunks * this.size));
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let chunk = chunk_bytes(this.next, this.size);
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

// ---------------------------------------------------------------------------
// Task tracking
// ---------------------------------------------------------------------------

/// A set of spawned tasks that can all be aborted. Also usable as a hyper
/// executor so that h2 helper tasks (stream/pipe/connection tasks hyper
/// spawns itself) are tracked and aborted too.
#[derive(Clone, Default)]
pub struct TaskTracker {
    state: Arc<Mutex<TrackerState>>,
}

#[derive(Default)]
struct TrackerState {
    closed: bool,
    handles: Vec<AbortHandle>,
}

impl TaskTracker {
    /// Spawns `fut` on the current runtime and tracks it. After
    /// [`TaskTracker::close`] the future is dropped instead of spawned.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        if self.state.lock().unwrap().closed {
            return;
        }
        let handle = tokio::spawn(fut).abort_handle();
        let mut st = self.state.lock().unwrap();
        if st.closed {
            drop(st);
            handle.abort();
            return;
        }
        st.handles.retain(|h| !h.is_finished());
        st.handles.push(handle);
    }

    /// Aborts every tracked task; new tasks may still be spawned.
    pub fn abort_all(&self) {
        let handles = std::mem::take(&mut self.state.lock().unwrap().handles);
        for h in handles {
            h.abort();
        }
    }

    /// Aborts every tracked task and refuses new ones.
    pub fn close(&self) {
        self.state.lock().unwrap().closed = true;
        self.abort_all();
    }

    /// Number of tracked tasks that have not finished yet.
    pub fn live_tasks(&self) -> usize {
        let mut st = self.state.lock().unwrap();
        st.handles.retain(|h| !h.is_finished());
        st.handles.len()
    }
}

impl<F> hyper::rt::Executor<F> for TaskTracker
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut);
    }
}

// ---------------------------------------------------------------------------
// Shared server core
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ConnStats {
    open: AtomicUsize,
    total: AtomicUsize,
    requests: AtomicUsize,
}

struct OpenGuard(Arc<ConnStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds `127.0.0.1:0`.
async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// Accept loop + per-connection tasks shared by [`StreamServer`] and
/// [`HealthServer`], which deref to it for the accessors below.
pub struct ServerCore {
    addr: SocketAddr,
    stats: Arc<ConnStats>,
    conns: TaskTracker,
    accept: AbortHandle,
    shut: AtomicBool,
}

impl ServerCore {
    /// Serves `svc` on `listener`, counting connections in `stats`.
    fn serve<S, B>(listener: TcpListener, svc: S, stats: Arc<ConnStats>) -> Self
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let addr = listener.local_addr().expect("local_addr");
        let conns = TaskTracker::default();
        let accept = {
            let conns = conns.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    let tcp = match listener.accept().await {
                        Ok((tcp, _)) => tcp,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    stats.total.fetch_add(1, Ordering::SeqCst);
                    stats.open.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard(stats.clone());
                    let svc = svc.clone();
                    let exec = conns.clone();
                    conns.spawn(async move {
                        let _guard = guard;
                        let builder = hyper_util::server::conn::auto::Builder::new(exec);
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    });
                }
            })
            .abort_handle()
        };
        ServerCore {
            addr,
            stats,
            conns,
            accept,
            shut: AtomicBool::new(false),
        }
    }

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Currently open TCP connections (decremented when the connection task ends).
    pub fn open_connections(&self) -> usize {
        self.stats.open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start.
    pub fn total_connections(&self) -> usize {
        self.stats.total.load(Ordering::SeqCst)
    }

    /// Requests received since start (counted by [`StreamServer`] only).
    pub fn total_requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }

    /// Polls (every 1 ms of tokio time) until `open_connections() == n`.
    /// Unbounded: wrap it in `tokio::time::timeout`.
    pub async fn wait_for_open_connections(&self, n: usize) {
        while self.open_connections() != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Aborts all live connection tasks (simulates the server dying
    /// mid-stream; gRPC Watch streams see an error); keeps accepting new
    /// connections.
    pub fn kill_connections(&self) {
        self.conns.abort_all();
    }

    /// Stops accepting and aborts all connection tasks. Idempotent; also
    /// done on Drop.
    pub fn shutdown(&self) {
        if !self.shut.swap(true, Ordering::SeqCst) {
            self.accept.abort();
            self.conns.close();
        }
    }
}

impl Drop for ServerCore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---------------------------------------------------------------------------
// StreamServer
// ---------------------------------------------------------------------------

/// hyper 1.x server on `127.0.0.1:0` speaking HTTP/1.1 and h2c (prior
/// knowledge) via `hyper_util::server::conn::auto::Builder`.
///
/// Any method/path. Parameters come from request headers or query params
/// (headers win): `x-chunks` / `chunks` (default 30), `x-chunk-delay-ms` /
/// `chunk-delay-ms` (default 10), `x-chunk-size` / `chunk-size` (default 64);
/// query keys may use `_` instead of `-` and may carry the `x-` prefix.
/// Also [`H_HEADER_DELAY_MS`], [`H_FAIL_AFTER`], [`H_TRAILERS`].
/// The response is `200` with a streamed body of exactly
/// [`expected_body`]`(chunks, size)`, sleeping `delay` (tokio time) between
/// chunks, with headers `x-chunks`, `x-chunk-size`, [`H_REQUEST_SEQ`] and the
/// echoed [`H_CLIENT_ID`].
///
/// Dropping the server (or [`StreamServer::shutdown`]) stops accepting and
/// aborts every connection task (including hyper's h2 stream tasks).
pub struct StreamServer {
    core: ServerCore,
}

impl std::ops::Deref for StreamServer {
    type Target = ServerCore;

    fn deref(&self) -> &ServerCore {
        &self.core
    }
}

impl StreamServer {
    /// Binds `127.0.0.1:0` and spawns the server on the current runtime.
    pub async fn start() -> Self {
        Self::on_listener(bind_loopback().await)
    }

    /// Binds `addr` (typically the address of a server that was shut down,
    /// to restart it on the same port) and spawns the server on the current
    /// runtime. Retries for up to a second while the old listener is still
    /// being torn down (`SO_REUSEADDR` makes `TIME_WAIT` no obstacle).
    pub async fn start_on(addr: SocketAddr) -> Self {
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(addr).await {
                return Self::on_listener(listener);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        Self::on_listener(listener)
    }

    pub fn on_listener(listener: TcpListener) -> Self {
        let stats = Arc::new(ConnStats::default());
        let svc_stats = stats.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let seq = svc_stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
            handle_stream_request(req, seq)
        });
        StreamServer {
            core: ServerCore::serve(listener, svc, stats),
        }
    }

    /// `http://127.0.0.1:<port><path>` (`path` should start with `/`; may
    /// contain a query).
    pub fn uri(&self, path: &str) -> Uri {
        format!("http://{}{}", self.core.addr, path)
            .parse()
            .expect("valid uri")
    }
}

fn param(req: &Request<Incoming>, header: &str) -> Option<String> {
    if let Some(v) = req.headers().get(header).and_then(|v| v.to_str().ok()) {
        return Some(v.trim().to_owned());
    }
    let bare = header.trim_start_matches("x-");
    let query = req.uri().query()?;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = k.to_ascii_lowercase().replace('_', "-");
        if k == header || k == bare {
            return Some(v.to_owned());
        }
    }
    None
}

fn num_param<T: std::str::FromStr>(req: &Request<Incoming>, header: &str, default: T) -> T {
    param(req, header)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn handle_stream_request(
    req: Request<Incoming>,
    seq: usize,
) -> Result<Response<ChunkBody>, Infallible> {
    let chunks = num_param(&req, H_CHUNKS, DEFAULT_CHUNKS);
    let delay_ms = num_param(&req, H_CHUNK_DELAY_MS, DEFAULT_CHUNK_DELAY_MS);
    let size = num_param(&req, H_CHUNK_SIZE, DEFAULT_CHUNK_SIZE);
    let header_delay_ms = num_param(&req, H_HEADER_DELAY_MS, 0u64);
    let fail_after = param(&req, H_FAIL_AFTER).and_then(|v| v.parse().ok());
    let trailers = matches!(param(&req, H_TRAILERS).as_deref(), Some("1" | "true"));
    let client_id = req.headers().get(H_CLIENT_ID).cloned();
    if header_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(header_delay_ms)).await;
    }
    let body = ChunkBody {
        next: 0,
        chunks,
        size,
        delay: Duration::from_millis(delay_ms),
        sleep: None,
        fail_after,
        trailers,
        done: false,
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(H_CHUNKS, HeaderValue::from(chunks));
    h.insert(H_CHUNK_SIZE, HeaderValue::from(size));
    h.insert(H_REQUEST_SEQ, HeaderValue::from(seq));
    if let Some(id) = client_id {
        h.insert(H_CLIENT_ID, id);
    }
    if trailers {
        // HTTP/1.1 only sends trailer fields declared here (and only if the
        // request carried `te: trailers`).
        h.insert(
            http::header::TRAILER,
            HeaderValue::from_static("x-chunks-sent, x-body-len"),
        );
    }
    Ok(resp)
}

// ---------------------------------------------------------------------------
// HealthServer
// ---------------------------------------------------------------------------

/// gRPC health server (`grpc.health.v1.Health`, from
/// `tonic_health::server::health_reporter()`) on `127.0.0.1:0`, served by
/// the same hyper auto (h1 + h2c) loop as [`StreamServer`] so that
/// connections are counted and can be killed. The overall service `""`
/// starts as SERVING.
pub struct HealthServer {
    core: ServerCore,
    reporter: tonic_health::server::HealthReporter,
}

impl std::ops::Deref for HealthServer {
    type Target = ServerCore;

    fn deref(&self) -> &ServerCore {
        &self.core
    }
}

impl HealthServer {
    /// Binds `127.0.0.1:0` and spawns the server on the current runtime.
    pub async fn start() -> Self {
        let (reporter, service) = tonic_health::server::health_reporter();
        let stats = Arc::new(ConnStats::default());
        let svc = hyper_util::service::TowerToHyperService::new(service);
        HealthServer {
            core: ServerCore::serve(bind_loopback().await, svc, stats),
            reporter,
        }
    }

    /// `http://127.0.0.1:<port>`, suitable for `Endpoint::from_shared`.
    pub fn endpoint_uri(&self) -> String {
        format!("http://{}", self.core.addr)
    }

    /// The reporter used to flip service statuses.
    pub fn reporter(&self) -> &tonic_health::server::HealthReporter {
        &self.reporter
    }

    /// Sets the status of `service` (`""` = overall server health); notifies watchers.
    pub async fn set_status(&self, service: &str, status: tonic_health::ServingStatus) {
        self.reporter.set_service_status(service, status).await;
    }
}
// ---------------------------------------------------------------------------
// FixedServer
// ---------------------------------------------------------------------------

/// hyper server on `127.0.0.1:0` (HTTP/1.1 and h2c) that answers every
/// request with the same status, `content-type` and body.
pub struct FixedServer {
    core: ServerCore,
}

impl FixedServer {
    /// Binds `127.0.0.1:0` and spawns the server on the current runtime.
    pub async fn start(status: u16, content_type: &'static str, body: &'static str) -> Self {
        let listener = bind_loopback().await;
        let stats = Arc::new(ConnStats::default());
        let svc_stats = stats.clone();
        let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
            svc_stats.requests.fetch_add(1, Ordering::SeqCst);
            let response = Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(http_body_util::Full::new(Bytes::from_static(
                    body.as_bytes(),
                )))
                .expect("valid response");
            std::future::ready(Ok::<_, Infallible>(response))
        });
        FixedServer {
            core: ServerCore::serve(listener, svc, stats),
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.core.addr, path)
    }

    /// Requests received since start.
    pub fn total_requests(&self) -> usize {
        self.core.stats.requests.load(Ordering::SeqCst)
    }
}
