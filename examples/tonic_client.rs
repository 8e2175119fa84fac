//! A tonic `Channel` that reconnects every 300 ms, under a gRPC client.
//!
//! A `Watch` stream opened on the first channel keeps receiving status
//! changes while new channels come and go under it; unary calls always go to
//! the newest one. The first channel is retired once the stream is dropped.
//!
//! ```sh
//! cargo run --example tonic_client
//! ```

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::ServingStatus;
use tower_rotating_client::{GenerationStats, RotatingClientLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const SERVICE: &str = "demo.Echo";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Everything below finishes in about two seconds; this bounds it anyway.
    tokio::time::timeout(Duration::from_secs(10), run()).await?
}

async fn run() -> Result<(), BoxError> {
    // A gRPC health server on loopback.
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = Endpoint::from_shared(format!("http://{}", listener.local_addr()?))?;
    tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    // Each generation is a channel connected before it becomes current; the
    // first connect error would be returned right here.
    let channel = RotatingClientLayer::new(Duration::from_millis(300))
        .on_retire(|_channel: Channel, generation: GenerationStats| {
            println!(
                "channel {} retired after {:?}, {} call(s)",
                generation.id, generation.age, generation.requests
            );
        })
        .layer_async(move || {
            let endpoint = endpoint.clone();
            async move { endpoint.connect().await }
        })
        .await?;
    let mut health = HealthClient::new(channel.clone());

    let request = || HealthCheckRequest {
        service: SERVICE.to_owned(),
    };
    let mut watch = health.watch(request()).await?.into_inner();

    // The first message is the status when the watch started; then one
    // message per change, however many channels have come and gone since.
    let changes = [
        ServingStatus::NotServing,
        ServingStatus::Serving,
        ServingStatus::NotServing,
        ServingStatus::Serving,
    ];
    for change in [None].into_iter().chain(changes.map(Some)) {
        if let Some(status) = change {
            tokio::time::sleep(Duration::from_millis(250)).await;
            reporter.set_service_status(SERVICE, status).await;
        }
        let watched = watch.message().await?.ok_or("watch ended")?.status();
        let checked = health.check(request()).await?.into_inner().status();
        let stats = channel.stats();
        println!(
            "watch: {:<11} check: {:<11} current channel {}, live channels {}",
            watched.as_str_name(),
            checked.as_str_name(),
            stats.current_generation,
            stats.live_generations(),
        );
    }

    let stats = channel.stats();
    println!(
        "{} rotations; the watch stream still holds channel {}",
        stats.rotations,
        stats.generations.first().map_or(0, |g| g.id.0)
    );
    drop(watch);
    println!(
        "watch dropped; {} live channel(s)",
        channel.stats().live_generations()
    );
    Ok(())
}
