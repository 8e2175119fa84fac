//! # Operator's guide
//!
//! How to choose the settings, when not to use this crate, how it compares
//! with the systems that do part of the same job, where factories run, how
//! to put a timeout and a retry around the client, and recipes.
//!
//! # Choosing the settings
//!
//! A generation is one client: one connection pool, its TLS sessions and
//! resolver state. Every setting below trades how fresh that client is
//! against how many of them are alive at once.
//!
//! **TTL.** Derive it from the hard limit you rotate for, minus a margin for
//! the build: a credential valid for 60 minutes wants a TTL of 50; a
//! load balancer that closes connections after 30 minutes wants 25, so that
//! you rotate before it does. If you rotate to follow DNS or scaling, the
//! TTL is how long a new backend may wait for traffic (see
//! [Following DNS and scale-ups](#following-dns-and-scale-ups)): 30 seconds
//! to 15 minutes, depending on why you scale, or hours with a probe that
//! rotates when the answer changes (see
//! [the DNS probe](#look-often-rotate-on-a-change-the-dns-probe)). The TTL
//! is an upper bound; jitter only shortens it.
//!
//! **Jitter.** The default, `0.1`, spreads lifetimes over the last 10% of
//! the TTL, so instances drift apart after their first rotation. For a
//! fleet deployed at once, also turn on
//! [`stagger_first_rotation`](crate::RotatingClientLayer::stagger_first_rotation):
//! the first rotation then lands anywhere in the TTL, and the fleet never
//! rotates in step.
//!
//! **Streams longer than the TTL.** A response keeps its generation alive to
//! its last byte, so with a shortest lifetime `L = ttl * (1 - jitter)` and a
//! longest stream `D`, up to `1 + ceil(D / L)` generations are live at
//! once. A TTL of 15 minutes with streams of up to 40 minutes means 4 live
//! clients, each with its own connections. That is the price of not cutting
//! streams; [`Stats::live_generations`](crate::Stats::live_generations)
//! shows what you pay.
//!
//! **`max_live_generations`.** Caps that number. At the cap, rotation waits
//! for a draining generation to retire, so the current generation outlives
//! its TTL. Set it to the figure above plus one, as a safety net against an
//! unexpected stream length, not as the normal regime. If the TTL is a hard
//! limit (a credential), leave the cap off and bound draining with
//! `drain_timeout` instead.
//!
//! **`drain_timeout`.** The longest a retired generation may keep its
//! resources. Set it above the longest response you consider legitimate;
//! beyond it, the layer lets go of the client, and what happens to the
//! remaining responses depends on the client (see
//! [`drain_timeout`](crate::RotatingClientLayer::drain_timeout)).
//!
//! **Long-lived gRPC watches.** A `Watch` or other server stream opened on
//! generation N keeps N alive for as long as it runs, which may be days.
//! Rotation cannot move an open stream to a new connection; nothing can,
//! without cutting it. Have watchers re-establish their stream on their own
//! schedule (say, every TTL, with jitter), and give the layer a
//! `drain_timeout` of a few TTLs as a backstop.
//!
//! **LLM responses that run for minutes.** Take the p99.9 generation time
//! `D` (often 2 to 10 minutes) and keep the TTL at several times `D`, so
//! that few generations overlap: with `D = 10 min`, a TTL of 30 minutes
//! keeps at most 2 or 3 alive. A `drain_timeout` above your gateway's own
//! response timeout (say `D` plus a margin) guarantees that a stuck stream
//! cannot pin a client forever.
//!
//! # When rotation is the wrong tool
//!
//! - **A TLS client identity that changes** (a certificate renewed every
//!   day): a rustls `ResolvesClientCert` hands each new handshake the current
//!   certificate without rebuilding anything. Rotate only if the client
//!   cannot pick up new material by itself (see
//!   [Credentials without a clock](#credentials-without-a-clock)).
//! - **Idle connections that go stale**: the pool's idle timeout (hyper-util's
//!   `pool_idle_timeout`) closes them without touching busy ones. It does
//!   nothing for busy connections pinned to old backends; see
//!   [Following DNS and scale-ups](#following-dns-and-scale-ups).
//! - **Balancing across backends when you run the servers**: a server-side
//!   max connection age with a GOAWAY (gRPC's `MAX_CONNECTION_AGE`) drains
//!   each connection gracefully, for every client at once.
//! - **Per-request failover**: retries and outlier detection act per
//!   request or per host; rotation rebuilds the whole client and helps only
//!   when the client itself has gone bad.
//!
//! # Compared with the systems that do part of this
//!
//! | | this crate | .NET `IHttpClientFactory` | gRPC max connection age | Envoy | HikariCP | Finagle `ExpiringService` |
//! |---|---|---|---|---|---|---|
//! | What is renewed | the whole client | the message handler | one connection (server side) | one upstream connection | one connection | one service |
//! | On time | TTL | `HandlerLifetime`, 2 min default | `MaxConnectionAge` | `max_connection_duration` | `maxLifetime`, 30 min default | max lifetime, max idle time |
//! | Spread | shorten-only jitter, 10% default; optional first-rotation stagger | none | ±10% jitter | none | up to 2.5% | none |
//! | In-flight work | kept until the last body byte, then retired | expired handlers disposed after the garbage collector finds them unreferenced | grace period (`MaxConnectionAgeGrace`), then forcibly closed | drained, then closed after a drain timeout | never retires a connection in use | waits for outstanding requests, then closes |
//! | Request cap | `max_requests_per_generation` | no | no | `max_requests_per_connection` | no | no |
//! | On failures | rotate after N consecutive failures, rate-limited | no | no | outlier detection ejects hosts | a failed validation evicts the connection | no |
//! | Warm-up | async factory connects first; optional probe | no | no | no | validates before handing out | no |
//! | On a change | a probe (DNS answer, file digest, token version), with hysteresis | no | no | strict DNS re-resolves; `close_connections_on_host_set_change` | no | no |
//!
//! What they do that we don't: Envoy and HikariCP act per connection, so one
//! bad connection goes without rebuilding a whole pool; Envoy's outlier
//! detection ejects a bad host rather than a client; HikariCP validates a
//! connection at every checkout, we only once, before a generation becomes
//! current; gRPC's GOAWAY lets the *server* drain its clients, which a
//! client-side layer cannot; .NET ties lifetimes into dependency injection
//! and named clients. What none of them does: track a streaming response to
//! its last byte and retire the client exactly then.
//!
//! # Where factories run
//!
//! The first client is built by the call that makes the rotating client
//! (`layer` or `try_layer` on your thread, `layer_async` awaited by you),
//! so its failure reaches you. Later builds happen in the background:
//!
//! - A **sync factory** (`layer`, `try_layer`) runs on Tokio's blocking
//!   pool, at expiry and in `rotate()`. It may block: read a key file, load
//!   a root store, build a TLS config. No runtime worker waits for it, on a
//!   current-thread runtime either.
//! - An **async factory** (`layer_async`) runs on the runtime, started
//!   `build_ahead` of expiry and bounded by `build_timeout`. Await I/O in
//!   it (a connect, a probe); move blocking work into
//!   `tokio::task::spawn_blocking(..).await` inside it.
//!
//! A background build that fails or panics reaches no request: the current
//! generation keeps serving, and the build is counted and retried with
//! backoff. The [crate docs](crate#factories-and-where-they-run) show which
//! method takes which factory.
//!
//! # Timeout, retry and a boxed stack
//!
//! A gateway puts the rotating client under a timeout and a retry, and
//! boxes the stack to store it. Three things to know:
//!
//! - tower's `Timeout` ends with the response head. A streamed body goes on
//!   after it, so bound the body as well: reqwest's per-request timeout
//!   lasts until the body has ended (`ClientBuilder::read_timeout` bounds
//!   the wait between reads); for `http::Response` clients, tower-http's
//!   `ResponseBodyTimeoutLayer` bounds the wait between frames.
//! - `tower::retry` needs a copy of the request for every attempt:
//!   `reqwest::Request::try_clone`, which gives `None` for a streamed
//!   request body (that request is then sent once). Every attempt starts
//!   with a fresh `poll_ready`, so a retry after a rotation uses the new
//!   generation.
//! - The boxed stack has no `stats()` or `rotate()`. Keep a clone of the
//!   `RotatingClient` next to it; clones share everything.
//!
//! ```no_run
//! # #[cfg(feature = "reqwest")]
//! # async fn example() -> Result<(), tower::BoxError> {
//! use std::future::{ready, Ready};
//! use std::time::Duration;
//! use tower::retry::Policy;
//! use tower::util::BoxCloneSyncService;
//! use tower::{BoxError, ServiceBuilder, ServiceExt};
//! use tower_rotating_client::{RotatingClient, RotatingClientLayer};
//!
//! /// Sends a request turned away with a 503 again, at most `left` times:
//! /// the upstream did not process it, so even a POST is safe to repeat.
//! #[derive(Clone)]
//! struct RetryOverloaded {
//!     left: u32,
//! }
//!
//! impl Policy<reqwest::Request, reqwest::Response, BoxError> for RetryOverloaded {
//!     type Future = Ready<()>;
//!
//!     fn retry(
//!         &mut self,
//!         _request: &mut reqwest::Request,
//!         result: &mut Result<reqwest::Response, BoxError>,
//!     ) -> Option<Ready<()>> {
//!         match result {
//!             Ok(response) if response.status() == 503 && self.left > 0 => {
//!                 self.left -= 1;
//!                 Some(ready(()))
//!             }
//!             _ => None,
//!         }
//!     }
//!
//!     fn clone_request(&mut self, request: &reqwest::Request) -> Option<reqwest::Request> {
//!         request.try_clone()
//!     }
//! }
//!
//! // `try_layer` on the layer, outside the builder; the client goes in below.
//! let client: RotatingClient<reqwest::Client> = RotatingClientLayer::new(Duration::from_secs(300))
//!     .try_layer(|| reqwest::Client::builder().build())?;
//! let upstream: BoxCloneSyncService<reqwest::Request, reqwest::Response, BoxError> =
//!     BoxCloneSyncService::new(
//!         ServiceBuilder::new()
//!             .retry(RetryOverloaded { left: 2 })
//!             .timeout(Duration::from_secs(10)) // each attempt, up to its response head
//!             .service(client.clone()),
//!     );
//!
//! let url = "http://127.0.0.1:8080/v1/messages".parse()?;
//! let mut request = reqwest::Request::new(reqwest::Method::POST, url);
//! *request.body_mut() = Some(r#"{"model":"m","stream":true}"#.into()); // bytes: `try_clone` works
//! *request.timeout_mut() = Some(Duration::from_secs(300)); // the whole response, body included
//! let response = upstream.clone().oneshot(request).await?.error_for_status()?;
//! # drop(response);
//!
//! // The kept handle, for what the box hides.
//! println!("{} generations live", client.stats().live_generations());
//! client.rotate().await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/reqwest_gateway.rs` runs this stack in an axum gateway that
//! streams server-sent events back and reloads its upstream key from a
//! file.
//!
//! # Recipes
//!
//! ## Following DNS and scale-ups
//!
//! The most common reason to rotate. A hyper-util (or reqwest) client
//! resolves a name only when it opens a connection, and keeps its pooled
//! HTTP/1.1 connections, or its single HTTP/2 connection, for as long as
//! they work. Backends added behind the name later get no traffic from it:
//! in the demo's second act, a plain client sent 100% of its requests to
//! the first backend after two more had been added, over HTTP/1.1 and
//! HTTP/2 alike. A fresh client per generation resolves again and opens new
//! connections, so within one TTL of DNS listing a new backend, requests
//! reach it; responses in flight finish on the old connections.
//!
//! **Picking the TTL: how long may a new backend wait for traffic?** That
//! is the TTL, plus however long your DNS records and resolver cache the
//! old answer. If an autoscaler adds backends because the present ones are
//! overloaded, the wait is how long they stay overloaded: 30 to 60 seconds
//! is a common answer, and 5 to 15 minutes is plenty where scaling is for
//! cost rather than for load. The price is one new set of connections (TCP
//! and TLS handshakes) per client per TTL: 200 replicas with a 30 s TTL
//! open about 7 HTTP/2 connections per second across the fleet, which
//! backends barely notice. Turn on
//! [`stagger_first_rotation`](crate::RotatingClientLayer::stagger_first_rotation)
//! so that replicas deployed together do not reconnect in step.
//!
//! Over HTTP/2 one client is one connection to one backend at a time; the
//! spread comes from many replicas (each picking up whatever the resolver
//! answers at its rotation) and from successive generations. Over HTTP/1.1
//! each generation spreads its pool over the addresses it was given.
//!
//! **`pool_idle_timeout` alone does not help under steady load.** It closes
//! connections that have been idle for that long, and under steady traffic
//! every pooled connection is used again long before, while an HTTP/2
//! connection is never idle at all: the pinned connections are precisely
//! the busy ones. hyper-util's pool has no maximum connection age. Keep
//! the idle timeout for the lulls, and rotate for the load.
//!
//! ```no_run
//! use std::time::Duration;
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_rotating_client::RotatingClientLayer;
//!
//! # fn example() {
//! // A new backend waits at most a minute (plus the DNS cache) for traffic.
//! let client = ServiceBuilder::new()
//!     .layer(RotatingClientLayer::new(Duration::from_secs(60)).stagger_first_rotation(true))
//!     .service(|| {
//!         Client::builder(TokioExecutor::new())
//!             .pool_idle_timeout(Duration::from_secs(30))
//!             .build_http::<Full<Bytes>>()
//!     });
//! # let _ = client;
//! # }
//! ```
//!
//! `tests/scale_up.rs` checks this with three loopback backends and a
//! resolver that adds two of them mid-test: the control stays on the first,
//! the rotating client sends at least a third of its requests to the new
//! ones and fails none.
//!
//! ### Look often, rotate on a change: the DNS probe
//!
//! A TTL is a blind lever: to follow a scale-up within 5 seconds it must be
//! 5 seconds, which is 720 rotations an hour, each a new set of
//! connections and TLS handshakes, while the answer changes perhaps twice
//! a day. [`Probe::dns`](crate::Probe::dns) looks at the answer instead
//! and rotates only when it gained an address, so the TTL can go back to
//! what credentials or hygiene ask for (hours):
//!
//! ```
//! # #[cfg(feature = "dns")]
//! # fn example() {
//! use std::time::Duration;
//! use http_body_util::Full;
//! use hyper::body::Bytes;
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_rotating_client::{Probe, RotatingClientLayer};
//!
//! let client = ServiceBuilder::new()
//!     .layer(
//!         RotatingClientLayer::new(Duration::from_secs(6 * 3600))
//!             .rotate_on_change(Probe::dns("backend.internal:8080", Duration::from_secs(5))),
//!     )
//!     .service(|| Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
//! # let _ = client;
//! # }
//! ```
//!
//! **What it costs and buys.** One lookup per period (on tokio's blocking
//! pool, answered by the resolver's cache most of the time). A new backend
//! waits at most `period * confirmations` (10 s with the defaults above)
//! plus the DNS cache; a stable answer costs no rotation at all. In the
//! demo's second act, a 300 ms TTL rotates about 10 times in 3 seconds
//! (12,000 an hour) where the probe every 100 ms rotates once, and moves
//! as much traffic.
//!
//! **Round-robin DNS that answers a subset.** Some servers answer each
//! query with a different subset of a large pool (8 of about 50 addresses
//! on AWS); Envoy's docs warn that strict DNS over such answers cycles
//! connections. Two defaults stop that: a change must be seen on
//! [`confirmations`](crate::Probe::confirmations) probes in a row with the
//! same answer (2; a rotating subset never repeats), and probe-driven
//! rotations are at least [`min_interval`](crate::Probe::min_interval)
//! apart (30 s). Rotating only on added addresses also means a backend
//! that leaves costs nothing: its connections close, and the pool resolves
//! again for the next one.
//!
//! **A resolver of your own.** When the client resolves through its own
//! hook (hyper-util's `HttpConnector::new_with_resolver`, reqwest's
//! `dns_resolver`, a service registry), probe that same source with
//! [`Probe::new`](crate::Probe::new), comparing sets; the demo and
//! `tests/scale_up.rs` do that with a resolver they control.
//!
//! ## Credentials without a clock
//!
//! A credential fixed when the client is built (a client certificate, an
//! API key in a default header, a token) is renewed by a rotation. A TTL
//! must guess when it changes; a probe knows.
//!
//! **A key or certificate file.** The factory reads the file; the probe
//! returns a digest of it, so that the probe keeps no copy of the secret
//! and nothing can print it. A 64-bit hash notices any change; it is not
//! meant to resist somebody who can write the file, who could simply write
//! a new key.
//!
//! ```
//! use std::hash::{DefaultHasher, Hash, Hasher};
//! use std::time::Duration;
//! use tower::service_fn;
//! use tower_rotating_client::{Probe, RotatingClientLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), std::io::Error> {
//! # let dir = std::env::temp_dir().join(format!("trc-guide-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! # let key_path = dir.join("upstream.key");
//! # std::fs::write(&key_path, "sk-first")?;
//! let key_file = key_path.clone(); // e.g. /run/secrets/upstream.key
//! let client = RotatingClientLayer::new(Duration::from_secs(24 * 3600))
//!     .rotate_on_change(
//!         Probe::new(Duration::from_secs(10), move || {
//!             let key_file = key_file.clone();
//!             async move {
//!                 let key = tokio::fs::read(&key_file).await?;
//!                 let mut digest = DefaultHasher::new();
//!                 key.hash(&mut digest);
//!                 Ok::<_, std::io::Error>(digest.finish())
//!             }
//!         })
//!         .confirmations(1),
//!     )
//!     .try_layer(move || {
//!         // Runs on tokio's blocking pool for every rotation.
//!         let key = std::fs::read_to_string(&key_path)?;
//!         Ok::<_, std::io::Error>(service_fn(move |_request: http::Request<String>| {
//!             let authorization = format!("Bearer {}", key.trim());
//!             async move { Ok::<_, std::io::Error>(http::Response::new(authorization.len())) }
//!         }))
//!     })?;
//! # let _ = client;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! With `confirmations(1)` the first probe that sees the new digest
//! rotates; keep the default of 2 if the file is written in place rather
//! than renamed into place, so that a half-written file is not picked up.
//!
//! **A token with an expiry, fetched by an async factory.** The factory
//! fetches the token and records when it expires; the probe answers
//! whether the newest token expires within a margin, and only `true`
//! counts as a change. After the rotation that `true` asked for, the new
//! generation's value is `true` as well, so the next `false` is no change,
//! and the next `true` (the new token nearing its expiry) is.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//! use tower::service_fn;
//! use tower_rotating_client::{Probe, RotatingClientLayer};
//!
//! fn unix_now() -> u64 {
//!     SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
//! }
//!
//! # async fn fetch_token() -> Result<(String, u64), std::io::Error> { Ok(("t".to_owned(), unix_now() + 3600)) }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), std::io::Error> {
//! const MARGIN: u64 = 5 * 60;
//! let expires_at = Arc::new(AtomicU64::new(0)); // unix seconds of the newest token
//! let client = RotatingClientLayer::new(Duration::from_secs(24 * 3600))
//!     .rotate_on_change(
//!         Probe::new(Duration::from_secs(30), {
//!             let expires_at = Arc::clone(&expires_at);
//!             move || {
//!                 let expiring = unix_now() + MARGIN >= expires_at.load(Ordering::Relaxed);
//!                 async move { Ok::<_, std::io::Error>(expiring) }
//!             }
//!         })
//!         .confirmations(1)
//!         .changed_when(|_seen, expiring| *expiring),
//!     )
//!     .layer_async({
//!         let expires_at = Arc::clone(&expires_at);
//!         move || {
//!             let expires_at = Arc::clone(&expires_at);
//!             async move {
//!                 // Your token endpoint; `expires` in unix seconds.
//!                 let (token, expires) = fetch_token().await?;
//!                 expires_at.store(expires, Ordering::Relaxed);
//!                 Ok::<_, std::io::Error>(service_fn(move |_request: http::Request<String>| {
//!                     let authorization = format!("Bearer {token}");
//!                     async move { Ok::<_, std::io::Error>(http::Response::new(authorization.len())) }
//!                 }))
//!             }
//!         }
//!     })
//!     .await?;
//! # let _ = client;
//! # Ok(())
//! # }
//! ```
//!
//! The token's lifetime still bounds the TTL: if fetching fails, the
//! probe keeps asking (at most once per `min_interval`), failed builds
//! are counted and retried, and the TTL is the last resort. A timed
//! build ahead of the TTL updates `expires_at` before its client is
//! current; the TTL swap follows within `build_ahead`.
//!
//! **Compared with a rustls client-certificate resolver.** When only the
//! TLS client identity changes, a rustls `ResolvesClientCert` that loads
//! the current certificate is the better tool: each new handshake presents
//! it, nothing is rebuilt, and the pool and its warm connections stay.
//! Established connections keep the identity they were opened with, until
//! they close. Rotate instead when more than the identity changes (trust
//! roots, a proxy, a header credential, the resolver's answer), when the
//! client cannot take a resolver (a prebuilt `reqwest::Client` with an
//! `Identity`), or when connections opened with the old identity must stop
//! being used soon (a revoked certificate): rotation moves every new
//! request to a fresh pool at once, and the old one drains.
//!
//! ## tonic with pre-connect
//!
//! The async factory connects before a generation becomes current, so the
//! swap never puts a cold channel in front of requests.
//!
//! ### Warm-up probe
//!
//! To make a fresh client pass a check before it serves anything, probe
//! it inside the async factory. A failed probe is a failed build: the
//! current generation keeps serving and the build is retried with backoff,
//! all within [`build_timeout`](crate::RotatingClientLayer::build_timeout).
//! The first client is probed too, and its failure reaches the caller of
//! `layer_async`.
//!
//! ```no_run
//! # async fn example() -> Result<(), tower_rotating_client::BoxError> {
//! use std::time::Duration;
//! use tonic::transport::Endpoint;
//! use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
//! use tower_rotating_client::RotatingClientLayer;
//!
//! let endpoint = Endpoint::from_static("http://127.0.0.1:50051");
//! let channel = RotatingClientLayer::new(Duration::from_secs(30 * 60))
//!     .build_timeout(Duration::from_secs(10))
//!     .layer_async(move || {
//!         let endpoint = endpoint.clone();
//!         async move {
//!             let channel = endpoint.connect().await?;
//!             // The probe: a health check through the fresh channel.
//!             HealthClient::new(channel.clone()).check(HealthCheckRequest::default()).await?;
//!             Ok::<_, tower_rotating_client::BoxError>(channel)
//!         }
//!     })
//!     .await?;
//! let mut health = HealthClient::new(channel);
//! let status = health.check(HealthCheckRequest::default()).await?;
//! # let _ = status;
//! # Ok(())
//! # }
//! ```
//!
//! ## reqwest, with its own types
//!
//! With the `reqwest` feature, `reqwest::Client` is a client like any other,
//! and the rotating client speaks reqwest: `reqwest::Request` in,
//! `reqwest::Response` out, errors are `reqwest::Error`. Each generation is
//! a fresh `reqwest::Client` with a fresh pool, so it resolves DNS anew
//! and can load the TLS material or token in force now. reqwest's builder
//! returns a `Result`; [`try_layer`] takes such a factory, returns its
//! first error, and keeps the current generation serving (and counts and
//! retries) when a later build fails. Enable TLS, `json` and `stream` on
//! reqwest itself, in your own `Cargo.toml`.
//!
//! ```no_run
//! # #[cfg(feature = "reqwest")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! use std::time::Duration;
//! use tower::ServiceExt;
//! use tower_rotating_client::RotatingClientLayer;
//!
//! let client = RotatingClientLayer::new(Duration::from_secs(5 * 60))
//!     .stagger_first_rotation(true)
//!     .try_layer(|| {
//!         reqwest::Client::builder()
//!             .connect_timeout(Duration::from_secs(5))
//!             .build()
//!     })?;
//!
//! let url: reqwest::Url = "http://127.0.0.1:8080/v1/models".parse()?;
//! // As a tower service (also inside a ServiceBuilder stack) ...
//! let request = reqwest::Request::new(reqwest::Method::GET, url.clone());
//! let response: reqwest::Response = client.clone().oneshot(request).await?;
//! let models: serde_json::Value = response.error_for_status()?.json().await?;
//! // ... or like reqwest's own `Client::execute`.
//! let response = client.execute(reqwest::Request::new(reqwest::Method::GET, url)).await?;
//! assert!(response.url().path().ends_with("/models"));
//! # let _ = models;
//! # Ok(())
//! # }
//! ```
//!
//! [`try_layer`]: crate::RotatingClientLayer::try_layer
//!
//! ## A per-upstream cache of rotating clients
//!
//! An LLM gateway talks to several providers, each with its own base URL
//! and credentials: one rotating client per upstream, built on first use.
//! Handles are cheap clones that pin nothing, so the cache hands out clones
//! and never evicts (an unused entry holds one idle client).
//!
//! ```
//! use std::collections::HashMap;
//! use std::convert::Infallible;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use tower::{service_fn, ServiceExt};
//! use tower::util::BoxCloneSyncService;
//! use tower_layer::Layer;
//! use tower_rotating_client::{RotatingClient, RotatingClientLayer};
//!
//! type Client = BoxCloneSyncService<http::Request<String>, http::Response<String>, Infallible>;
//!
//! #[derive(Clone, Default)]
//! struct Upstreams {
//!     clients: Arc<Mutex<HashMap<String, RotatingClient<Client>>>>,
//! }
//!
//! impl Upstreams {
//!     fn client(&self, base_url: &str) -> RotatingClient<Client> {
//!         let mut clients = self.clients.lock().expect("not poisoned");
//!         clients
//!             .entry(base_url.to_owned())
//!             .or_insert_with(|| {
//!                 let base_url = base_url.to_owned();
//!                 RotatingClientLayer::new(Duration::from_secs(15 * 60))
//!                     .layer(move || make_client(&base_url))
//!             })
//!             .clone()
//!     }
//! }
//!
//! // Stands in for a hyper-util client with this provider's credentials.
//! fn make_client(base_url: &str) -> Client {
//!     let base_url = base_url.to_owned();
//!     BoxCloneSyncService::new(service_fn(move |request: http::Request<String>| {
//!         let answer = format!("{base_url} answers {}", request.into_body());
//!         async move { Ok::<_, Infallible>(http::Response::new(answer)) }
//!     }))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let upstreams = Upstreams::default();
//! let response = upstreams
//!     .client("https://provider-a.example")
//!     .oneshot(http::Request::new("hello".to_owned()))
//!     .await
//!     .unwrap();
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, "https://provider-a.example answers hello");
//! assert_eq!(upstreams.clients.lock().unwrap().len(), 1);
//! # }
//! ```
//!
//! ## Exporting `stats()` to a metrics system
//!
//! [`stats()`](crate::RotatingClient::stats) is a snapshot cheap enough for
//! a scrape every few seconds. Export gauges for the live generations and
//! in-flight responses, and counters for rotations and failed builds; alert
//! on `failed_builds` growing and on `live_generations` staying high.
//!
//! ```
//! use std::time::Duration;
//! use tower_rotating_client::{RotatingClient, Stats};
//!
//! /// Whatever your metrics library offers: a gauge setter.
//! fn export(stats: &Stats, mut gauge: impl FnMut(&str, f64)) {
//!     gauge("rotating_client_generation", stats.current_generation.0 as f64);
//!     gauge("rotating_client_generation_age_seconds", stats.current_age().as_secs_f64());
//!     gauge("rotating_client_live_generations", stats.live_generations() as f64);
//!     gauge("rotating_client_in_flight", stats.in_flight() as f64);
//!     gauge("rotating_client_rotations_total", stats.rotations as f64);
//!     gauge("rotating_client_failed_builds_total", stats.failed_builds as f64);
//!     gauge("rotating_client_forced_retirements_total", stats.forced_retirements as f64);
//!     let oldest = stats.generations.first().map_or(0.0, |g| g.age.as_secs_f64());
//!     gauge("rotating_client_oldest_generation_age_seconds", oldest);
//! }
//!
//! /// Scrapes every `period`; spawn it and abort the task to stop.
//! async fn scrape<S: Send + 'static>(client: RotatingClient<S>, period: Duration) {
//!     let mut ticks = tokio::time::interval(period);
//!     loop {
//!         ticks.tick().await;
//!         export(&client.stats(), |name, value| println!("{name} {value}"));
//!     }
//! }
//! # let _ = scrape::<()>;
//! ```
