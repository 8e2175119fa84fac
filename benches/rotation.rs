//! The rotation moment: latency of the requests that start in the 100 ms
//! after a swap, against steady state, under a closed-loop load of 32
//! requests in flight on loopback.
//!
//! Four scenarios: HTTP/1.1 and HTTP/2 (h2c), each with
//!
//! - a *cold* sync factory: a new hyper-util `Client`, whose empty pool
//!   connects on first use, after the swap;
//! - a *pre-warmed* async factory (`layer_async`): the new `Client` sends
//!   warm-up requests before it is returned, so its pool is connected when
//!   it becomes current (HTTP/1.1: as many concurrent requests as the load
//!   has in flight, one connection each; HTTP/2: one request, one
//!   connection carries every stream).
//!
//! Rotations are triggered with `rotate()`, every 400 ms. "After swap" is
//! every request that started within 100 ms of `rotate()` returning;
//! "steady" is every request that started in the 200 ms before a
//! `rotate()` was called. Also timed: `rotate()` itself, and the slowest
//! request in flight while it ran, to show that a swap does not stall
//! requests.
//!
//! `cargo bench --bench rotation` is the full run (about 25 s);
//! `cargo bench --bench rotation -- --quick`, `BENCH_SMOKE=1` or
//! `cargo test --bench rotation` a smoke run of a few seconds.

#[allow(dead_code)] // each bench uses part of it
mod support;

use std::time::{Duration, Instant};

use tower::Layer;
use tower_rotating_client::{RotatingClient, RotatingClientLayer};

use support::{
    fetch, http_client, ms, quantile, smoke_mode, sorted_latencies, HttpClient, LoadGenerator,
    Sample, Server,
};

/// Requests in flight at all times.
const CONCURRENCY: usize = 32;
/// Requests that start this long after a swap count as "after swap".
const AFTER_SWAP: Duration = Duration::from_millis(100);
/// Requests that start this long before a `rotate()` count as "steady".
const STEADY: Duration = Duration::from_millis(200);
/// Time between the end of one `rotate()` and the start of the next.
const GAP: Duration = Duration::from_millis(400);
/// TTL: long enough that only `rotate()` rotates.
const TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug)]
enum Factory {
    Cold,
    PreWarmed,
}

/// One `rotate()` call.
struct Rotation {
    called: Instant,
    returned: Instant,
}

/// Sends `n` concurrent requests through a clone of `client` each, so that
/// its pool holds `n` connections (HTTP/1.1), or one (HTTP/2).
async fn warm(client: &HttpClient, uri: &http::Uri, n: usize) -> Result<(), String> {
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..n {
        let mut client = client.clone();
        let uri = uri.clone();
        requests.spawn(async move { fetch(&mut client, &uri).await });
    }
    while let Some(result) = requests.join_next().await {
        result.map_err(|error| error.to_string())??;
    }
    Ok(())
}

async fn rotating_client(
    factory: Factory,
    http2: bool,
    uri: &http::Uri,
) -> RotatingClient<HttpClient> {
    let layer = RotatingClientLayer::new(TTL);
    match factory {
        Factory::Cold => layer.layer(move || http_client(http2)),
        Factory::PreWarmed => {
            let uri = uri.clone();
            let connections = if http2 { 1 } else { CONCURRENCY };
            layer
                .layer_async(move || {
                    let uri = uri.clone();
                    async move {
                        let client = http_client(http2);
                        warm(&client, &uri, connections).await?;
                        Ok::<_, String>(client)
                    }
                })
                .await
                .expect("the first build connects")
        }
    }
}

/// One row of the table.
struct Row {
    scenario: String,
    steady: Vec<Duration>,
    after_swap: Vec<Duration>,
    /// The first request of each task from a steady moment, every swap.
    steady_first: Vec<Duration>,
    /// The first request of each task after every swap.
    first_after_swap: Vec<Duration>,
    rotate_durations: Vec<Duration>,
    /// The slowest request in flight at any moment while `rotate()` ran.
    max_during_rotate: Duration,
    connections_per_swap: f64,
    errors: usize,
}

