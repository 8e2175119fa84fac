//! Act 2, the scale-up: request loops through a plain hyper-util client and
//! through the same client under `RotatingClientLayer`, side by side,
//! against three backends behind one name that gains two addresses.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::{timeout, Instant};
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::RotatingClientLayer;

use crate::loopback::{error_chain, Backends, BoxError, Dns, BACKENDS_HOST, BACKEND_HEADER};

/// Act 2's knobs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub http1: bool,
    pub loops: u64,
    pub ttl: Duration,
    pub change_at: Duration,
    pub duration: Duration,
}

/// Bar width, in characters, of the per-second shares.
const BAR: usize = 20;

type Legacy = hyper_util::client::legacy::Client<HttpConnector<Dns>, Empty<Bytes>>;

/// A hyper-util client that resolves through `dns`: HTTP/2 with prior
/// knowledge (one connection per client) or pooled HTTP/1.1.
fn build_client(dns: Dns, http1: bool) -> Legacy {
    let mut connector = HttpConnector::new_with_resolver(dns);
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(!http1)
        .build(connector)
}

/// Requests per backend, per second of the run and after the change.
struct Shares {
    per_second: Vec<[AtomicU64; 3]>,
    after_change: [AtomicU64; 3],
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shares {
    fn new(seconds: usize) -> Self {
        Shares {
            per_second: (0..seconds).map(|_| Default::default()).collect(),
            after_change: Default::default(),
            failed: AtomicU64::new(0),
            first_error: Mutex::default(),
        }
    }

    fn second(&self, second: usize) -> [u64; 3] {
        self.per_second
            .get(second)
            .map_or([0; 3], |counts| counts.each_ref().map(|c| c.load(Relaxed)))
    }

    fn after_change(&self) -> [u64; 3] {
        self.after_change.each_ref().map(|c| c.load(Relaxed))
    }
}

/// The share of backends 2 and 3, in `0.0..=1.0` (0 for no requests).
fn new_share(counts: [u64; 3]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        0.0
    } else {
        (counts[1] + counts[2]) as f64 / total as f64
    }
}

/// `100%  0%  0% 11111111111111111111`: each backend's share, then a bar
/// of [`BAR`] characters, each the index of the backend it stands for.
fn share_cell(counts: [u64; 3]) -> String {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return format!("{:>4} {:>4} {:>4} {:BAR$}", "-", "-", "-", "");
    }
    let percent = counts.map(|c| format!("{}%", (c * 100 + total / 2) / total));
    // Cumulative rounding, so the bar is always exactly BAR wide.
    let mut bar = String::new();
    let mut cumulative = 0;
    for (i, count) in counts.iter().enumerate() {
        cumulative += count;
        let end = ((cumulative * BAR as u64 + total / 2) / total) as usize;
        while bar.len() < end {
            bar.push(char::from(b'1' + i as u8));
        }
    }
    format!(
        "{:>4} {:>4} {:>4} {bar}",
        percent[0], percent[1], percent[2]
    )
}

/// Sends requests back to back until `deadline`, recording which backend
/// served each one.
async fn request_loop<S, B>(
    service: S,
    uri: http::Uri,
    start: Instant,
    change_at: Duration,
    deadline: Instant,
    shares: Arc<Shares>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    while Instant::now() < deadline {
        let sent = start.elapsed();
        let one = async {
            let request = Request::get(uri.clone()).body(Empty::new())?;
            let response = service.clone().oneshot(request).await.map_err(Into::into)?;
            let backend = response
                .headers()
                .get(BACKEND_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|b| (1..=3).contains(b))
                .ok_or("response without a backend tag")?;
            response.into_body().collect().await.map_err(Into::into)?;
            Ok::<_, BoxError>(backend - 1)
        };
        match timeout(Duration::from_secs(2), one).await {
            Ok(Ok(backend)) => {
                if let Some(counts) = shares.per_second.get(sent.as_secs() as usize) {
                    counts[backend].fetch_add(1, Relaxed);
                }
                if sent >= change_at {
                    shares.after_change[backend].fetch_add(1, Relaxed);
                }
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => error_chain(&*e),
                    _ => "timed out".to_owned(),
                };
                shares.failed.fetch_add(1, Relaxed);
                shares
                    .first_error
                    .lock()
                    .expect("not poisoned")
                    .get_or_insert(error);
            }
        }
    }
}

