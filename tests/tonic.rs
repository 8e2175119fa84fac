//! tonic `Channel`s as the rotated client, under a generated gRPC client.
//!
//! A server-streaming `Watch` stays open across rotations and receives
//! every status change, its end-of-stream trailers come through, non-OK
//! statuses keep their code, and unary calls keep working throughout. The
//! async factory (`Endpoint::connect`) connects before each swap and hands
//! the first connect error to the caller.

mod test_utils;

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use test_utils::*;
use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus as PbStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tower_layer::Layer;
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

const TTL: Duration = Duration::from_millis(30);
/// Bounds every call and every wait.
const LIMIT: Duration = Duration::from_secs(10);
/// The service whose status the tests flip and watch.
const SERVICE: &str = "test.Flipped";
/// Status changes sent while the watch is open, one rotation apart.
const FLIPS: usize = 6;

type Health = HealthClient<RotatingClient<Channel>>;

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

fn wire(status: ServingStatus) -> PbStatus {
    match status {
        ServingStatus::Serving => PbStatus::Serving,
        ServingStatus::NotServing => PbStatus::NotServing,
        ServingStatus::Unknown => PbStatus::Unknown,
    }
}

async fn check(health: &mut Health, service: &str) -> Result<PbStatus, tonic::Status> {
    let response = timeout(LIMIT, health.check(request(service)))
        .await
        .expect("check answered in time")?;
    Ok(response.into_inner().status())
}

/// A rotating client whose async factory dials `endpoint` eagerly
/// (`Endpoint::connect`) for every generation, the first one included.
async fn connecting(
    endpoint: Endpoint,
) -> Result<RotatingClient<Channel>, tonic::transport::Error> {
    RotatingClientLayer::new(TTL)
        .layer_async(move || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await }
        })
        .await
}

/// Waits until the client has rotated at least once more.
async fn next_rotation(rotating: &RotatingClient<Channel>) {
    let before = rotating.stats().rotations;
    wait_until("the next rotation", LIMIT, || {
        rotating.stats().rotations > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_and_check_across_rotations() {
    let server = HealthServer::start().await;
    server.set_status(SERVICE, ServingStatus::Serving).await;
    let endpoint = Endpoint::from_shared(server.endpoint_uri()).expect("endpoint uri");
    // `connect_lazy` spawns the channel's worker, so the factory runs inside
    // the runtime: here, and on the layer's background task.
    let rotating = RotatingClientLayer::new(TTL).layer(move || endpoint.connect_lazy());
    let mut health = HealthClient::new(rotating.clone());

    let first_generation = rotating.stats().current_generation.0;
    let mut watch = timeout(LIMIT, health.watch(request(SERVICE)))
        .await
        .expect("watch answered in time")
        .expect("watch accepted")
        .into_inner();
    let first = timeout(LIMIT, watch.message())
        .await
        .expect("first status in time")
        .expect("first status")
        .expect("the watch is open");
    assert_eq!(first.status(), PbStatus::Serving);
    let watch_generations = first_generation..=rotating.stats().current_generation.0;

    // Unary calls, all the time, in the background.
    let stop = Arc::new(AtomicBool::new(false));
    let checker = tokio::spawn({
        let (mut health, stop) = (health.clone(), Arc::clone(&stop));
        async move {
            let mut calls = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let status = check(&mut health, SERVICE).await;
                assert!(status.is_ok(), "check across rotations: {status:?}");
                calls += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            calls
        }
    });

    // One status change per rotation; the watch sees each one, in order.
    let mut status = ServingStatus::Serving;
    for flip in 0..FLIPS {
        next_rotation(&rotating).await;
        status = match status {
            ServingStatus::Serving => ServingStatus::NotServing,
            _ => ServingStatus::Serving,
        };
        server.set_status(SERVICE, status).await;
        let update = timeout(LIMIT, watch.message())
            .await
            .expect("update in time")
            .expect("the watch survives rotations")
            .expect("the watch is still open");
        assert_eq!(update.status(), wire(status), "update {flip}");
        assert_eq!(
            check(&mut health, SERVICE).await.expect("check"),
            wire(status),
            "check after update {flip}"
        );
    }
    let stats = rotating.stats();
    assert!(
        stats.rotations >= FLIPS as u64,
        "the watch was open across {} rotations only",
        stats.rotations
    );
    assert!(
        stats
            .generations
            .iter()
            .any(|g| watch_generations.contains(&g.id.0) && !g.current && g.in_flight > 0),
        "the open watch keeps its retired generation alive: {stats:?}"
    );

    stop.store(true, Ordering::Relaxed);
    let calls = timeout(LIMIT, checker)
        .await
        .expect("checker stopped in time")
        .expect("every background check succeeded");
    assert!(calls > 0, "the background checks ran");

    // Non-OK statuses keep their exact code through the layer.
    let unknown = check(&mut health, "test.Unknown")
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let unknown = timeout(LIMIT, health.watch(request("test.Unknown")))
        .await
        .expect("watch answered in time")
        .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // Clearing the service ends the watch cleanly: grpc-status 0, in the
    // trailers, which arrive intact.
    let mut reporter = server.reporter().clone();
    reporter.clear_service_status(SERVICE).await;
    let end = timeout(LIMIT, watch.message()).await.expect("end in time");
    assert!(matches!(end, Ok(None)), "clean end of stream: {end:?}");
    let trailers = timeout(LIMIT, watch.trailers())
        .await
        .expect("trailers in time")
        .expect("trailers")
        .expect("the stream ended with trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().ok()),
        Some(Some("0")),
        "{trailers:?}"
    );

    // The watch ended at its trailers: though still held, it no longer
    // keeps its generation alive.
    wait_until("only the current generation is live", LIMIT, || {
        rotating.stats().live_generations() == 1
    })
    .await;
    drop(watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_factory_connects_before_each_swap() {
    let server = HealthServer::start().await;
    let endpoint = Endpoint::from_shared(server.endpoint_uri()).expect("endpoint uri");
    let rotating = timeout(LIMIT, connecting(endpoint))
        .await
        .expect("first connect in time")
        .expect("first connect");
    // `connect` dialled before the layer returned.
    wait_until("the first connection is accepted", LIMIT, || {
        server.total_connections() == 1
    })
    .await;

    let mut health = HealthClient::new(rotating.clone());
    while rotating.stats().rotations < 3 {
        assert_eq!(
            check(&mut health, "")
                .await
                .expect("check across rotations"),
            PbStatus::Serving
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Every generation that became current had connected when it was
    // built: the connections at least match the generations.
    let stats = rotating.stats();
    assert_eq!(stats.failed_builds, 0);
    assert!(
        server.total_connections() as u64 > stats.rotations,
        "{} connections for {} generations",
        server.total_connections(),
        stats.rotations + 1
    );
}

#[tokio::test]
async fn async_factory_returns_the_first_connect_error() {
    // A port that was just free: nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0");
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint uri");

    let result = timeout(LIMIT, connecting(endpoint))
        .await
        .expect("connect failed in time");
    // The factory's own error type, unchanged.
    let error: tonic::transport::Error = result.expect_err("nothing listens there");
    let mut source = error.source();
    let mut refused = false;
    while let Some(cause) = source {
        refused |= cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        source = cause.source();
    }
    assert!(refused, "connection refused in the chain: {error:?}");
}
