//! Shared support code for the integration tests (`mod test_utils;`).
//!
//! Everything here binds to `127.0.0.1:0` and runs on the *current* tokio
//! runtime. All delays use `tokio::time`, so the servers also work under a
//! paused clock (but do not wrap real socket I/O in `tokio::time::timeout`
//! while the clock is paused: auto-advance fires the timeout whenever the
//! runtime idles waiting for the kernel).
//!
//! Contents:
//! * [`StreamServer`]: hyper 1.x server (HTTP/1.1 + h2c prior knowledge) that
//!   streams a deterministic chunked body ([`expected_body`]), with
//!   connection counters, [`StreamServer::kill_connections`] and shutdown.
//! * [`AbortOnDropClient`]: minimal hyper client whose connection tasks are
//!   aborted when its last clone is dropped (simulates a client that closes
//!   its pool on eviction and cuts in-flight streams), plus [`LiveCounter`].
//! * [`read_body`], [`read_body_with_trailers`], [`read_at_least`].
//! * [`HealthServer`]: gRPC `grpc.health.v1.Health` (tonic-health) server.
//! * [`StreamServer::start_on`]: restart a server on the address of one
//!   that was shut down.
//! * [`XorShift`]: a tiny deterministic PRNG for reproducible load.
//! * [`wait_until`], [`run_streams`], and [`long_streams`], the load of the
//!   rotation-under-load tests, checked with [`StreamsOutcome::assert_none_cut`].
//! * [`RetireLog`]: an `on_retire` hook that records every retirement.
//! * [`FixedServer`]: hyper server answering every request with one fixed
//!   status, content type and body (JSON for reqwest's `json()`).
//!
//! # tonic 0.14 API notes (checked against tonic 0.14.9 / tonic-health 0.14.9)
//!
//! * `tonic::transport::Endpoint::from_shared(s: impl Into<Bytes>) -> Result<Endpoint, tonic::transport::Error>`
//!   (a `String` works; also `Endpoint::from_static(&'static str)` and
//!   `TryFrom<String | &'static str | Bytes>`). `endpoint.connect().await ->
//!   Result<Channel, tonic::transport::Error>` dials eagerly;
//!   `endpoint.connect_lazy() -> Channel` is sync and infallible and dials on
//!   first use (it must be called inside a tokio runtime because the Buffer
//!   worker is spawned immediately). `Channel: Clone` and implements
//!   `Service<http::Request<tonic::body::Body>, Response =
//!   http::Response<tonic::body::Body>, Error = tonic::transport::Error>`.
//!   The Channel adds the endpoint's scheme+authority ("origin") to every
//!   request itself.
//! * Generated client `tonic_health::pb::health_client::HealthClient<T>`:
//!   `new(inner: T)`, `with_origin(inner: T, origin: Uri)` require
//!   ```text
//!   T: tonic::client::GrpcService<tonic::body::Body>,
//!   T::Error: Into<StdError>,                       // StdError = Box<dyn Error + Send + Sync>
//!   T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
//!   <T::ResponseBody as http_body::Body>::Error: Into<StdError> + Send,
//!   ```
//!   `GrpcService` has a blanket impl, so a custom tower service qualifies iff
//!   ```text
//!   S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
//!   S::Error: Into<Box<dyn Error + Send + Sync>>,
//!   ResBody: http_body::Body<Data = Bytes> + Send + 'static,
//!   ResBody::Error: Into<Box<dyn Error + Send + Sync>> + Send,
//!   ```
//!   No `Clone`, `Send` or `Sync` is required by the client itself
//!   (`HealthClient<T>: Clone` iff `T: Clone`); to `tokio::spawn` an RPC future
//!   you additionally need `S: Send` and `S::Future: Send`. Requests are
//!   `http::Request<tonic::body::Body>` (`tonic::body::Body` is `Send + Unpin`,
//!   not `Sync`) with method POST, version HTTP_2, `te: trailers`,
//!   `content-type: application/grpc`, and a URI built from the client's
//!   origin: with `HealthClient::new` the origin is `Uri::default()`, so the
//!   URI is *relative* (`/grpc.health.v1.Health/Check`). A raw hyper/h2
//!   transport then fails with "request URI missing scheme and authority";
//!   either use `with_origin(svc, "http://127.0.0.1:port".parse()?)` or add
//!   the authority in the service ([`AbortOnDropClient`] does the latter).
//!   `poll_ready` is driven via `Grpc::ready()` before every call; its error
//!   becomes `Status::unknown("Service was not ready: ..")`. Errors from
//!   `call` and from the response body go through `Status::from_error`:
//!   a `Status` in the source chain is used as is, `hyper::Error`/`h2::Error`
//!   are mapped (e.g. to UNAVAILABLE / CANCELLED / INTERNAL), anything else is
//!   `Code::Unknown`.
//! * Unary (`check`) returns `Result<tonic::Response<HealthCheckResponse>,
//!   tonic::Status>`; the gRPC status from headers ("trailers-only") or from
//!   the trailers is turned into `Err(Status)`, e.g. `Check` for an unknown
//!   service gives `Code::NotFound`. `HealthCheckResponse { status: i32 }`
//!   (compare with `ServingStatus::Serving as i32`, or use
//!   `resp.status()` which returns the `pb::health_check_response::ServingStatus`
//!   enum).
//! * Server streaming (`watch`) returns `Result<tonic::Response<
//!   tonic::codec::Streaming<HealthCheckResponse>>, Status>`. `Streaming<T>`
//!   has `async fn message(&mut self) -> Result<Option<T>, Status>` (`Ok(None)`
//!   = clean end with grpc-status 0, `Err(status)` = non-OK grpc-status in
//!   trailers or a transport/body error such as a killed connection) and
//!   `async fn trailers(&mut self) -> Result<Option<tonic::metadata::MetadataMap>, Status>`
//!   (drains remaining messages first); it also implements
//!   `tokio_stream::Stream<Item = Result<T, Status>>` (re-exported as
//!   `tonic::codegen::tokio_stream`). Watch sends the current status
//!   immediately and then one message per status change; it never ends on
//!   its own.
//! * Server side: `tonic_health::server::health_reporter() -> (HealthReporter,
//!   HealthServer<impl Health>)`; `HealthReporter::set_service_status(name,
//!   tonic_health::ServingStatus)` (async), `set_serving::<S: NamedService>()`,
//!   `set_not_serving::<S>()`, `clear_service_status(&mut self, name)`. The
//!   service `""` starts as SERVING. The generated `HealthServer<T>` is
//!   `Clone` and implements `Service<http::Request<B>>` for any
//!   `B: Body + Send + 'static, B::Error: Into<StdError> + Send + 'static`
//!   (so it can be served directly by hyper with `Incoming` bodies, which is
//!   what [`HealthServer`] does to keep connections abortable).
//!   With `tonic::transport::Server::builder().add_service(svc)` one gets a
//!   `Router` with `serve_with_incoming(incoming)` /
//!   `serve_with_incoming_shutdown(incoming, signal)`, where
//!   `incoming: Stream<Item = Result<IO, IE>>`,
//!   `IO: AsyncRead + AsyncWrite + tonic::transport::server::Connected + Unpin + Send + 'static`;
//!   `tonic::transport::server::TcpIncoming::from(tokio::net::TcpListener)`
//!   (or `TcpIncoming::bind(addr)`) provides it, so no tokio-stream
//!   dependency is needed. However that server spawns every connection with a
//!   detached `tokio::spawn` and graceful shutdown waits for open Watch
//!   streams, so connections cannot be killed; hence the hyper loop here.

