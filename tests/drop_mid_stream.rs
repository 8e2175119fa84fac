//! Which clients cut an in-flight stream when the client is dropped?
//!
//! For each client: start a streaming response from a loopback server,
//! read its first chunk, drop every handle on the client (only the response
//! is left), and see whether the rest of the stream still arrives. The
//! README's table comes from this test:
//!
//! ```sh
//! cargo test --test drop_mid_stream -- --nocapture
//! ```
//!
//! hyper-util's legacy `Client` (HTTP/1.1 and HTTP/2), `reqwest::Client`
//! and a tonic `Channel` (a health `Watch`) keep the connection alive for
//! as long as a response needs it, so they deliver the whole stream. The
//! test suite's [`AbortOnDropClient`] stands in for a client that closes its
//! connections when dropped (or when closed explicitly): it cuts the stream.

mod test_utils;

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use test_utils::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceExt;

const CHUNKS: usize = 10;
const CHUNK_DELAY_MS: u64 = 20;
const CHUNK_SIZE: usize = 64;
/// Bounds every wait.
const LIMIT: Duration = Duration::from_secs(10);

/// One row of the table: the client, and whether the stream arrived whole.
struct Row {
    client: &'static str,
    delivered: bool,
    detail: String,
}

/// Rows of every test in this binary, printed by the last one to finish.
static ROWS: Mutex<Vec<Row>> = Mutex::new(Vec::new());

fn path() -> String {
    format!("/stream?chunks={CHUNKS}&chunk-delay-ms={CHUNK_DELAY_MS}&chunk-size={CHUNK_SIZE}")
}

/// Reads the rest of `body` after `first`, and says how it went.
async fn rest_of<B>(first: Vec<u8>, mut body: B) -> (bool, String)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let expected = expected_body(CHUNKS, CHUNK_SIZE);
    let mut received = first;
    let outcome = tokio::time::timeout(LIMIT, async {
        loop {
            match body.frame().await {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        received.extend_from_slice(&data);
                    }
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err::<(), BoxError>("timed out".into()));
    let whole = received == expected && outcome.is_ok();
    let detail = match outcome {
        Ok(()) if received == expected => format!("{} of {} bytes", received.len(), expected.len()),
        Ok(()) => format!("ended after {} of {} bytes", received.len(), expected.len()),
        Err(e) => format!(
            "error after {} of {} bytes: {e}",
            received.len(),
            expected.len()
        ),
    };
    (whole, detail)
}

/// Records `row`, asserts `delivered == expect_delivered`, and prints the
/// table once every test of the binary has recorded its row.
fn record(row: Row, expect_delivered: bool) {
    const TESTS: usize = 6;
    let delivered = row.delivered;
    let line = format!("{}: {}", row.client, row.detail);
    {
        let mut rows = ROWS.lock().expect("not poisoned");
        rows.push(row);
        if rows.len() == TESTS {
            rows.sort_by_key(|row| row.client);
            println!();
            println!(
                "{:<34} {:<37} observed",
                "client", "cuts in-flight streams when dropped?"
            );
            for row in rows.iter() {
                let cuts = if row.delivered { "no" } else { "yes" };
                println!("{:<34} {:<37} {}", row.client, cuts, row.detail);
            }
        }
    }
    assert_eq!(
        delivered,
        expect_delivered,
        "{line}: the stream should {}arrive whole after the client is dropped",
        if expect_delivered { "" } else { "not " }
    );
}

async fn hyper_util(http2_only: bool) -> Row {
    let server = StreamServer::start().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2_only)
        .build_http::<Empty<Bytes>>();
    let request = Request::get(server.uri(&path()))
        .body(Empty::new())
        .expect("a valid request");
    let response = client.request(request).await.expect("response head");
    let mut body = response.into_body();
    let first = read_at_least(&mut body, CHUNK_SIZE)
        .await
        .expect("first chunk");
    drop(client);
    let (delivered, detail) = rest_of(first, body).await;
    Row {
        client: if http2_only {
            "hyper-util legacy Client, HTTP/2"
        } else {
            "hyper-util legacy Client, HTTP/1.1"
        },
        delivered,
        detail,
    }
}

async fn reqwest(http2: bool) -> Row {
    let server = StreamServer::start().await;
    let builder = reqwest::Client::builder();
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    let client = builder.build().expect("a reqwest client");
    let uri = server.uri(&path()).to_string();
    let mut response = client.get(uri).send().await.expect("response head");
    let mut first = Vec::new();
    while first.len() < CHUNK_SIZE {
        let chunk = response.chunk().await.expect("first chunk");
        first.extend_from_slice(&chunk.expect("the body has a first chunk"));
    }
    drop(client);
    // reqwest's `Response` is a body of its own, through its `Body` conversion.
    let body = reqwest::Body::from(response);
    let (delivered, detail) = rest_of(first, body).await;
    Row {
        client: if http2 {
            "reqwest::Client, HTTP/2"
        } else {
            "reqwest::Client, HTTP/1.1"
        },
        delivered,
        detail,
    }
}

#[tokio::test]
async fn hyper_util_http1_keeps_the_stream() {
    record(hyper_util(false).await, true);
}

#[tokio::test]
async fn hyper_util_http2_keeps_the_stream() {
    record(hyper_util(true).await, true);
}

#[tokio::test]
async fn reqwest_http1_keeps_the_stream() {
    record(reqwest(false).await, true);
}

#[tokio::test]
async fn reqwest_http2_keeps_the_stream() {
    record(reqwest(true).await, true);
}

/// A `Watch` stream: the current status at once, then one message per
/// change. After the channel is dropped, does the next change arrive?
#[tokio::test]
async fn tonic_channel_keeps_the_watch() {
    let server = HealthServer::start().await;
    let channel = tonic::transport::Endpoint::from_shared(server.endpoint_uri())
        .expect("a valid endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("first update");
    assert_eq!(
        first.map(|m| m.status()),
        Some(ServingStatus::Serving),
        "the watch starts with the current status"
    );
    drop((health, channel));

    server
        .set_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(LIMIT, watch.message()).await;
    let (delivered, detail) = match next {
        Ok(Ok(Some(update))) if update.status() == ServingStatus::NotServing => {
            (true, "the next update arrived".to_owned())
        }
        Ok(Ok(Some(update))) => (false, format!("unexpected update {update:?}")),
        Ok(Ok(None)) => (false, "the watch ended".to_owned()),
        Ok(Err(status)) => (false, format!("error: {status}")),
        Err(_) => (false, "timed out".to_owned()),
    };
    record(
        Row {
            client: "tonic Channel, health Watch",
            delivered,
            detail,
        },
        true,
    );
}

/// The stand-in for a client that closes its connections when dropped.
#[tokio::test]
async fn abort_on_drop_client_cuts_the_stream() {
    let server = StreamServer::start().await;
    let client = AbortOnDropClient::new(server.addr(), LiveCounter::new());
    let request = Request::get(server.uri(&path()))
        .body(Empty::new())
        .expect("a valid request");
    let response = client
        .clone()
        .oneshot(request)
        .await
        .expect("response head");
    let mut body = response.into_body();
    let first = read_at_least(&mut body, CHUNK_SIZE)
        .await
        .expect("first chunk");
    drop(client);
    let (delivered, detail) = rest_of(first, body).await;
    record(
        Row {
            client: "AbortOnDropClient (test suite)",
            delivered,
            detail,
        },
        false,
    );
}
