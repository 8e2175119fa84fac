//! Reading bodies, deterministic randomness, waiting, and the load of the rotation-under-load tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Empty};

use super::{
    expected_body, stream_request, BoxError, DEFAULT_CHUNKS, DEFAULT_CHUNK_DELAY_MS,
    DEFAULT_CHUNK_SIZE,
};

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