#![allow(dead_code)]

use std::collections::BTreeSet;
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
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tower_rotating_client::RetiredGeneration;

/// Boxed error used by the helpers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

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

/// Accept loop + per-connection tasks shared by [`StreamServer`] and [`HealthServer`].
struct ServerCore {
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

    async fn wait_for_open(&self, n: usize) {
        while self.stats.open.load(Ordering::SeqCst) != n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn shutdown(&self) {
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

    fn on_listener(listener: TcpListener) -> Self {
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

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.core.addr
    }

    /// `http://127.0.0.1:<port><path>` (`path` should start with `/`; may
    /// contain a query).
    pub fn uri(&self, path: &str) -> Uri {
        format!("http://{}{}", self.core.addr, path)
            .parse()
            .expect("valid uri")
    }

    /// Currently open TCP connections (decremented when the connection task ends).
    pub fn open_connections(&self) -> usize {
        self.core.stats.open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start.
    pub fn total_connections(&self) -> usize {
        self.core.stats.total.load(Ordering::SeqCst)
    }

    /// Requests received since start.
    pub fn total_requests(&self) -> usize {
        self.core.stats.requests.load(Ordering::SeqCst)
    }

    /// Polls (every 1 ms of tokio time) until `open_connections() == n`.
    /// Unbounded: wrap it in `tokio::time::timeout`.
    pub async fn wait_for_open_connections(&self, n: usize) {
        self.core.wait_for_open(n).await
    }

    /// Aborts all live connection tasks (simulates the server dying
    /// mid-stream); keeps accepting new connections.
    pub fn kill_connections(&self) {
        self.core.conns.abort_all();
    }

    /// Stops accepting and aborts all connection tasks. Idempotent; also done on Drop.
    pub fn shutdown(&self) {
        self.core.shutdown();
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
// AbortOnDropClient
// ---------------------------------------------------------------------------

/// Counts live [`AbortOnDropClient`]s: incremented on construction,
/// decremented when the last clone of a client is dropped. Clones share the
/// counts.
#[derive(Clone, Debug, Default)]
pub struct LiveCounter {
    live: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
}

impl LiveCounter {
    /// New counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Clients constructed and not yet dropped.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Clients ever constructed with this counter.
    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// Clients constructed and already dropped.
    pub fn dropped(&self) -> usize {
        self.created() - self.live()
    }
}

/// HTTP protocol used by an [`AbortOnDropClient`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    /// `hyper::client::conn::http1`: a fresh TCP connection per request.
    Http1,
    /// `hyper::client::conn::http2` (h2c prior knowledge): one shared
    /// connection per client, opened lazily on first request and re-opened if
    /// it was closed.
    Http2,
}

/// Minimal HTTP client that owns its connection tasks: when the **last
/// clone** is dropped every connection task (and, for h2, every task hyper
/// spawned for it) is aborted, so in-flight response bodies fail with an
/// error. Response bodies do not keep the client alive; the response
/// *future* holds a clone until the response head arrives.
///
/// * Body type: generic `B` (default `http_body_util::Empty<Bytes>`); any
///   `B: Body + Send + Unpin + 'static, B::Data: Send, B::Error: Into<BoxError>`
///   works, e.g. `tonic::body::Body` for use as a gRPC transport (h2).
/// * `Response = http::Response<hyper::body::Incoming>`, `Error = BoxError`,
///   `Future = Pin<Box<dyn Future + Send>>`; `poll_ready` is always ready.
/// * Caveat: `client.oneshot(req)` consumes that handle, so if it was the
///   last clone the body is cut as soon as the response head arrives; keep a
///   clone alive (`client.clone().oneshot(req)`) while reading the body.
/// * URIs: for h2 a relative URI gets `http://<addr>` added (so tonic clients
///   built with `new` work); for h1 the request is sent in origin-form with a
///   `Host` header. Every request gets [`H_CLIENT_ID`]` = id()`.
pub struct AbortOnDropClient<B = Empty<Bytes>> {
    inner: Arc<ClientInner<B>>,
}

struct ClientInner<B> {
    id: usize,
    addr: SocketAddr,
    version: HttpVersion,
    tasks: TaskTracker,
    h2: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<B>>>,
    connections: AtomicUsize,
    counter: LiveCounter,
}

impl<B> Drop for ClientInner<B> {
    fn drop(&mut self) {
        self.tasks.close();
        self.counter.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B> Clone for AbortOnDropClient<B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<B> std::fmt::Debug for AbortOnDropClient<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AbortOnDropClient")
            .field("id", &self.inner.id)
            .field("addr", &self.inner.addr)
            .field("version", &self.inner.version)
            .finish()
    }
}

impl AbortOnDropClient<Empty<Bytes>> {
    /// HTTP/1.1 client (`Empty<Bytes>` bodies). Synchronous; counts itself in `counter`.
    pub fn new(addr: SocketAddr, counter: LiveCounter) -> Self {
        Self::with_version(addr, counter, HttpVersion::Http1)
    }

    /// HTTP/2 (h2c) client (`Empty<Bytes>` bodies).
    pub fn new_h2(addr: SocketAddr, counter: LiveCounter) -> Self {
        Self::with_version(addr, counter, HttpVersion::Http2)
    }
}

impl<B> AbortOnDropClient<B> {
    /// Client with an explicit body type and protocol, e.g.
    /// `AbortOnDropClient::<tonic::body::Body>::with_version(addr, c, HttpVersion::Http2)`.
    pub fn with_version(addr: SocketAddr, counter: LiveCounter, version: HttpVersion) -> Self {
        let id = counter.created.fetch_add(1, Ordering::SeqCst);
        counter.live.fetch_add(1, Ordering::SeqCst);
        Self {
            inner: Arc::new(ClientInner {
                id,
                addr,
                version,
                tasks: TaskTracker::default(),
                h2: tokio::sync::Mutex::new(None),
                connections: AtomicUsize::new(0),
                counter,
            }),
        }
    }

    /// Id of this client (0-based construction order within its counter).
    pub fn id(&self) -> usize {
        self.inner.id
    }

    /// Protocol of this client.
    pub fn version(&self) -> HttpVersion {
        self.inner.version
    }

    /// Server address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// TCP connections this client has opened.
    pub fn connections_opened(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Connection-related tasks currently alive.
    pub fn live_tasks(&self) -> usize {
        self.inner.tasks.live_tasks()
    }

    /// Number of clones of this client currently alive (including in-flight
    /// response futures).
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }
}

impl<B> ClientInner<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn dial(&self) -> Result<TokioIo<TcpStream>, BoxError> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        self.connections.fetch_add(1, Ordering::SeqCst);
        Ok(TokioIo::new(tcp))
    }

    async fn send(&self, mut req: Request<B>) -> Result<Response<Incoming>, BoxError> {
        req.headers_mut()
            .insert(H_CLIENT_ID, HeaderValue::from(self.id));
        match self.version {
            HttpVersion::Http1 => {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|pq| pq.as_str().to_owned())
                    .unwrap_or_else(|| "/".to_owned());
                *req.uri_mut() = pq.parse()?;
                *req.version_mut() = http::Version::HTTP_11;
                if !req.headers().contains_key(http::header::HOST) {
                    let host = HeaderValue::from_str(&self.addr.to_string())?;
                    req.headers_mut().insert(http::header::HOST, host);
                }
                let io = self.dial().await?;
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
                self.tasks.spawn(async move {
                    let _ = conn.await;
                });
                sender.ready().await?;
                Ok(sender.send_request(req).await?)
            }
            HttpVersion::Http2 => {
                if req.uri().authority().is_none() {
                    let pq = req
                        .uri()
                        .path_and_query()
                        .map(|pq| pq.as_str().to_owned())
                        .unwrap_or_else(|| "/".to_owned());
                    *req.uri_mut() = format!("http://{}{}", self.addr, pq).parse()?;
                }
                let mut sender = {
                    let mut slot = self.h2.lock().await;
                    match slot.as_ref() {
                        Some(s) if !s.is_closed() => s.clone(),
                        _ => {
                            let io = self.dial().await?;
                            let (sender, conn) =
                                hyper::client::conn::http2::handshake(self.tasks.clone(), io)
                                    .await?;
                            self.tasks.spawn(async move {
                                let _ = conn.await;
                            });
                            *slot = Some(sender.clone());
                            sender
                        }
                    }
                };
                sender.ready().await?;
                Ok(sender.send_request(req).await?)
            }
        }
    }
}

impl<B> tower::Service<Request<B>> for AbortOnDropClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(req).await })
    }
}

