//! End to end on loopback: a hyper-util `Client` against a hyper server on
//! 127.0.0.1, 64 requests in flight at all times, small bodies, with and
//! without the layer (TTL 1 s, so it rotates during the run).
//!
//! The two variants run in alternating windows (ABBA order), so that drift
//! on a shared machine hits both alike. Prints throughput, p50, p99 and max
//! latency per variant, and the ratios.
//!
//! `cargo bench --bench end_to_end` is the full run (about 25 s);
//! `cargo bench --bench end_to_end -- --quick`, `BENCH_SMOKE=1` or
//! `cargo test --bench end_to_end` a smoke run of about a second.

#[allow(dead_code)] // each bench uses part of it
mod support;

use std::time::Duration;

use tower::Layer;
use tower_rotating_client::RotatingClientLayer;

use support::{
    http_client, ms, quantile, smoke_mode, sorted_latencies, Load, LoadGenerator, Server,
};

/// Requests in flight at all times.
const CONCURRENCY: usize = 64;
/// TTL of the layered client.
const TTL: Duration = Duration::from_secs(1);

/// One variant's totals.
#[derive(Default)]
struct Totals {
    load: Load,
    elapsed: Duration,
}

impl Totals {
    fn throughput(&self) -> f64 {
        self.load.samples.len() as f64 / self.elapsed.as_secs_f64()
    }
}

fn main() {
    let smoke = smoke_mode();
    let (rounds, window) = if smoke {
        (1, Duration::from_millis(200))
    } else {
        (6, Duration::from_millis(1500))
    };
    let rt = support::runtime();
    rt.block_on(async {
        let server = Server::start().await;
        let uri = support::uri(&server);
        let bare = http_client(false);
        let layered = RotatingClientLayer::new(TTL).layer(|| http_client(false));

        // Warm both pools and the server.
        LoadGenerator::run(&bare, &uri, CONCURRENCY, window / 2).await;
        LoadGenerator::run(&layered, &uri, CONCURRENCY, window / 2).await;
        let rotations_before = layered.stats().rotations;

        let (mut without, mut with) = (Totals::default(), Totals::default());
        for round in 0..rounds * 2 {
            // ABBA: bare first in rounds 0 and 3 of every four windows.
            let layered_first = matches!(round % 4, 1 | 2);
            let started = std::time::Instant::now();
            if layered_first {
                let load = LoadGenerator::run(&layered, &uri, CONCURRENCY, window).await;
                with.elapsed += started.elapsed();
                with.load.merge(load);
            } else {
                let load = LoadGenerator::run(&bare, &uri, CONCURRENCY, window).await;
                without.elapsed += started.elapsed();
                without.load.merge(load);
            }
        }
        let rotations = layered.stats().rotations - rotations_before;

        println!(
            "\nend_to_end: {CONCURRENCY} concurrent GETs, {}-byte bodies, HTTP/1.1 on loopback, \
             {rounds} x {window:?} per variant, interleaved{}",
            support::BODY_LEN,
            if smoke { " (smoke run)" } else { "" },
        );
        println!("machine: {}", support::machine());
        println!("\n| variant | requests | errors | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let mut p99s = Vec::new();
        for (name, totals) in [
            ("hyper-util Client", &without),
            ("RotatingClient, TTL 1 s", &with),
        ] {
            let latencies = sorted_latencies(&totals.load.samples);
            p99s.push(quantile(&latencies, 0.99));
            println!(
                "| {name} | {} | {} | {:.0} | {} | {} | {} |",
                totals.load.samples.len(),
                totals.load.errors,
                totals.throughput(),
                ms(quantile(&latencies, 0.50)),
                ms(quantile(&latencies, 0.99)),
                ms(latencies.last().copied().unwrap_or_default()),
            );
        }
        println!(
            "\nthroughput ratio (with / without): {:.3} (target >= 0.98)",
            with.throughput() / without.throughput()
        );
        println!(
            "p99 ratio (with / without): {:.3} (target <= 1.10)",
            p99s[1].as_secs_f64() / p99s[0].as_secs_f64()
        );
        println!("rotations during the measured windows: {rotations}");
        println!("connections accepted by the server: {}", server.total_connections());

        for (name, totals) in [("without", &without), ("with", &with)] {
            assert!(
                !totals.load.samples.is_empty(),
                "{name} the layer: no request succeeded"
            );
            assert_eq!(
                totals.load.errors, 0,
                "{name} the layer: failed requests, first: {:?}",
                totals.load.first_error
            );
        }
        if !smoke {
            assert!(rotations > 0, "the layered client rotated during the run");
        }
    });
}
