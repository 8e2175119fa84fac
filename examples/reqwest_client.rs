//! reqwest behind `RotatingClientLayer`, with reqwest's own request and
//! response types: `json()`, `bytes_stream()` and `error_for_status()`
//! work as usual, and a stream keeps its generation across a `rotate()`.
//!
//! ```sh
//! cargo run --example reqwest_client --features reqwest
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_rotating_client::RotatingClientLayer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Everything below finishes at once; this bounds it anyway.
    tokio::time::timeout(Duration::from_secs(10), run()).await?
}

async fn run() -> Result<(), BoxError> {
    let url = format!("http://{}/status", start_server().await?);

    // A fallible factory: reqwest's builder returns a Result.
    let client = RotatingClientLayer::new(Duration::from_secs(5 * 60))
        .try_layer(|| reqwest::Client::builder().pool_max_idle_per_host(8).build())?;

    // The tower way: a reqwest::Request in, a reqwest::Response out.
    let request = reqwest::Request::new(reqwest::Method::GET, url.parse()?);
    let response: reqwest::Response = client.clone().oneshot(request).await?;
    let status: serde_json::Value = response.error_for_status()?.json().await?;
    println!("json: {status}");

    // The reqwest way: `execute`. Hold a stream open across a rotation.
    let request = reqwest::Request::new(reqwest::Method::GET, url.parse()?);
    let mut stream = client.execute(request).await?.bytes_stream();
    let generation = client.rotate().await?;
    println!(
        "rotated to generation {generation}; live generations: {}",
        client.stats().live_generations()
    );
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    println!(
        "stream: {bytes} bytes; live generations now: {}",
        client.stats().live_generations()
    );
    Ok(())
}

/// A loopback HTTP server answering every request with a little JSON.
async fn start_server() -> Result<std::net::SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_request| async {
                let body = Full::new(Bytes::from_static(br#"{"healthy":true}"#));
                Ok::<_, Infallible>(http::Response::new(body))
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok(addr)
}