// ---------------------------------------------------------------------------
// Body helpers
// ---------------------------------------------------------------------------

/// Collects a whole body into bytes (trailers are discarded).
pub async fn read_body<B>(body: B) -> Result<Vec<u8>, BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let collected = body.collect().await.map_err(Into::into)?;
    Ok(collected.to_bytes().to_vec())
}

/// Collects a whole body and returns its trailers, if any.
pub async fn read_body_with_trailers<B>(body: B) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let collected = body.collect().await.map_err(Into::into)?;
    let trailers = collected.trailers().cloned();
    Ok((collected.to_bytes().to_vec(), trailers))
}

/// Reads data frames until at least `n` bytes were received (or the body
/// ends) and returns them; the rest of the body can be read afterwards.
pub async fn read_at_least<B>(body: &mut B, n: usize) -> Result<Vec<u8>, BoxError>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let mut out = Vec::new();
    while out.len() < n {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(mut data) = frame.into_data() {
                    use bytes::Buf;
                    while data.has_remaining() {
                        let c = data.chunk();
                        out.extend_from_slice(c);
                        let len = c.len();
                        data.advance(len);
                    }
                }
            }
        }
    }
    Ok(out)
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

    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.core.addr
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

    /// Currently open TCP connections.
    pub fn open_connections(&self) -> usize {
        self.core.stats.open.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start.
    pub fn total_connections(&self) -> usize {
        self.core.stats.total.load(Ordering::SeqCst)
    }

    /// Polls (every 1 ms of tokio time) until `open_connections() == n`.
    pub async fn wait_for_open_connections(&self, n: usize) {
        self.core.wait_for_open(n).await
    }

    /// Aborts all live connections (Watch streams see an error); keeps accepting.
    pub fn kill_connections(&self) {
        self.core.conns.abort_all();
    }

    /// Stops accepting and aborts all connections. Idempotent; also done on Drop.
    pub fn shutdown(&self) {
        self.core.shutdown();
    }
}

