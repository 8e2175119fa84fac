//! An LLM gateway: axum in front, a rotating `reqwest::Client` behind, and
//! an upstream API key that changes without a restart.
//!
//! It starts its own upstream on loopback (a completion API that streams
//! server-sent events), a gateway with `POST /v1/messages` and
//! `GET /stats`, then drives load through the gateway: concurrent streams,
//! the key file replaced mid-way, rotations while streams run. It prints
//! what happened, and exits with 1 if a stream was cut or a request sent
//! after the reload reached the upstream with the old key.
//!
//! ```sh
//! cargo run --example reqwest_gateway --features reqwest
//! ```
//!
//! What to copy:
//!
//! - `upstream_client`, the factory: reads the key file and builds a
//!   `reqwest::Client` that sends the key with every request. It returns a
//!   `Result`, so it goes to `try_layer`, called on the layer itself rather
//!   than inside a `ServiceBuilder`; the first build's error reaches
//!   `main`. Every later build runs on Tokio's blocking pool, so reading a
//!   file there stalls no runtime worker.
//! - `watch_key_file`, the reload: polls the file and calls `rotate()` when
//!   its contents change. Requests from then on carry the new key; streams
//!   already running finish on the client they started on.
//! - The stack in `start_gateway`: a retry (through
//!   `reqwest::Request::try_clone`) around a timeout around the rotating
//!   client, boxed. The boxed stack has no `stats()` or `rotate()`, so the
//!   gateway keeps the rotating client itself as a second handle.
//! - `messages`, the handler: JSON in, a `reqwest::Request` out, the
//!   upstream body streamed back as it arrives. tower's timeout covers the
//!   wait for the response head only; the request's own reqwest timeout
//!   covers the whole stream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{stream, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::retry::Policy;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

/// Client TTL. Minutes in production; short here, so that timed rotations
/// happen while streams run.
const TTL: Duration = Duration::from_millis(400);
/// How often the gateway reads the key file.
const KEY_POLL: Duration = Duration::from_millis(50);
/// tower's timeout: the wait for the upstream's response head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// reqwest's per-request timeout: the whole response, body included.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries of a request the upstream turned away.
const RETRIES: u32 = 2;

/// Events per upstream stream, and the time between two of them.
const EVENTS: usize = 8;
const EVENT_GAP: Duration = Duration::from_millis(40);
/// The upstream turns away every `OVERLOAD_EVERY`th first attempt (503).
const OVERLOAD_EVERY: u64 = 7;

/// The load: concurrent streams, for how long, and when the key changes.
const STREAMS: usize = 6;
const LOAD_FOR: Duration = Duration::from_millis(2400);
const KEY_CHANGE_AT: Duration = Duration::from_millis(1000);

/// The header that carries the key, and the one a retry adds.
const API_KEY: &str = "x-api-key";
const RETRY_COUNT: &str = "x-retry-count";

/// Demo keys: compared by the upstream, never printed.
const KEYS: [&str; 2] = ["sk-demo-0a1b2c3d4e5f", "sk-demo-9f8e7d6c5b4a"];
const KEY_NAMES: [&str; 2] = ["old key", "new key"];

