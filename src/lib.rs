//! Renew a long-lived HTTP client on a TTL without cutting a single
//! in-flight response.
//!
//! A long-lived client keeps its connections to whatever its host name
//! resolved to when they were opened: pooled HTTP/1.1 connections and the
//! one HTTP/2 connection stay on the old backends, so backends added behind
//! DNS (a scale-up, a blue/green switch, a failover) get no traffic until
//! the client is rebuilt. Credentials, client certificates and proxy
//! settings fixed at build time are the next reason to rebuild. The usual
//! fix is to rebuild the client every N minutes, and the usual bug comes
//! with it: the old client is torn down while responses are still
//! streaming through it. hyper-util's, reqwest's and tonic's clients let
//! an open response finish when they are dropped, but a client that closes
//! its connections explicitly, a custom pool, or a graceful-close hook cuts
//! every stream open at that moment.
//!
//! [`RotatingClientLayer`] turns a *factory* of client services into one
//! [`RotatingClient`] service. It swaps in a freshly built client every TTL
//! (with jitter) or on [`rotate`](RotatingClient::rotate), and keeps each
//! retired client alive exactly as long as a response that came from it is
//! still in flight. The [operator's guide](guide) starts with the scale-up
//! recipe.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_rotating_client::{GenerationId, RotatingClientLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! // Any `Clone` service that returns `http::Response<B>` works as a client:
//! // hyper-util's `Client`, a tonic `Channel`, or, here, an echo service.
//! let make_client = || {
//!     service_fn(|request: http::Request<String>| async move {
//!         Ok::<_, Infallible>(http::Response::new(request.into_body()))
//!     })
//! };
//!
//! let client = ServiceBuilder::new()
//!     .layer(RotatingClientLayer::new(Duration::from_secs(15 * 60)))
//!     .service(make_client);
//!
//! let response = client.clone().oneshot(http::Request::new("hello".to_owned())).await?;
//! assert_eq!(client.stats().in_flight(), 1, "the body still leases generation 1");
//! let body = response.into_body().collect().await?.to_bytes();
//! assert_eq!(body, "hello");
//! assert_eq!(client.stats().in_flight(), 0, "released at end of stream");
//!
//! // Credentials changed? Rotate now; the next request uses the new client.
//! let generation = client.rotate().await?;
//! assert_eq!(generation, GenerationId(2));
//! assert_eq!(client.stats().current_generation, generation);
//! # Ok(())
//! # }
//! ```
//!
//! The async, fallible factory connects before a generation becomes
//! current; with tonic:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tonic::transport::Endpoint;
//! use tower_rotating_client::RotatingClientLayer;
//!
//! let endpoint = Endpoint::from_static("http://127.0.0.1:50051");
//! let channel = RotatingClientLayer::new(Duration::from_secs(30 * 60))
//!     .layer_async(move || {
//!         let endpoint = endpoint.clone();
//!         async move { endpoint.connect().await }
//!     })
//!     .await?; // the first connect's error reaches you here
//! let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
//! # let _ = &mut health;
//! # Ok(())
//! # }
//! ```
//!
//! # Which clients work
//!
//! The factory returns a `Clone + Send` client service (it need not be
//! `Sync`; the rotating client is `Send + Sync` all the same) whose response
//! is one of the types of [`ClientResponse`]:
//!
//! - **any `Service<Req, Response = http::Response<B>>`** with
//!   `B: http_body::Body`: hyper-util's legacy `Client`, a tonic `Channel`,
//!   an axum `Router`, tower stacks over them. The rotating client returns
//!   `http::Response<ResponseBody<B>>`.
//! - **reqwest** (feature `reqwest`): `layer(reqwest::Client::new)` (with
//!   `use tower::Layer;`) makes a
//!   `Service<reqwest::Request>` with `Response = reqwest::Response` and
//!   `Error = reqwest::Error`, plus `RotatingClient::execute`. The lease
//!   rides in the response body, so `json()`, `bytes_stream()`, `chunk()`,
//!   `error_for_status()` and `url()` work as usual. reqwest's builder
//!   returns a `Result`: use [`try_layer`](RotatingClientLayer::try_layer).
//!   reqwest cannot map a response body in place, so putting the lease in
//!   goes through `http::Response` and back: a few allocations per
//!   response (8 in a test with a 5-byte body, against reqwest's own 9),
//!   on this path only; the `http::Response` path allocates nothing.
//! - **boxed services**, `BoxCloneService` (not `Sync`) and
//!   `BoxCloneSyncService`, over either of the above.
//!
//! A client that returns anything else is adapted by mapping its response
//! into an `http::Response<B>`, e.g. with `ServiceExt::map_response`
//! (`tower::util::MapResponse`) in the factory. The compiler names the
//! reason when the request type is known (`ServiceBuilder`,
//! `BoxCloneService::new`, `ServiceExt::<Req>::oneshot(client, req)`); a
//! bare `client.oneshot(req)` only reports E0599 "trait bounds were not
//! satisfied".
//!
//! ```
//! use std::time::Duration;
//! use tower::{service_fn, Layer, ServiceExt}; // `Layer` for `.layer(make_client)`
//! use tower_rotating_client::RotatingClientLayer;
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), std::convert::Infallible> {
//! // A client answering with a plain `String`, mapped into an `http::Response`.
//! let make_client = || {
//!     service_fn(|name: String| async move { Ok::<_, std::convert::Infallible>(format!("hi {name}")) })
//!         .map_response(http::Response::new)
//! };
//! let client = RotatingClientLayer::new(Duration::from_secs(60)).layer(make_client);
//! let response = client.oneshot("you".to_owned()).await?;
//! assert_eq!(response.status(), 200);
//! # Ok(())
//! # }
//! ```
//!
//! # Factories, and where they run
//!
//! | the factory | give it to | first build | later builds |
//! |---|---|---|---|
//! | `Fn() -> S` | [`layer`](tower_layer::Layer::layer), directly or through `ServiceBuilder` | inside `layer`, on your thread | on Tokio's blocking pool |
//! | `Fn() -> Result<S, E>` | [`try_layer`](RotatingClientLayer::try_layer) | inside `try_layer`, on your thread | on Tokio's blocking pool |
//! | `Fn() -> impl Future<Output = Result<S, E>>` | [`layer_async`](RotatingClientLayer::layer_async) | awaited by you | on the runtime, within [`build_timeout`] |
//!
//! - **`layer` is tower's [`Layer`](tower_layer::Layer) trait method.**
//!   Calling it on the layer needs `use tower::Layer;` (or
//!   `tower_layer::Layer`); without it, E0599 "no method named `layer`".
//!   `ServiceBuilder::new().layer(..).service(factory)` needs no import.
//! - **`try_layer` and `layer_async` are called on the layer itself,**
//!   outside any `ServiceBuilder` chain; put the client they return into
//!   one with `.service(client)`. A factory that returns a `Result`, given
//!   to `ServiceBuilder::service` or to `layer`, is read as a factory whose
//!   client *is* the `Result`, which is not a client: "the trait bound
//!   `reqwest::Error: Clone` is not satisfied ... required for
//!   `Result<Client, reqwest::Error>` to implement `Clone`" means exactly
//!   that. Give it to `try_layer`.
//! - **A sync factory may block.** Its builds after the first, timed ones
//!   and those of [`rotate`](RotatingClient::rotate) alike, run on Tokio's
//!   blocking pool (`spawn_blocking`), so reading key material from disk,
//!   loading a root store or building a TLS config holds no runtime worker
//!   (a current-thread runtime included) while requests go on through the
//!   current generation. A sync build cannot be interrupted, so
//!   `build_timeout` does not apply to it; if the future of `rotate()` is
//!   dropped, the build still ends on the pool and its client is dropped
//!   there.
//! - **An async factory must not block.** Its future runs on the runtime,
//!   in the rotation task (or in the caller of `rotate()`), like any other
//!   future. Move blocking work inside it to the blocking pool, and keep
//!   the awaits (a connect, a probe) where they are:
//!
//! ```
//! use std::time::Duration;
//! use tower::service_fn;
//! use tower_rotating_client::{BoxError, RotatingClientLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let client = RotatingClientLayer::new(Duration::from_secs(600))
//!     .layer_async(|| async {
//!         // What a real factory loads: a certificate, a key, a root store.
//!         let pem = tokio::task::spawn_blocking(|| std::fs::read("/dev/null")).await??;
//!         Ok::<_, BoxError>(service_fn(move |_request: http::Request<String>| {
//!             let length = pem.len();
//!             async move { Ok::<_, BoxError>(http::Response::new(length.to_string())) }
//!         }))
//!     })
//!     .await?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
//!
//! Panics and errors are failed builds wherever the factory runs (see
//! below).
//!
//! # With a timeout, a retry and a boxed stack
//!
//! - **Timeout.** tower's `Timeout` bounds the response future, which ends
//!   with the response head; a streamed body goes on after it. Bound the
//!   body too: with reqwest, by its per-request timeout
//!   (`*request.timeout_mut() = Some(..)`, or `RequestBuilder::timeout`),
//!   which lasts until the body has ended, or `ClientBuilder::read_timeout`
//!   between reads; with an `http::Response` client, by a body timeout such
//!   as tower-http's `ResponseBodyTimeoutLayer`.
//! - **Retry.** `tower::retry` sends a copy of the request again: for
//!   reqwest, `Policy::clone_request` returns `request.try_clone()`
//!   (`None` for a streamed request body, which is then sent once). Each
//!   attempt is a fresh `poll_ready`, so a retry after a rotation goes to
//!   the new generation.
//! - **A boxed stack** (`BoxCloneSyncService`) has no
//!   [`stats`](RotatingClient::stats) or [`rotate`](RotatingClient::rotate):
//!   keep a clone of the `RotatingClient` beside it. Clones share
//!   everything.
//!
//! The [guide](guide#timeout-retry-and-a-boxed-stack) has the whole
//! stack, and `examples/reqwest_gateway.rs` runs it in an axum gateway.
//!
//! # The lifecycle of a generation
//!
//! A *generation* is one client built by the factory, with an id (the first
//! is `1`) and some bookkeeping.
//!
//! 1. **Built.** The first generation is built inside
//!    [`layer`](tower_layer::Layer::layer) (or
//!    [`try_layer`](RotatingClientLayer::try_layer) and
//!    [`layer_async`](RotatingClientLayer::layer_async) for factories that
//!    can fail), so its failure reaches the caller. Later ones are built off
//!    the request path by a background task: a sync factory is called when
//!    the current generation expires, on Tokio's blocking pool; an async
//!    factory is started [`build_ahead`] of expiry, so that it has connected
//!    by the time it becomes current. A build that
//!    fails, panics or exceeds [`build_timeout`] leaves the current
//!    generation serving, is counted in [`Stats::failed_builds`], and is
//!    retried with capped backoff ([`build_backoff`]). No request ever waits
//!    for a build, and no request fails because of one.
//! 2. **Current.** It serves every request whose `poll_ready` starts while
//!    it is current, for `ttl * (1 - jitter * u)`, `u` uniform in `[0, 1)`.
//!    Jitter only shortens a lifetime: the TTL is an upper bound, derived by
//!    users from hard limits such as a credential's lifetime, and a
//!    generation outlives it only by scheduling delay, a build slower than
//!    [`build_ahead`], failed builds, or the [`max_live_generations`] cap.
//!    [`RotatingClient::rotate`] swaps early, on demand. A TTL of
//!    `Duration::MAX` never rotates on time.
//! 3. **Draining.** Once swapped out, it serves nothing new, but stays
//!    alive while anything still *leases* it: a response future, a response
//!    body that has not reached its end, or a handle between a Ready
//!    `poll_ready` and `call`. A body lets go at end of stream (including
//!    trailers), on error, or on drop, whichever comes first; an empty body
//!    (HEAD, 204) never holds on. Idle handles lease nothing.
//! 4. **Retired.** When the last lease goes, the generation is retired, on
//!    the thread that released it: its client is handed to the
//!    [`on_retire`] hook, or dropped. Every generation is retired once,
//!    including the last one when every handle and response is gone; the
//!    hook sees each at most once and never with a response in flight.
//!    [`drain_timeout`] can cut draining short (the hook is then skipped);
//!    see there for exactly what happens to the open responses.
//!
//! Dropping the last handle stops the background task and the drain
//! timers; generations still draining then retire on their own when their
//! last response ends. Nothing is leaked.
//!
//! # The tower contract
//!
//! - `type Error = S::Error`: errors of the inner client pass through
//!   untouched, for requests and bodies alike. Rotation has no error of its
//!   own on the request path.
//! - `poll_ready` reserves the current generation and readies a clone of its
//!   client; `call` uses exactly that clone, even if a swap happened in
//!   between. A handle that returned `Pending` reserves nothing. Calling
//!   `call` without a Ready `poll_ready` panics.
//! - A clone of a handle starts with nothing reserved.
//! - A handle keeps the clone of the client it last used, to reuse while its
//!   generation is current. That stale clone does not delay retirement, but
//!   lives until the handle is next polled or dropped.
//! - The response future and body are named types, [`ResponseFuture`] and
//!   [`ResponseBody`], with no boxing. On a handle that stays on the
//!   current generation and its thread, the hot path (`poll_ready`, `call`,
//!   `poll_frame`) takes no lock, allocates nothing, reads no clock and
//!   writes no cache line that another thread writes: one atomic load, a
//!   `Weak` upgrade on the thread's own shard of the generation (the
//!   lease), a plain store to count the request, and the lease's release
//!   at the end of the body. A fresh clone (as `oneshot` on a clone does)
//!   takes its lease and a clone of the client under its thread's lane
//!   lock instead; see [`RotatingClient`] ("Cost per request"). The
//!   benchmarks (`cargo bench`) measure each against the bare client.
//!
//! # Other triggers and observability
//!
//! Besides the TTL and [`RotatingClient::rotate`], a generation can be
//! rotated away when a [`Probe`] sees that something it depends on changed
//! ([`rotate_on_change`](RotatingClientLayer::rotate_on_change): a DNS
//! answer that gained an address, a key file's digest, a token about to
//! expire), so that a long TTL still follows a scale-up within a probe
//! period or two and a stable world costs no rotation at all; after it has
//! served
//! [`max_requests_per_generation`](RotatingClientLayer::max_requests_per_generation)
//! requests, or after consecutive failures judged by your predicate
//! ([`rotate_on_failures`](RotatingClientLayer::rotate_on_failures), rate
//! limited). An async factory can make a fresh client pass a probe before
//! it becomes current (a [guide recipe](guide#warm-up-probe)).
//! [`RotatingClient::stats`] gives per-generation figures,
//! [`generation_extension`](RotatingClientLayer::generation_extension) tags
//! each response with the [`GenerationId`] that served it, the retire hook
//! gets each generation's figures, and the `tracing` feature emits every
//! lifecycle event. The [operator's guide](guide) explains how to choose the
//! settings, compares this crate with .NET, gRPC, Envoy, HikariCP and
//! Finagle, and has recipes.
//!
//! # Runtime
//!
//! Constructing a [`RotatingClient`] needs no runtime. Using it needs a
//! Tokio runtime with the time driver: the rotation timer starts there on
//! first use (or at construction, if a runtime is present), and keeps
//! running on that runtime. All timing goes through `tokio::time`, so
//! `tokio::time::pause()` and `advance()` drive rotation deterministically.
//!
//! # Feature flags
//!
//! - `tracing`: emits lifecycle events (build started, failed and
//!   succeeded, swap, drain started, drained, drain timed out, retired)
//!   with the generation id, its age, requests served, in-flight count at
//!   swap and drain duration. Off by default; without it, the events
//!   compile to nothing. It adds no items to the API.
//! - `dns`: [`Probe::dns`], a probe that resolves a name with tokio's
//!   resolver (it turns on tokio's `net` feature). Off by default.
//! - `reqwest`: `RotatingClient<reqwest::Client>` with reqwest's own
//!   request, response and error types (reqwest 0.13, built with
//!   `default-features = false`). reqwest's features stay yours: TLS,
//!   `http2`, `json`, `stream` are enabled in your own `Cargo.toml`, e.g.
//!   `reqwest = { version = "0.13", features = ["json", "stream"] }`
//!   (reqwest's defaults include its `rustls` TLS backend), or with
//!   `default-features = false`, `features = ["rustls"]` or
//!   `["native-tls"]` to turn TLS on. Without a TLS feature anywhere in
//!   the build, `https://` requests fail. The items it adds are marked
//!   "Available on crate feature `reqwest` only".
//!
//! [`build_ahead`]: RotatingClientLayer::build_ahead
//! [`build_timeout`]: RotatingClientLayer::build_timeout
//! [`build_backoff`]: RotatingClientLayer::build_backoff
//! [`max_live_generations`]: RotatingClientLayer::max_live_generations
//! [`drain_timeout`]: RotatingClientLayer::drain_timeout
//! [`on_retire`]: RotatingClientLayer::on_retire

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod config;
mod error;
mod factory;
mod future;
mod generation;
pub mod guide;
mod layer;
mod lease;
#[cfg(all(test, loom))]
mod loom_models;
mod probe;
#[cfg(feature = "reqwest")]
mod reqwest;
mod response;
mod rotator;
mod schedule;
mod service;
mod shard;
mod stats;
mod sync;
mod trace;

pub use body::ResponseBody;
pub use config::{CallOutcome, OnRetire};
pub use error::{BoxError, RotateError};
pub use future::ResponseFuture;
pub use layer::RotatingClientLayer;
pub use probe::Probe;
pub use response::ClientResponse;
pub use service::RotatingClient;
pub use stats::{GenerationId, GenerationStats, Stats};
