//! A minimal hyper client that cuts its streams when its last clone is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{BoxError, TaskTracker, H_CLIENT_ID};

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