/// The scale-up: what it showed, or why it failed. It passes if the
/// rotating side failed nothing and moved at least a third of its traffic
/// after the change to the new backends.
pub async fn run(config: Config) -> Result<String, String> {
    let backends = Backends::start()
        .await
        .map_err(|e| format!("cannot start three backends on 127.0.0.1-3: {e}"))?;
    let port = backends.addrs[0].port();
    let uri: http::Uri = format!("http://{BACKENDS_HOST}:{port}/")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let protocol = if config.http1 {
        "HTTP/1.1"
    } else {
        "HTTP/2 (h2c)"
    };
    eprintln!("Act 2: backends added behind DNS");
    eprintln!(
        "{BACKENDS_HOST} resolves to 127.0.0.1 until t = {:.1} s, then to 127.0.0.1-3 (round robin)",
        config.change_at.as_secs_f64()
    );
    eprintln!(
        "{} request loops per client for {} s over {protocol}, rotating TTL {} ms",
        config.loops,
        config.duration.as_secs(),
        config.ttl.as_millis(),
    );

    let dns = Dns::new(&backends.addrs);
    let http1 = config.http1;
    let plain = build_client(dns.for_another_client(), http1);
    let retired = Arc::new(AtomicU64::new(0));
    let rotating = RotatingClientLayer::new(config.ttl)
        .on_retire({
            let retired = Arc::clone(&retired);
            move |client: Legacy, _generation| {
                drop(client);
                retired.fetch_add(1, Relaxed);
            }
        })
        .layer({
            let dns = dns.for_another_client();
            move || build_client(dns.clone(), http1)
        });

    let seconds = config.duration.as_secs() as usize;
    let plain_shares = Arc::new(Shares::new(seconds));
    let rotating_shares = Arc::new(Shares::new(seconds));
    let start = Instant::now();
    let deadline = start + config.duration;
    let mut loops = Vec::new();
    for _ in 0..config.loops {
        loops.push(tokio::spawn(request_loop(
            plain.clone(),
            uri.clone(),
            start,
            config.change_at,
            deadline,
            Arc::clone(&plain_shares),
        )));
        loops.push(tokio::spawn(request_loop(
            rotating.clone(),
            uri.clone(),
            start,
            config.change_at,
            deadline,
            Arc::clone(&rotating_shares),
        )));
    }

    // The change, then one line a second.
    let change = {
        let dns = dns.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + config.change_at).await;
            dns.scale_up();
        })
    };
    let cell_width = 15 + BAR;
    eprintln!(
        "{:<7} {:<cell_width$}   RotatingClientLayer",
        "second", "plain client"
    );
    eprintln!(
        "{:<7} {:>4} {:>4} {:>4} {:BAR$}   {:>4} {:>4} {:>4}",
        "", "b1", "b2", "b3", "", "b1", "b2", "b3"
    );
    for second in 0..seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second as u64 + 1)).await;
        eprintln!(
            "{:<7} {}   {}",
            format!("{}-{} s", second, second + 1),
            share_cell(plain_shares.second(second)),
            share_cell(rotating_shares.second(second)),
        );
    }
    let _ = change.await;
    for request_loop in loops {
        let _ = request_loop.await;
    }
    // Every loop is done, so every generation but the current one has
    // drained and retired by now.
    let stats = rotating.stats();
    let retired = retired.load(Relaxed);
    drop((plain, rotating));

    let plain_after = plain_shares.after_change();
    let rotating_after = rotating_shares.after_change();
    let last = seconds.saturating_sub(1);
    let row = |label: &str, plain: String, rotating: String| {
        println!("{label:<26} {plain:>14} {rotating:>20}");
    };
    let percent = |share: f64| format!("{:.1}%", share * 100.0);
    println!();
    println!(
        "{:<26} {:>14} {:>20}",
        "", "plain client", "RotatingClientLayer"
    );
    row(
        "requests after the change",
        plain_after.iter().sum::<u64>().to_string(),
        rotating_after.iter().sum::<u64>().to_string(),
    );
    row(
        "new backends, after change",
        percent(new_share(plain_after)),
        percent(new_share(rotating_after)),
    );
    row(
        "new backends, last second",
        percent(new_share(plain_shares.second(last))),
        percent(new_share(rotating_shares.second(last))),
    );
    row(
        "requests failed",
        plain_shares.failed.load(Relaxed).to_string(),
        rotating_shares.failed.load(Relaxed).to_string(),
    );
    row("rotations", "-".to_owned(), stats.rotations.to_string());
    row("generations retired", "-".to_owned(), retired.to_string());
    for (name, shares) in [
        ("plain client", &plain_shares),
        ("RotatingClientLayer", &rotating_shares),
    ] {
        if let Some(e) = &*shares.first_error.lock().expect("not poisoned") {
            println!("\nfirst failed request, {name}: {e}");
        }
    }
    drop(backends);

    let rotating_failed = rotating_shares.failed.load(Relaxed);
    let moved = new_share(rotating_after);
    if rotating_failed > 0 {
        Err(format!(
            "RotatingClientLayer failed {rotating_failed} requests"
        ))
    } else if moved < 1.0 / 3.0 {
        Err(format!(
            "RotatingClientLayer sent only {} of its requests after the change to the new backends: \
             lower --scale-ttl-ms or raise --scale-duration-s",
            percent(moved)
        ))
    } else {
        Ok(format!(
            "after the change the plain client sent {} of its requests to the new backends; \
             RotatingClientLayer sent {} and failed none",
            percent(new_share(plain_after)),
            percent(moved)
        ))
    }
}
