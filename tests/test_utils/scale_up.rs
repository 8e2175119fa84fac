//! Backends added behind a name: three [`StreamServer`]s on 127.0.0.1-3
//! reached by one made-up name, and a resolver that lists only the first
//! until [`ScaleUpDns::scale_up`] (a `Service<Name>` for hyper-util's
//! `HttpConnector::new_with_resolver`, and with the `reqwest` feature a
//! `reqwest::dns::Resolve` for `ClientBuilder::dns_resolver`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use tokio::net::TcpListener;

use super::StreamServer;

/// The made-up host name that only [`ScaleUpDns`] resolves.
pub const BACKENDS_HOST: &str = "backends.test";

/// Three [`StreamServer`]s on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (Linux
/// loopback answers all of 127/8), all on the same port, so that any client
/// reaches them as `http://backends.test:PORT/` whatever it does with a
/// port from its resolver. Each counts its own requests.
pub struct Backends {
    servers: Vec<StreamServer>,
}

impl Backends {
    /// Binds port 0 on 127.0.0.1, then that port on .2 and .3, trying
    /// another port if one of those is taken.
    pub async fn start() -> Self {
        for _ in 0..20 {
            let first = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1:0");
            let port = first.local_addr().expect("local_addr").port();
            let mut listeners = vec![first];
            for ip in ["127.0.0.2", "127.0.0.3"] {
                match TcpListener::bind((ip, port)).await {
                    Ok(listener) => listeners.push(listener),
                    Err(_) => break,
                }
            }
            if listeners.len() == 3 {
                let servers = listeners.into_iter().map(StreamServer::on_listener);
                return Backends {
                    servers: servers.collect(),
                };
            }
        }
        panic!("no port free on all of 127.0.0.1, 127.0.0.2 and 127.0.0.3 in 20 tries");
    }

    /// The backends' addresses, backend 1 first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|server| server.addr()).collect()
    }

    /// `http://backends.test:PORT<path>`.
    pub fn uri(&self, path: &str) -> Uri {
        let port = self.servers[0].addr().port();
        format!("http://{BACKENDS_HOST}:{port}{path}")
            .parse()
            .expect("valid uri")
    }

    /// Requests each backend has received, backend 1 first.
    pub fn requests(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.servers[i].total_requests())
    }
}

/// The resolver a scale-up test controls: [`BACKENDS_HOST`] resolves to
/// backend 1 alone until [`ScaleUpDns::scale_up`], then to all three, the
/// list rotated by one per lookup (round robin) so that new connections
/// spread; any other name fails. Clones share the records and the
/// round-robin position.
///
/// Implements `tower::Service<Name>`, hyper-util's resolver hook, and with
/// the `reqwest` feature `reqwest::dns::Resolve`, reqwest's; other clients
/// wrap [`ScaleUpDns::lookup`] in their own.
#[derive(Clone, Debug)]
pub struct ScaleUpDns {
    backends: Arc<Vec<SocketAddr>>,
    scaled_up: Arc<AtomicBool>,
    lookups: Arc<AtomicUsize>,
}

impl ScaleUpDns {
    /// Records for `backends` (backend 1 first), listing only backend 1.
    pub fn new(backends: Vec<SocketAddr>) -> Self {
        ScaleUpDns {
            backends: Arc::new(backends),
            scaled_up: Arc::default(),
            lookups: Arc::default(),
        }
    }

    /// From now on, list every backend.
    pub fn scale_up(&self) {
        self.scaled_up.store(true, Ordering::SeqCst);
    }

    /// Lookups answered so far.
    pub fn lookups(&self) -> usize {
        self.lookups.load(Ordering::SeqCst)
    }

    /// Resolves `host`: the listed backends, starting one further on at
    /// each lookup.
    pub fn lookup(&self, host: &str) -> std::io::Result<Vec<SocketAddr>> {
        if host != BACKENDS_HOST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host}: unknown host"),
            ));
        }
        let listed = if self.scaled_up.load(Ordering::SeqCst) {
            self.backends.len()
        } else {
            1
        };
        let start = self.lookups.fetch_add(1, Ordering::SeqCst) % listed;
        Ok((0..listed)
            .map(|i| self.backends[(start + i) % listed])
            .collect())
    }
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for ScaleUpDns {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        std::future::ready(self.lookup(name.as_str()).map(Vec::into_iter))
    }
}

/// reqwest's resolver hook (`ClientBuilder::dns_resolver`): the same
/// [`ScaleUpDns::lookup`], answered at once.
#[cfg(feature = "reqwest")]
impl reqwest::dns::Resolve for ScaleUpDns {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addrs = self
            .lookup(name.as_str())
            .map(|addrs| Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
            .map_err(Into::into);
        Box::pin(std::future::ready(addrs))
    }
}