#[tokio::main]
async fn main() -> ExitCode {
    // Everything below ends in about three seconds; this bounds it anyway.
    match tokio::time::timeout(Duration::from_secs(20), run()).await {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(error)) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("error: not done within 20 s");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------

/// The upstream stack, boxed: retry, timeout, rotating client.
type UpstreamService = BoxCloneSyncService<reqwest::Request, reqwest::Response, BoxError>;

#[derive(Clone)]
struct Gateway {
    upstream: UpstreamService,
    /// The rotating client inside `upstream`, kept for `stats()` and
    /// `rotate()`, which the boxed stack does not offer.
    client: RotatingClient<reqwest::Client>,
    messages_url: reqwest::Url,
    key_reloads: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
}

/// The factory: a client that sends the key in `key_file` with every
/// request. Called by `try_layer` for the first client, then on Tokio's
/// blocking pool at every rotation.
fn upstream_client(key_file: &Path) -> Result<reqwest::Client, BoxError> {
    let key = std::fs::read_to_string(key_file)?;
    let mut key = HeaderValue::from_str(key.trim())?;
    key.set_sensitive(true);
    let headers = HeaderMap::from_iter([(HeaderName::from_static(API_KEY), key)]);
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    Ok(client)
}

/// Starts the gateway on loopback, in front of `upstream`.
async fn start_gateway(
    upstream: SocketAddr,
    key_file: &Path,
) -> Result<(SocketAddr, Gateway), BoxError> {
    // `try_layer` is called on the layer, outside any `ServiceBuilder`;
    // the rotating client then goes into the stack below.
    let client = RotatingClientLayer::new(TTL).try_layer({
        let key_file = key_file.to_owned();
        move || upstream_client(&key_file)
    })?;

    let retries = Arc::new(AtomicU64::new(0));
    let stack = ServiceBuilder::new()
        .retry(RetryOverloaded {
            attempts_left: RETRIES,
            retries: Arc::clone(&retries),
        })
        .timeout(HEAD_TIMEOUT)
        .service(client.clone());
    let gateway = Gateway {
        upstream: BoxCloneSyncService::new(stack),
        client: client.clone(),
        messages_url: format!("http://{upstream}/v1/messages").parse()?,
        key_reloads: Arc::default(),
        retries,
    };
    tokio::spawn(watch_key_file(
        client,
        key_file.to_owned(),
        Arc::clone(&gateway.key_reloads),
    ));

    let app = Router::new()
        .route("/v1/messages", post(messages))
        .route("/stats", get(stats))
        .with_state(gateway.clone());
    Ok((serve(app).await?, gateway))
}

/// `POST /v1/messages`: forwards the JSON body upstream and streams the
/// answer back as it arrives. The response body holds the client it came
/// from until it ends, whatever rotates meanwhile.
async fn messages(State(gateway): State<Gateway>, Json(body): Json<Value>) -> Response {
    let mut request = reqwest::Request::new(reqwest::Method::POST, gateway.messages_url.clone());
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // A body of bytes, so that `try_clone`, and with it the retry, works.
    *request.body_mut() = Some(body.to_string().into());
    // The whole response, stream included: tower's timeout ends at the head.
    *request.timeout_mut() = Some(STREAM_TIMEOUT);

    let response = match gateway.upstream.oneshot(request).await {
        Ok(response) => response,
        Err(error) => {
            return (StatusCode::BAD_GATEWAY, format!("upstream: {error}\n")).into_response()
        }
    };
    let status = response.status();
    let content_type = response.headers().get(CONTENT_TYPE).cloned();
    let mut forwarded = Response::new(Body::from_stream(response.bytes_stream()));
    *forwarded.status_mut() = status;
    if let Some(content_type) = content_type {
        forwarded.headers_mut().insert(CONTENT_TYPE, content_type);
    }
    forwarded
}

/// `GET /stats`: the rotating client's figures, through the kept handle.
async fn stats(State(gateway): State<Gateway>) -> Json<Value> {
    let stats = gateway.client.stats();
    Json(json!({
        "generation": stats.current_generation.0,
        "rotations": stats.rotations,
        "live_generations": stats.live_generations(),
        "in_flight": stats.in_flight(),
        "failed_builds": stats.failed_builds,
        "key_reloads": gateway.key_reloads.load(Ordering::Relaxed),
        "retries": gateway.retries.load(Ordering::Relaxed),
    }))
}

/// The reload: polls the key file and rotates when its contents change.
/// The next request goes out through a client built with the new key, and
/// streams already running finish on the old one. A SIGHUP handler or a
/// file system watcher would call `rotate()` the same way. Without the
/// need to print the moment of the reload, `rotate_on_change` with a probe
/// that returns the file's digest does this in the layer (the guide's
/// "Credentials without a clock").
async fn watch_key_file(
    client: RotatingClient<reqwest::Client>,
    path: PathBuf,
    reloads: Arc<AtomicU64>,
) {
    let mut seen = tokio::fs::read(&path).await.ok();
    let mut poll = tokio::time::interval(KEY_POLL);
    loop {
        poll.tick().await;
        let Ok(contents) = tokio::fs::read(&path).await else {
            continue; // being replaced: read it again at the next tick
        };
        if seen.as_ref() == Some(&contents) {
            continue;
        }
        match client.rotate().await {
            Ok(generation) => {
                seen = Some(contents);
                reloads.fetch_add(1, Ordering::Relaxed);
                println!(
                    "          gateway: the key file changed; rotated to generation {generation}"
                );
            }
            // The current client keeps serving; try again at the next tick.
            Err(error) => eprintln!("gateway: the key file changed, but the build failed: {error}"),
        }
    }
}

/// Retries a request the upstream turned away with a 503, at most
/// `attempts_left` times: it was not processed, so even a POST is safe to
/// send again. Nothing else is retried: a completion that timed out may
/// have run, and been billed.
#[derive(Clone)]
struct RetryOverloaded {
    attempts_left: u32,
    retries: Arc<AtomicU64>,
}

impl Policy<reqwest::Request, reqwest::Response, BoxError> for RetryOverloaded {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut reqwest::Request,
        result: &mut Result<reqwest::Response, BoxError>,
    ) -> Option<Self::Future> {
        let overloaded = matches!(
            result,
            Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE
        );
        if !overloaded || self.attempts_left == 0 {
            return None;
        }
        self.attempts_left -= 1;
        self.retries.fetch_add(1, Ordering::Relaxed);
        let attempt = RETRIES - self.attempts_left;
        request
            .headers_mut()
            .insert(RETRY_COUNT, HeaderValue::from(attempt));
        Some(tokio::time::sleep(Duration::from_millis(20) * attempt))
    }

    /// `None` for a request with a streaming body: it is sent only once.
    fn clone_request(&mut self, request: &reqwest::Request) -> Option<reqwest::Request> {
        request.try_clone()
    }
}

