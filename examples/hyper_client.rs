//! hyper-util's legacy `Client` behind `RotatingClientLayer`: a response
//! keeps streaming from its generation across a `rotate()`, while new
//! requests already go to the next one.
//!
//! ```sh
//! cargo run --example hyper_client
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_rotating_client::{GenerationStats, RotatingClientLayer, Stats};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type HttpClient = Client<HttpConnector, Empty<Bytes>>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Everything below finishes in about a second; this bounds it anyway.
    tokio::time::timeout(Duration::from_secs(10), run()).await?
}

async fn run() -> Result<(), BoxError> {
    let addr = start_server().await?;
    let uri = format!("http://{addr}/stream");

    let client = ServiceBuilder::new()
        .layer(
            RotatingClientLayer::new(Duration::from_secs(15 * 60)).on_retire(
                |_client: HttpClient, generation: GenerationStats| {
                    println!(
                        "generation {} retired: served {} request(s), drained in {:?}",
                        generation.id,
                        generation.requests,
                        generation.draining_for.unwrap_or_default()
                    );
                },
            ),
        )
        .service(|| Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>());

    // A long stream starts on generation 1.
    let request = Request::get(&uri).body(Empty::new())?;
    let mut stream = client.clone().oneshot(request).await?.into_body();
    let first = stream.frame().await.ok_or("stream ended early")??;
    println!(
        "stream: first chunk {:?}",
        first.into_data().unwrap_or_default()
    );
    print_stats("before rotate", &client.stats());

    // Rotate now (a credential changed, say). The stream keeps generation 1.
    let generation = client.rotate().await?;
    println!("rotated: generation {generation} is current");
    print_stats("after rotate", &client.stats());

    // A new request goes to generation 2, while generation 1 is draining.
    let request = Request::get(&uri).body(Empty::new())?;
    let short = client.clone().oneshot(request).await?;
    let bytes = short.into_body().collect().await?.to_bytes();
    println!(
        "new request: {} bytes from generation {generation}",
        bytes.len()
    );

    // The rest of the stream arrives intact; at its end, generation 1 retires.
    let mut chunks = 1;
    while let Some(frame) = stream.frame().await {
        if frame?.is_data() {
            chunks += 1;
        }
    }
    println!(
        "stream: {chunks} chunks in all, holds its generation: {}",
        stream.holds_generation()
    );
    print_stats("at the end", &client.stats());
    Ok(())
}

fn print_stats(when: &str, stats: &Stats) {
    println!(
        "  stats {when}: current {}, live {}, in flight {}, rotations {}",
        stats.current_generation,
        stats.live_generations(),
        stats.in_flight(),
        stats.rotations
    );
    for g in &stats.generations {
        println!(
            "    generation {}: current {}, in flight {}, requests {}",
            g.id, g.current, g.in_flight, g.requests
        );
    }
}

/// An HTTP/1.1 server on loopback that streams 5 chunks, 100 ms apart.
async fn start_server() -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_request| async {
                let tick = tokio::time::interval(Duration::from_millis(100));
                Ok::<_, Infallible>(Response::new(Chunks { left: 5, tick }))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    Ok(addr)
}

/// A body of `left` chunks, one per tick of `tick`.
struct Chunks {
    left: usize,
    tick: tokio::time::Interval,
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
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"chunk\n")))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}