// ---------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------

/// xorshift64*: a tiny deterministic PRNG, so that a failing load test
/// replays exactly from its seed.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (zero is remapped: xorshift needs a nonzero state).
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

// ---------------------------------------------------------------------------
// Waiting and load
// ---------------------------------------------------------------------------

/// Polls `condition` every millisecond until it holds; panics with `what`
/// after `limit` (real time: do not use under a paused clock with real I/O).
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Result of [`run_streams`].
#[derive(Debug, Default)]
pub struct StreamsOutcome {
    /// Streams whose body arrived complete and byte-exact.
    pub complete: usize,
    /// Streams that did not: request error, body error, wrong or short
    /// body, or timeout. One line each, saying why.
    pub broken: Vec<String>,
}

impl StreamsOutcome {
    /// Asserts that all `total` streams arrived whole: none was cut by a
    /// rotation. `context` starts each message.
    pub fn assert_none_cut(&self, total: usize, context: &str) {
        assert_eq!(
            self.broken,
            Vec::<String>::new(),
            "{context}: no stream may be cut by a rotation"
        );
        assert_eq!(self.complete, total, "{context}: every stream complete");
    }
}

/// Sends `total` requests made by `make_request(i)` through clones of
/// `svc`, `concurrency` at a time (one task per worker, each with its own
/// clone), reads every body to its end and compares it with `expected`.
///
/// Each stream is bounded by `per_stream` (request and body). Every clone
/// of `svc`, including the one passed in, is dropped before this returns.
pub async fn run_streams<S, B, M>(
    svc: S,
    total: usize,
    concurrency: usize,
    per_stream: Duration,
    make_request: M,
    expected: Vec<u8>,
) -> StreamsOutcome
where
    S: tower::Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    M: Fn(usize) -> Request<Empty<Bytes>> + Send + Sync + 'static,
{
    use tower::ServiceExt;

    let next = Arc::new(AtomicUsize::new(0));
    let make_request = Arc::new(make_request);
    let expected = Arc::new(expected);
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut svc = svc.clone();
            let next = Arc::clone(&next);
            let make_request = Arc::clone(&make_request);
            let expected = Arc::clone(&expected);
            tokio::spawn(async move {
                let mut outcome = StreamsOutcome::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let one = async {
                        let svc = svc.ready().await.map_err(Into::into)?;
                        let response = svc.call(make_request(i)).await.map_err(Into::into)?;
                        read_body(response.into_body()).await
                    };
                    match tokio::time::timeout(per_stream, one).await {
                        Ok(Ok(body)) if body == *expected => outcome.complete += 1,
                        Ok(Ok(body)) => outcome.broken.push(format!(
                            "stream {i}: wrong body, {} of {} bytes",
                            body.len(),
                            expected.len()
                        )),
                        Ok(Err(error)) => outcome.broken.push(format!("stream {i}: {error}")),
                        Err(_) => outcome.broken.push(format!("stream {i}: timed out")),
                    }
                }
                outcome
            })
        })
        .collect();
    drop(svc);

    let mut outcome = StreamsOutcome::default();
    for worker in workers {
        let part = worker.await.expect("stream worker panicked");
        outcome.complete += part.complete;
        outcome.broken.extend(part.broken);
    }
    outcome
}

