//! Act 2, the scale-up: request loops through three hyper-util clients side
//! by side, against three backends behind one name that gains two
//! addresses: the client built once, the same client under
//! `RotatingClientLayer` with a short TTL, and under a one-hour TTL with a
//! probe of the name.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tower::{Layer, Service, ServiceExt};
use tower_rotating_client::{Probe, RotatingClient, RotatingClientLayer};

use crate::loopback::{error_chain, Backends, BoxError, Dns, BACKENDS_HOST, BACKEND_HEADER};

/// Act 2's knobs.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub http1: bool,
    pub loops: u64,
    pub ttl: Duration,
    pub probe_period: Duration,
    pub change_at: Duration,
    pub duration: Duration,
}

/// The probed client's TTL: long enough that only the probe rotates it.
const PROBE_TTL: Duration = Duration::from_secs(3600);
/// Probe periods after the change left out of the stable windows: the
/// probe's two confirmations and the rotation fit in well within them.
const SETTLE_PERIODS: u32 = 5;
/// The most rotations the probed client may make: the one the change
/// asks for, and one spare.
const PROBE_MAX_ROTATIONS: u64 = 2;
/// Bar width, in characters, of the per-second shares.
const BAR: usize = 10;

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

/// `build_client` under `layer`, with a round-robin position of its own,
/// and the count of the generations it retired.
fn rotating(
    layer: RotatingClientLayer,
    dns: &Dns,
    http1: bool,
) -> (RotatingClient<Legacy>, Arc<AtomicU64>) {
    let retired = Arc::new(AtomicU64::new(0));
    let client = layer
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
    (client, retired)
}

/// A probe of [`BACKENDS_HOST`] through the demo's resolver, every
/// `period`: the answer as a set, a rotation when it gains an address.
fn dns_probe(dns: Dns, period: Duration) -> Probe<BTreeSet<SocketAddr>> {
    Probe::new(period, move || {
        let answer = dns.lookup(BACKENDS_HOST);
        std::future::ready(answer.map(|addrs| addrs.into_iter().collect::<BTreeSet<_>>()))
    })
    // What `Probe::dns` does by default: an address that went away is left
    // by the old pool on its own; only a new one needs a new client.
    .changed_when(|seen, now| !now.is_subset(seen))
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

/// What every request loop shares.
#[derive(Clone)]
struct Load {
    uri: http::Uri,
    start: Instant,
    change_at: Duration,
    deadline: Instant,
}

/// `loops` request loops through `service`, counted in `shares`.
fn spawn_loops<S, B>(
    service: &S,
    loops: u64,
    load: &Load,
    shares: &Arc<Shares>,
) -> Vec<JoinHandle<()>>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    (0..loops)
        .map(|_| {
            tokio::spawn(request_loop(
                service.clone(),
                load.clone(),
                Arc::clone(shares),
            ))
        })
        .collect()
}

/// Sends requests back to back until `deadline`, recording which backend
/// served each one.
async fn request_loop<S, B>(service: S, load: Load, shares: Arc<Shares>)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let Load {
        uri,
        start,
        change_at,
        deadline,
    } = load;
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

