//! An axum reverse proxy whose upstream client rotates every 400 ms while
//! slow streamed responses pass through it untouched.
//!
//! The example starts a streaming upstream and the proxy on loopback, sends
//! a few overlapping requests through the proxy, and prints what happened.
//!
//! ```sh
//! cargo run --example axum_proxy
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_rotating_client::{GenerationStats, RotatingClient, RotatingClientLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Upstream = Client<HttpConnector, Body>;

#[derive(Clone)]
struct Proxy {
    client: RotatingClient<Upstream>,
    upstream: SocketAddr,
}

/// Forwards the request upstream and streams the response body back as it
/// arrives. The body keeps its generation alive until it ends.
async fn proxy(State(proxy): State<Proxy>, mut request: Request) -> Result<Response, StatusCode> {
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    *request.uri_mut() = format!("http://{}{path}", proxy.upstream)
        .parse()
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    let response = proxy
        .client
        .clone()
        .oneshot(request)
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(response.map(Body::new))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Everything below finishes in about two seconds; this bounds it anyway.
    tokio::time::timeout(Duration::from_secs(10), run()).await?
}

async fn run() -> Result<(), BoxError> {
    let start = Instant::now();
    let upstream = serve(Router::new().route("/tokens", get(slow_tokens))).await?;

    let client = ServiceBuilder::new()
        .layer(
            RotatingClientLayer::new(Duration::from_millis(400)).on_retire(
                move |_client: Upstream, generation: GenerationStats| {
                    println!(
                        "{:>5} ms  generation {} retired after serving {} request(s)",
                        start.elapsed().as_millis(),
                        generation.id,
                        generation.requests,
                    );
                },
            ),
        )
        .service(|| Client::builder(TokioExecutor::new()).build_http::<Body>());
    let app = Router::new().fallback(any(proxy)).with_state(Proxy {
        client: client.clone(),
        upstream,
    });
    let proxy_addr = serve(app).await?;

    // Three overlapping 900 ms streams through the proxy, 300 ms apart.
    let downstream = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut streams = Vec::new();
    for i in 0..3 {
        let downstream = downstream.clone();
        let client = client.clone();
        let uri = format!("http://{proxy_addr}/tokens");
        streams.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300) * i).await;
            println!(
                "{:>5} ms  stream {i}: sent (proxy client on generation {})",
                start.elapsed().as_millis(),
                client.stats().current_generation,
            );
            let response = downstream.get(uri.parse()?).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            println!(
                "{:>5} ms  stream {i}: {status}, {} tokens",
                start.elapsed().as_millis(),
                body.split(|&b| b == b' ').filter(|t| !t.is_empty()).count(),
            );
            Ok::<_, BoxError>(body.len())
        }));
    }
    for stream in streams {
        stream.await??;
    }

    let stats = client.stats();
    println!(
        "proxy client: generation {} current, {} rotations, {} live, {} in flight",
        stats.current_generation,
        stats.rotations,
        stats.live_generations(),
        stats.in_flight()
    );
    Ok(())
}

/// Serves `app` on a fresh loopback port, in the background.
async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// The upstream: 10 tokens, 100 ms apart, like an LLM completion.
async fn slow_tokens() -> Body {
    let tick = tokio::time::interval(Duration::from_millis(100));
    Body::new(Tokens { left: 10, tick })
}

struct Tokens {
    left: usize,
    tick: tokio::time::Interval,
}

impl http_body::Body for Tokens {
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
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"token ")))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}