async fn scenario(server: &Server, http2: bool, factory: Factory, swaps: usize) -> Row {
    let uri = support::uri(server);
    let client = rotating_client(factory, http2, &uri).await;
    let load = LoadGenerator::start(&client, &uri, CONCURRENCY);
    // Let the first generation's pool fill up.
    tokio::time::sleep(GAP).await;

    let accepted_before = server.total_connections();
    let mut rotations = Vec::with_capacity(swaps);
    for _ in 0..swaps {
        let called = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), client.rotate())
            .await
            .expect("rotate() within 10 s")
            .expect("the build succeeds");
        rotations.push(Rotation {
            called,
            returned: Instant::now(),
        });
        tokio::time::sleep(GAP).await;
    }
    let mut load = load.finish().await;
    load.samples.sort_unstable_by_key(|sample| sample.start);
    let connections = server.total_connections() - accepted_before;

    let in_window = |sample: &Sample, from: Instant, len: Duration| {
        sample.start >= from && sample.start < from + len
    };
    let steady = sorted_latencies(load.samples.iter().filter(|sample| {
        rotations
            .iter()
            .any(|rotation| in_window(sample, rotation.called - STEADY, STEADY))
    }));
    let after_swap = sorted_latencies(load.samples.iter().filter(|sample| {
        rotations
            .iter()
            .any(|rotation| in_window(sample, rotation.returned, AFTER_SWAP))
    }));
    // The first request of each task after a swap is the one that may have
    // to connect; compare with the first request of each task at a steady
    // moment.
    let first_of_each_task = |at: Instant| {
        let from = load.samples.partition_point(|sample| sample.start < at);
        let mut seen = [false; CONCURRENCY];
        load.samples[from..]
            .iter()
            .filter(move |sample| !std::mem::replace(&mut seen[sample.task], true))
            .take(CONCURRENCY)
    };
    let steady_first = sorted_latencies(
        rotations
            .iter()
            .flat_map(|rotation| first_of_each_task(rotation.called - STEADY)),
    );
    let first_after_swap = sorted_latencies(
        rotations
            .iter()
            .flat_map(|rotation| first_of_each_task(rotation.returned)),
    );
    let max_during_rotate = load
        .samples
        .iter()
        .filter(|sample| {
            rotations.iter().any(|rotation| {
                sample.start < rotation.returned && sample.start + sample.latency > rotation.called
            })
        })
        .map(|sample| sample.latency)
        .max()
        .unwrap_or_default();
    let mut rotate_durations: Vec<Duration> = rotations
        .iter()
        .map(|rotation| rotation.returned - rotation.called)
        .collect();
    rotate_durations.sort_unstable();

    Row {
        scenario: format!(
            "{} {}",
            if http2 { "HTTP/2" } else { "HTTP/1.1" },
            match factory {
                Factory::Cold => "cold (sync factory)",
                Factory::PreWarmed => "pre-warmed (async factory)",
            }
        ),
        steady,
        after_swap,
        steady_first,
        first_after_swap,
        rotate_durations,
        max_during_rotate,
        connections_per_swap: connections as f64 / swaps as f64,
        errors: load.errors,
    }
}

fn main() {
    let smoke = smoke_mode();
    let swaps = if smoke { 2 } else { 10 };
    let rt = support::runtime();
    let rows = rt.block_on(async {
        let server = Server::start().await;
        let mut rows = Vec::new();
        for http2 in [false, true] {
            for factory in [Factory::Cold, Factory::PreWarmed] {
                rows.push(scenario(&server, http2, factory, swaps).await);
            }
        }
        rows
    });

    println!(
        "\nrotation: {CONCURRENCY} requests in flight on loopback, {swaps} rotate() calls per \
         scenario, {GAP:?} apart{}",
        if smoke { " (smoke run)" } else { "" },
    );
    println!("machine: {}", support::machine());
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!("\nLatency of requests started in the {AFTER_SWAP:?} after each swap, against steady state:");
    println!(
        "\n| scenario | steady p50 (ms) | steady p99 (ms) | after-swap p50 (ms) | after-swap p99 (ms) \
         | p99 ratio | new connections per swap |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let steady_p99 = quantile(&row.steady, 0.99);
        let after_p99 = quantile(&row.after_swap, 0.99);
        println!(
            "| {} | {} | {} | {} | {} | {:.2}x | {:.1} |",
            row.scenario,
            ms(quantile(&row.steady, 0.50)),
            ms(steady_p99),
            ms(quantile(&row.after_swap, 0.50)),
            ms(after_p99),
            ratio(after_p99, steady_p99),
            row.connections_per_swap,
        );
    }
    println!(
        "\nThe first request of each of the {CONCURRENCY} tasks after each swap (those that may \
         have to connect), against the first of each task at a steady moment:"
    );
    println!("\n| scenario | steady p50 (ms) | steady max (ms) | after-swap p50 (ms) | after-swap max (ms) | p50 ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let steady_p50 = quantile(&row.steady_first, 0.50);
        let after_p50 = quantile(&row.first_after_swap, 0.50);
        println!(
            "| {} | {} | {} | {} | {} | {:.2}x |",
            row.scenario,
            ms(steady_p50),
            ms(row.steady_first.last().copied().unwrap_or_default()),
            ms(after_p50),
            ms(row.first_after_swap.last().copied().unwrap_or_default()),
            ratio(after_p50, steady_p50),
        );
    }
    println!("\nA swap under full load: how long rotate() took, and the slowest request in flight meanwhile:");
    println!(
        "\n| scenario | rotate() median (ms) | rotate() max (ms) \
         | slowest request during rotate() (ms) | slowest steady request (ms) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.scenario,
            ms(quantile(&row.rotate_durations, 0.50)),
            ms(row.rotate_durations.last().copied().unwrap_or_default()),
            ms(row.max_during_rotate),
            ms(row.steady.last().copied().unwrap_or_default()),
        );
    }
    println!("\ntarget: pre-warmed after-swap p99 within 1.2x of steady state");

    for row in &rows {
        assert_eq!(row.errors, 0, "{}: failed requests", row.scenario);
        assert!(
            !row.steady.is_empty() && !row.after_swap.is_empty(),
            "{}: no requests in a window",
            row.scenario
        );
    }
}