/// The scale-up: what it showed, or why it failed. It passes if both
/// rotating clients failed nothing and moved at least a third of their
/// traffic after the change to the new backends, and the probed client
/// rotated at most [`PROBE_MAX_ROTATIONS`] times.
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
    let titles = [
        "plain client".to_owned(),
        format!("TTL {} ms", config.ttl.as_millis()),
        "TTL 1 h + probe".to_owned(),
    ];
    eprintln!(
        "{} request loops per client for {} s over {protocol}, three hyper-util clients:",
        config.loops,
        config.duration.as_secs(),
    );
    eprintln!("  {:<16} built once", titles[0]);
    eprintln!("  {:<16} RotatingClientLayer, rotates every TTL", titles[1]);
    eprintln!(
        "  {:<16} RotatingClientLayer, asks the resolver every {} ms, rotates when an address is added",
        titles[2],
        config.probe_period.as_millis(),
    );

    let dns = Dns::new(&backends.addrs);
    let http1 = config.http1;
    let plain = build_client(dns.for_another_client(), http1);
    let (ttl, ttl_retired) = rotating(RotatingClientLayer::new(config.ttl), &dns, http1);
    let (probed, probed_retired) = rotating(
        RotatingClientLayer::new(PROBE_TTL)
            // A resolver position of its own: probing leaves the clients' round robin alone.
            .rotate_on_change(dns_probe(dns.for_another_client(), config.probe_period)),
        &dns,
        http1,
    );

    let seconds = config.duration.as_secs() as usize;
    let shares: [Arc<Shares>; 3] = std::array::from_fn(|_| Arc::new(Shares::new(seconds)));
    let start = Instant::now();
    let load = Load {
        uri,
        start,
        change_at: config.change_at,
        deadline: start + config.duration,
    };
    let mut loops = spawn_loops(&plain, config.loops, &load, &shares[0]);
    loops.extend(spawn_loops(&ttl, config.loops, &load, &shares[1]));
    loops.extend(spawn_loops(&probed, config.loops, &load, &shares[2]));

    // The change, and the rotating clients' rotation counts where the
    // windows in which the answer is stable start and end: [0, change) and
    // [change + SETTLE_PERIODS probe periods, end).
    let settled_at = (config.change_at + config.probe_period * SETTLE_PERIODS).min(config.duration);
    let clock = {
        let dns = dns.clone();
        let clients = [ttl.clone(), probed.clone()];
        tokio::spawn(async move {
            let rotations = || clients.each_ref().map(|c| c.stats().rotations);
            let mut marks = [[0; 2]; 3];
            for (mark, at) in marks
                .iter_mut()
                .zip([config.change_at, settled_at, config.duration])
            {
                tokio::time::sleep_until(start + at).await;
                *mark = rotations();
                if at == config.change_at {
                    dns.scale_up();
                }
            }
            marks
        })
    };

    let cell_width = 15 + BAR;
    eprintln!(
        "{:<7} {:<cell_width$}   {:<cell_width$}   {}",
        "second", titles[0], titles[1], titles[2]
    );
    let backends_header = format!("{:>4} {:>4} {:>4} {:BAR$}", "b1", "b2", "b3", "");
    eprintln!(
        "{:<7} {backends_header}   {backends_header}   {}",
        "",
        backends_header.trim_end()
    );
    for second in 0..seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second as u64 + 1)).await;
        let cells = shares.each_ref().map(|s| share_cell(s.second(second)));
        eprintln!(
            "{:<7} {}   {}   {}",
            format!("{}-{} s", second, second + 1),
            cells[0],
            cells[1],
            cells[2],
        );
    }
    let [before, settled, end] = clock.await.map_err(|e| format!("the clock task: {e}"))?;
    for request_loop in loops {
        let _ = request_loop.await;
    }
    // Every loop is done, so every generation but the current one has
    // drained and retired by now.
    let retired = [&ttl_retired, &probed_retired].map(|r| r.load(Relaxed));
    drop((plain, ttl, probed));
    drop(backends);

    // Rotations per hour while the answer is stable, from what the stable
    // windows saw.
    let stable_time = config.change_at + (config.duration - settled_at);
    let per_hour: [String; 2] = std::array::from_fn(|i| {
        if stable_time.is_zero() {
            return "-".to_owned();
        }
        let stable = before[i] + (end[i] - settled[i]);
        thousands((stable as f64 * 3600.0 / stable_time.as_secs_f64()).round() as u64)
    });

    let after = shares.each_ref().map(|s| s.after_change());
    let moved = after.map(new_share);
    let failed = shares.each_ref().map(|s| s.failed.load(Relaxed));
    let last = seconds.saturating_sub(1);
    let percent = |share: f64| format!("{:.1}%", share * 100.0);
    let row = |label: &str, cells: [String; 3]| {
        println!(
            "{label:<26} {:>14} {:>14} {:>16}",
            cells[0], cells[1], cells[2]
        );
    };
    println!();
    row("", titles.clone());
    row(
        "requests after the change",
        after.map(|a| a.iter().sum::<u64>().to_string()),
    );
    row("new backends, after change", moved.map(percent));
    row(
        "new backends, last second",
        shares
            .each_ref()
            .map(|s| percent(new_share(s.second(last)))),
    );
    row("requests failed", failed.map(|f| f.to_string()));
    let rotating_row = |cells: [String; 2]| {
        let [ttl, probed] = cells;
        ["-".to_owned(), ttl, probed]
    };
    row("rotations", rotating_row(end.map(|r| r.to_string())));
    row("rotations per hour, stable", rotating_row(per_hour));
    row(
        "generations retired",
        rotating_row(retired.map(|r| r.to_string())),
    );
    println!(
        "\nrotations per hour, stable: rotations in 0-{:.1} s and {:.1}-{:.1} s (the answer \
         unchanged), x 3600 s / {:.1} s",
        config.change_at.as_secs_f64(),
        settled_at.as_secs_f64(),
        config.duration.as_secs_f64(),
        stable_time.as_secs_f64(),
    );
    for (title, shares) in titles.iter().zip(&shares) {
        if let Some(e) = &*shares.first_error.lock().expect("not poisoned") {
            println!("\nfirst failed request, {title}: {e}");
        }
    }

    let mut failures = Vec::new();
    for (i, shorter) in [(1, "--scale-ttl-ms"), (2, "--probe-ms")] {
        let name = format!("the {} client", titles[i]);
        if failed[i] > 0 {
            failures.push(format!("{name} failed {} requests", failed[i]));
        }
        if moved[i] < 1.0 / 3.0 {
            failures.push(format!(
                "{name} sent only {} of its requests after the change to the new backends \
                 (lower {shorter} or raise --scale-duration-s)",
                percent(moved[i])
            ));
        }
    }
    if end[1] > PROBE_MAX_ROTATIONS {
        failures.push(format!(
            "the probed client rotated {} times for one change (at most {PROBE_MAX_ROTATIONS})",
            end[1]
        ));
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    Ok(format!(
        "after the change the plain client sent {} of its requests to the new backends; \
         the {} ms TTL sent {} with {} rotations, the probed client {} with {}; none failed",
        percent(moved[0]),
        config.ttl.as_millis(),
        percent(moved[1]),
        end[0],
        percent(moved[2]),
        end[1],
    ))
}

/// `12345` as `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut text = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            text.push(',');
        }
        text.push(digit);
    }
    text
}
