//! The loopback world both acts run in: act 1's streaming server, act 2's
//! three backends and the resolver that puts them behind one name, and the
//! error type and message the request loops report with.

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame};
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio::time::{Interval, MissedTickBehavior};
use tower::Service;

pub type BoxError = Box<dyn Error + Send + Sync>;

/// One event of a chat completion stream, as act 1's server sends it.
pub const CHUNK: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"token\"}}]}\n\n";

/// `e` and its sources, `: `-separated.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text += &format!(": {e}");
        source = e.source();
    }
    text
}

// ---------------------------------------------------------------------------
// Act 1's server: `chunks` chunks, `chunk_delay` apart.
// ---------------------------------------------------------------------------

/// An HTTP/1.1 server on 127.0.0.1 answering every request with a stream
/// of `chunks` [`CHUNK`]s, `chunk_delay` apart; stops accepting when
/// dropped.
pub struct StreamServer {
    pub addr: SocketAddr,
    accept: AbortHandle,
}

impl StreamServer {
    pub async fn start(chunks: u64, chunk_delay: Duration) -> std::io::Result<Self> {
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
                    let mut tick = tokio::time::interval(chunk_delay.max(Duration::from_micros(1)));
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    let chunks = Chunks { left: chunks, tick };
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
// Act 2's backends, behind one name.
// ---------------------------------------------------------------------------

/// The made-up name the backends are reached by; only [`Dns`] knows it.
pub const BACKENDS_HOST: &str = "backends.test";
/// Response header carrying the index (1-based) of the backend that served.
pub const BACKEND_HEADER: &str = "x-backend";

/// Three small servers, on 127.0.0.1, 127.0.0.2 and 127.0.0.3, all on the
/// same port, so that every client (whatever it does with a port from a
/// resolver) reaches them as `http://backends.test:PORT/`.
pub struct Backends {
    pub addrs: Vec<SocketAddr>,
    accept: Vec<AbortHandle>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backends {
    pub async fn start() -> std::io::Result<Self> {
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
pub struct Dns {
    backends: Arc<Vec<SocketAddr>>,
    scaled_up: Arc<AtomicBool>,
    next: Arc<AtomicUsize>,
}

impl Dns {
    pub fn new(backends: &[SocketAddr]) -> Self {
        Dns {
            backends: Arc::new(backends.to_vec()),
            scaled_up: Arc::default(),
            next: Arc::default(),
        }
    }

    /// The same records, with a round-robin position of its own.
    pub fn for_another_client(&self) -> Self {
        Dns {
            next: Arc::default(),
            ..self.clone()
        }
    }

    pub fn scale_up(&self) {
        self.scaled_up.store(true, Relaxed);
    }

    pub fn lookup(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
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