// ---------------------------------------------------------------------------
// The upstream: a completion API that streams server-sent events
// ---------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Provider {
    first_attempts: Arc<AtomicU64>,
    turned_away: Arc<AtomicU64>,
    /// Requests served, by key, sent before or after the reload.
    served: Arc<Mutex<[[u64; 2]; 2]>>,
    refused: Arc<AtomicU64>,
}

/// The upstream's `POST /v1/messages`: checks the key, turns away every
/// `OVERLOAD_EVERY`th first attempt, and streams `EVENTS` events.
async fn provider_messages(
    State(provider): State<Provider>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let Some(key) = KEYS
        .iter()
        .position(|key| headers.get(API_KEY).is_some_and(|sent| sent == key))
    else {
        provider.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, "unknown API key\n").into_response();
    };
    if !headers.contains_key(RETRY_COUNT)
        && (provider.first_attempts.fetch_add(1, Ordering::Relaxed) + 1) % OVERLOAD_EVERY == 0
    {
        provider.turned_away.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n").into_response();
    }
    let after = body["metadata"]["sent"] == "after the reload";
    provider.served.lock().expect("not poisoned")[usize::from(after)][key] += 1;
    Sse::new(completion_events()).into_response()
}

/// `EVENTS` deltas `EVENT_GAP` apart, then `message_stop`.
fn completion_events() -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    stream::unfold(0, |sent| async move {
        if sent > EVENTS {
            return None;
        }
        tokio::time::sleep(EVENT_GAP).await;
        let event = if sent == EVENTS {
            Event::default().event("message_stop").data("{}")
        } else {
            Event::default()
                .event("content_block_delta")
                .data(json!({ "index": sent, "delta": { "text": "token " } }).to_string())
        };
        Some((Ok(event), sent + 1))
    })
}

// ---------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Outcomes {
    complete: u64,
    cut: u64,
    first_cut: Option<String>,
}

/// One completion through the gateway, read to its end.
async fn one_stream(
    downstream: &reqwest::Client,
    url: &str,
    after_reload: bool,
) -> Result<(), String> {
    let sent = if after_reload {
        "after the reload"
    } else {
        "before the reload"
    };
    let request = json!({
        "model": "demo",
        "stream": true,
        "max_tokens": 64,
        "messages": [{ "role": "user", "content": "Hello" }],
        "metadata": { "sent": sent },
    });
    let response = downstream
        .post(url)
        .json(&request)
        .send()
        .await
        .map_err(|error| format!("no response: {error}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("status {status}: {}", text.trim()));
    }
    let mut text = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        text.extend_from_slice(&chunk.map_err(|error| format!("cut: {error}"))?);
    }
    let text = String::from_utf8_lossy(&text);
    let deltas = text.matches("event: content_block_delta").count();
    if deltas == EVENTS && text.contains("event: message_stop") {
        Ok(())
    } else {
        Err(format!("ended after {deltas} of {EVENTS} events"))
    }
}