/// Bounds one stream of [`long_streams`].
pub const STREAM_LIMIT: Duration = Duration::from_secs(10);
/// Bounds a whole [`long_streams`] load.
pub const LOAD_LIMIT: Duration = Duration::from_secs(40);

/// The load of the rotation-under-load tests: `total` streams from `uri`
/// (a [`StreamServer`]'s), each of the default shape ([`DEFAULT_CHUNKS`]
/// chunks [`DEFAULT_CHUNK_DELAY_MS`] apart: about 300 ms), sent through
/// `svc` `concurrency` at a time by [`run_streams`].
///
/// Each stream is bounded by [`STREAM_LIMIT`]; panics if the whole load
/// takes longer than [`LOAD_LIMIT`].
pub async fn long_streams<S, B>(
    svc: S,
    uri: Uri,
    total: usize,
    concurrency: usize,
) -> StreamsOutcome
where
    S: tower::Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let load = run_streams(
        svc,
        total,
        concurrency,
        STREAM_LIMIT,
        move |_| {
            stream_request(
                uri.clone(),
                DEFAULT_CHUNKS,
                DEFAULT_CHUNK_DELAY_MS,
                DEFAULT_CHUNK_SIZE,
            )
        },
        expected_body(DEFAULT_CHUNKS, DEFAULT_CHUNK_SIZE),
    );
    tokio::time::timeout(LOAD_LIMIT, load)
        .await
        .expect("the load finished in time")
}

