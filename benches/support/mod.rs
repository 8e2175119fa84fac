//! Shared by the loopback benchmarks (`end_to_end`, `rotation`): the
//! loopback server of the integration tests, a closed-loop load generator,
//! percentiles, and the command-line handling of the custom harnesses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;
use tower::{Service, ServiceExt};

// The loopback server and its body come from the integration tests' helpers.
#[path = "../../tests/test_utils/mod.rs"]
mod test_utils;

pub use test_utils::StreamServer as Server;

/// The length of the response body: small, as for an API call.
pub const BODY_LEN: usize = 31;

/// What the server sends: one chunk of [`BODY_LEN`] bytes.
static BODY: LazyLock<Vec<u8>> = LazyLock::new(|| test_utils::expected_body(1, BODY_LEN));

/// The URI at which `server` answers every request with one chunk of
/// [`BODY_LEN`] bytes.
pub fn uri(server: &Server) -> http::Uri {
    server.uri(&format!("/?chunks=1&chunk-size={BODY_LEN}"))
}

/// No single request may take longer than this; one that does is counted
/// as an error and the load goes on.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How a custom harness was invoked.
///
/// `cargo bench` passes `--bench`; `cargo test --bench NAME` passes nothing.
/// A smoke run (short, for CI) is chosen by `--quick` (criterion's flag,
/// which `cargo bench -- --quick` passes to every bench), `--smoke`,
/// `--test`, `BENCH_SMOKE=1`, or by running without `--bench`. Any other
/// argument (a criterion filter, `--noplot`, ...) is ignored.
pub fn smoke_mode() -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |flag: &str| args.iter().any(|arg| arg == flag);
    let env = std::env::var("BENCH_SMOKE").is_ok_and(|value| !value.is_empty() && value != "0");
    env || has("--quick") || has("--smoke") || has("--test") || !has("--bench")
}

/// The client under test.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A hyper-util client with a fresh (cold) pool.
///
/// `TCP_NODELAY` is set, as the server does: without it, Nagle's algorithm
/// against delayed ACKs adds 40 ms stalls to the first requests on a new
/// HTTP/2 connection, which would swamp what these benchmarks measure.
pub fn http_client(http2_only: bool) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .http2_only(http2_only)
        .build(connector)
}

/// A GET of `uri`.
pub fn request(uri: &http::Uri) -> Request<Empty<Bytes>> {
    Request::get(uri.clone())
        .body(Empty::new())
        .expect("a valid request")
}

/// One request through `service`, body read to the end. Checks the body.
pub async fn fetch<S, B>(service: &mut S, uri: &http::Uri) -> Result<(), String>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Display,
    B: Body,
    B::Error: std::fmt::Display,
{
    let exchange = async {
        let response = service
            .ready()
            .await
            .map_err(|error| error.to_string())?
            .call(request(uri))
            .await
            .map_err(|error| error.to_string())?;
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| error.to_string())?
            .to_bytes();
        if body != BODY.as_slice() {
            return Err(format!("unexpected body of {} bytes", body.len()));
        }
        Ok(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no response within {REQUEST_TIMEOUT:?}"))?
}

/// One finished request: when it started and how long it took.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Which load task sent it.
    pub task: usize,
    pub start: Instant,
    pub latency: Duration,
}

/// What a load run measured.
#[derive(Debug, Default)]
pub struct Load {
    pub samples: Vec<Sample>,
    pub errors: usize,
    pub first_error: Option<String>,
}

impl Load {
    pub fn merge(&mut self, other: Load) {
        self.samples.extend(other.samples);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// A closed loop of `concurrency` tasks, each with its own clone of
/// `service`, each sending its next request as soon as the previous body
/// has been read, until `stop` is set.
pub struct LoadGenerator {
    stop: Arc<AtomicBool>,
    workers: JoinSet<Load>,
}

impl LoadGenerator {
    pub fn start<S, B>(service: &S, uri: &http::Uri, concurrency: usize) -> Self
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Display,
        B: Body + Send,
        B::Data: Send,
        B::Error: std::fmt::Display,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = JoinSet::new();
        for task in 0..concurrency {
            let mut service = service.clone();
            let uri = uri.clone();
            let stop = Arc::clone(&stop);
            workers.spawn(async move {
                let mut load = Load {
                    samples: Vec::with_capacity(64 * 1024),
                    ..Load::default()
                };
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    match fetch(&mut service, &uri).await {
                        Ok(()) => load.samples.push(Sample {
                            task,
                            start,
                            latency: start.elapsed(),
                        }),
                        Err(error) => {
                            load.errors += 1;
                            load.first_error.get_or_insert(error);
                        }
                    }
                }
                load
            });
        }
        LoadGenerator { stop, workers }
    }

    /// Stops the load and collects what every task measured.
    pub async fn finish(mut self) -> Load {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Load::default();
        // Each task ends within one request, which is bounded by
        // `REQUEST_TIMEOUT`.
        while let Some(load) = self.workers.join_next().await {
            total.merge(load.expect("a load task"));
        }
        total
    }

    /// Runs the load for `duration`.
    pub async fn run<S, B>(
        service: &S,
        uri: &http::Uri,
        concurrency: usize,
        duration: Duration,
    ) -> Load
    where
        S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send,
        S::Error: std::fmt::Display,
        B: Body + Send,
        B::Data: Send,
        B::Error: std::fmt::Display,
    {
        let generator = Self::start(service, uri, concurrency);
        tokio::time::sleep(duration).await;
        generator.finish().await
    }
}

/// The `q`-quantile (nearest rank) of `latencies`, which must be sorted.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The latencies of `samples`, sorted.
pub fn sorted_latencies<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Vec<Duration> {
    let mut latencies: Vec<Duration> = samples.into_iter().map(|sample| sample.latency).collect();
    latencies.sort_unstable();
    latencies
}

/// Milliseconds with three decimals, for tables.
pub fn ms(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1e3)
}

/// The machine, for the record: logical CPUs and the CPU model.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpus} logical CPUs, {model}")
}

/// A multi-threaded runtime with one worker per CPU (at most 2, the size of
/// the CI machine), shared by server and clients.
pub fn runtime() -> tokio::runtime::Runtime {
    let workers = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .min(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("a multi-threaded runtime")
}