async fn run() -> Result<bool, BoxError> {
    let key_file = KeyFile::create()?;
    let provider = Provider::default();
    let upstream = serve(
        Router::new()
            .route("/v1/messages", post(provider_messages))
            .with_state(provider.clone()),
    )
    .await?;
    let (gateway_addr, gateway) = start_gateway(upstream, key_file.path()).await?;
    println!("upstream on {upstream} (server-sent events: {EVENTS} deltas {EVENT_GAP:?} apart, a 503 for every {OVERLOAD_EVERY}th first attempt)");
    println!("gateway on {gateway_addr}: POST /v1/messages, GET /stats; client TTL {TTL:?}");
    println!("{STREAMS} concurrent streams for {LOAD_FOR:?}; the key file changes at {KEY_CHANGE_AT:?}\n");

    let start = Instant::now();
    let messages_url = format!("http://{gateway_addr}/v1/messages");
    let stats_url = format!("http://{gateway_addr}/stats");
    let downstream = reqwest::Client::new();
    let reloaded = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));

    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let (downstream, url) = (downstream.clone(), messages_url.clone());
        let (reloaded, outcomes) = (Arc::clone(&reloaded), Arc::clone(&outcomes));
        streams.push(tokio::spawn(async move {
            tokio::time::sleep(EVENT_GAP * i as u32 / 2).await;
            while start.elapsed() < LOAD_FOR {
                let after = reloaded.load(Ordering::SeqCst);
                let result = one_stream(&downstream, &url, after).await;
                let mut outcomes = outcomes.lock().expect("not poisoned");
                match result {
                    Ok(()) => outcomes.complete += 1,
                    Err(why) => {
                        outcomes.cut += 1;
                        outcomes.first_cut.get_or_insert(why);
                    }
                }
            }
        }));
    }

    // The key changes on disk; the gateway notices by itself. The load
    // counts a request as sent after the reload once `/stats` shows it.
    tokio::time::sleep_until(start + KEY_CHANGE_AT).await;
    key_file.replace(KEYS[1])?;
    println!(
        "{:>5} ms  the key file now holds the new key",
        start.elapsed().as_millis()
    );
    let mut most_live = 0;
    while start.elapsed() < LOAD_FOR {
        let figures: Value = downstream.get(&stats_url).send().await?.json().await?;
        most_live = most_live.max(figures["live_generations"].as_u64().unwrap_or(0));
        if figures["key_reloads"] == 1 && !reloaded.swap(true, Ordering::SeqCst) {
            println!(
                "{:>5} ms  /stats shows the reload: requests sent from now on must use the new key",
                start.elapsed().as_millis()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for stream in streams {
        stream.await?;
    }

    let figures: Value = downstream.get(&stats_url).send().await?.json().await?;
    let outcomes = outcomes.lock().expect("not poisoned");
    let served = *provider.served.lock().expect("not poisoned");
    let stats = gateway.client.stats();
    println!();
    println!(
        "streams: {} complete, {} cut",
        outcomes.complete, outcomes.cut
    );
    println!("upstream requests   sent before the reload   sent after it");
    for (key, name) in KEY_NAMES.iter().enumerate() {
        println!(
            "  with the {name}   {:>22}   {:>13}",
            served[0][key], served[1][key]
        );
    }
    println!(
        "503s from the upstream: {}, retried by the gateway: {}",
        provider.turned_away.load(Ordering::Relaxed),
        gateway.retries.load(Ordering::Relaxed)
    );
    let reloads = gateway.key_reloads.load(Ordering::Relaxed);
    println!(
        "rotations: {} ({reloads} on the key change, {} on the TTL); up to {most_live} clients live at once",
        stats.rotations,
        stats.rotations.saturating_sub(reloads)
    );
    println!(
        "stats(): generation {}, {} live, {} in flight, {} failed builds",
        stats.current_generation,
        stats.live_generations(),
        stats.in_flight(),
        stats.failed_builds
    );
    println!("GET /stats: {figures}");
    if let Some(why) = &outcomes.first_cut {
        println!("first cut stream: {why}");
    }

    let mut failures = Vec::new();
    if outcomes.cut > 0 {
        failures.push(format!("{} streams were cut", outcomes.cut));
    }
    if served[1][0] > 0 {
        failures.push(format!(
            "{} requests sent after the reload used the old key",
            served[1][0]
        ));
    }
    if served[1][1] == 0 {
        failures.push("no request sent after the reload used the new key".to_owned());
    }
    if provider.refused.load(Ordering::Relaxed) > 0 {
        failures.push("the upstream refused a key".to_owned());
    }
    if stats.rotations < 3 {
        failures.push(format!("only {} rotations", stats.rotations));
    }
    println!();
    if failures.is_empty() {
        println!(
            "OK: {} streams, none cut, through {} rotations; every request sent after the reload used the new key",
            outcomes.complete, stats.rotations
        );
        Ok(true)
    } else {
        println!("FAILED: {}", failures.join("; "));
        Ok(false)
    }
}

/// Serves `app` on a fresh loopback port, in the background.
async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The key file, in the temporary directory; removed on drop.
struct KeyFile(PathBuf);

impl KeyFile {
    fn create() -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("reqwest-gateway-{}.key", std::process::id()));
        let file = KeyFile(path);
        file.replace(KEYS[0])?;
        Ok(file)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Replaces the contents in one step (a rename), so that a reader sees
    /// the old key or the new one, never half of one.
    fn replace(&self, key: &str) -> std::io::Result<()> {
        let next = self.0.with_extension("next");
        std::fs::write(&next, format!("{key}\n"))?;
        std::fs::rename(&next, &self.0)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