// ---------------------------------------------------------------------------
// Retirements
// ---------------------------------------------------------------------------

/// Records every retirement that a rotating client's retire hook sees
/// (see [`RetireLog::hook`]). Clones share the record.
#[derive(Clone, Default)]
pub struct RetireLog(Arc<Mutex<Vec<RetiredGeneration>>>);

impl RetireLog {
    /// A hook for `RotatingClientLayer::on_retire`: drops the retired client
    /// at once (a pooled client closes its idle connections with it) and
    /// records the generation.
    pub fn hook<S>(&self) -> impl Fn(S, RetiredGeneration) + Send + Sync + 'static {
        let log = Arc::clone(&self.0);
        move |client, generation| {
            drop(client);
            log.lock().expect("not poisoned").push(generation);
        }
    }

    /// Every retirement so far, in the order they happened.
    pub fn all(&self) -> Vec<RetiredGeneration> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// The ids of the retired generations, in the order they retired.
    pub fn ids(&self) -> Vec<u64> {
        self.all().iter().map(|generation| generation.id).collect()
    }

    /// Whether exactly the generations before `current` (`1..current`)
    /// retired, each once, in any order.
    pub fn is_all_before(&self, current: u64) -> bool {
        let mut ids = self.ids();
        ids.sort_unstable();
        ids == (1..current).collect::<Vec<_>>()
    }

    /// Asserts that `count` generations retired, each exactly once, each
    /// drained (not forced, nothing in flight), and returns their ids.
    pub fn assert_each_once(&self, count: u64) -> BTreeSet<u64> {
        let all = self.all();
        let ids: BTreeSet<u64> = all.iter().map(|generation| generation.id).collect();
        assert_eq!(ids.len(), all.len(), "a generation retired twice: {all:?}");
        assert_eq!(all.len() as u64, count, "retirements: {all:?}");
        for generation in &all {
            assert!(
                !generation.forced && generation.in_flight_at_retire == 0,
                "retired while in use: {generation:?}"
            );
        }
        ids
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
