//! Two acts, at a compressed time scale.
//!
//! Act 1, the cautionary tale: a cache that closes the client it evicts.
//! The reported incident: an LLM proxy cached its upstream HTTP clients with
//! a one-hour TTL and closed each client the cache evicted. Closing a client
//! closes its connections, so every response still streaming through it was
//! cut, and callers saw a burst of read timeouts every hour.
//!
//! This demo starts a streaming server on loopback and runs many concurrent
//! long streams twice, through the very same client type:
//!
//! 1. through a naive TTL cache that drops (closes) the evicted client;
//! 2. through `RotatingClientLayer` with the same TTL, which keeps a retired
//!    client alive until its last response has finished.
//!
//! Act 2, the scale-up: three backends on 127.0.0.1, .2 and .3 behind one
//! made-up name, and a resolver that lists only the first until the
//! "change" at t = 1 s, then all three, round robin. Three clients run
//! side by side:
//!
//! 1. A long-lived hyper-util client keeps its pooled connections (its
//!    single HTTP/2 connection) to backend 1 and never sends the new
//!    backends a request.
//! 2. The same client under `RotatingClientLayer` with a 300 ms TTL moves
//!    about two thirds of its traffic to them within a TTL, failing
//!    nothing, at the price of a rotation every 300 ms: about 12,000 an
//!    hour, whether anything changed or not.
//! 3. The same client under a one-hour TTL and `rotate_on_change` with a
//!    probe that asks the demo's resolver for the name every 100 ms, and
//!    rotates when the answer gains an address: one rotation, within two
//!    probes of the change, and none while the answer stays the same.
//!
//! ```sh
//! cargo run --release --example demo              # ~14 s, both acts
//! cargo run --release --example demo -- --http1   # act 2 over HTTP/1.1
//! cargo run --release --example demo -- --help
//! ```
//!
//! Exit code: 0 if, in act 1, the rotating side cut nothing while the naive
//! side did (with rotations on both) and, in act 2, both rotating clients
//! failed no request and sent at least a third of their requests after the
//! change to the new backends, and the probed client rotated at most twice;
//! 1 otherwise; 2 for a bad flag.

mod act1;
mod act2;
mod loopback;

use std::process::ExitCode;
use std::time::Duration;

const HELP: &str = "\
Act 1: runs long concurrent streams through a naive TTL client cache that
closes evicted clients, then through RotatingClientLayer with the same TTL,
and compares how many streams each one cut.
Act 2: three backends on 127.0.0.1-3 behind one name whose resolver lists
only the first until the change, then all three (round robin); request
loops run through a plain hyper-util client built once, through the same
client under RotatingClientLayer with a short TTL, and under a one-hour TTL
with a probe that asks the resolver for the name and rotates when the answer
gains an address; they show each backend's share per second, and how often
each client rotated.

Usage: cargo run --release --example demo -- [FLAGS]

Act 1 flags:
  --concurrency N      concurrent streams, 1..=500      [default: 50]
  --ttl-ms N           client TTL in milliseconds        [default: 1000]
  --chunks N           chunks per streamed response      [default: 20]
  --chunk-delay-ms N   delay between chunks              [default: 20]
  --duration-s N       seconds each phase starts streams [default: 5]

Act 2 flags:
  --http1              use HTTP/1.1 (pooled connections) instead of HTTP/2
                       (h2c prior knowledge, one connection per client)
  --loops N            request loops per client, 1..=256 [default: 8]
  --scale-ttl-ms N     TTL of the short-TTL client       [default: 300]
  --probe-ms N         probe period of the probed client [default: 100]
  --change-ms N        when the resolver starts listing all three backends
                                                         [default: 1000]
  --scale-duration-s N seconds of load, > the change     [default: 3]

  --act N              run only act 1 or act 2           [default: both]
  -h, --help           print this help

Exit code: 0 if every act that ran passed: in act 1 the rotating side cut
no stream and the run proved something (rotations happened, the naive cache
did cut streams); in act 2 both rotating clients failed no request and sent
at least a third of their requests after the change to the new backends,
and the probed client rotated at most twice. 1 otherwise; 2 for a bad
flag.";

/// Every flag, parsed.
#[derive(Clone, Copy, Debug)]
struct Flags {
    act1: act1::Config,
    act2: act2::Config,
    act: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let flags = match parse_args(std::env::args().skip(1)) {
        Ok(Some(flags)) => flags,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n(see --help)");
            return ExitCode::from(2);
        }
    };

    let mut ok = true;
    if flags.act != Some(2) {
        ok &= verdict(act1::run(flags.act1).await);
    }
    if flags.act != Some(1) {
        if flags.act.is_none() {
            println!();
        }
        ok &= verdict(act2::run(flags.act2).await);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints an act's outcome; `true` if it passed.
fn verdict(outcome: Result<String, String>) -> bool {
    match &outcome {
        Ok(what) => println!("\nOK: {what}"),
        Err(why) => println!("\nFAIL: {why}"),
    }
    outcome.is_ok()
}

/// `Ok(None)` means `--help`.
fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Flags>, String> {
    let mut flags = Flags {
        act1: act1::Config {
            concurrency: 50,
            ttl: Duration::from_millis(1000),
            chunks: 20,
            chunk_delay: Duration::from_millis(20),
            duration: Duration::from_secs(5),
        },
        act2: act2::Config {
            http1: false,
            loops: 8,
            ttl: Duration::from_millis(300),
            probe_period: Duration::from_millis(100),
            change_at: Duration::from_millis(1000),
            duration: Duration::from_secs(3),
        },
        act: None,
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        if matches!(flag.as_str(), "-h" | "--help") {
            return Ok(None);
        }
        if flag == "--http1" {
            flags.act2.http1 = true;
            continue;
        }
        let (min, max) = match flag.as_str() {
            "--concurrency" => (1, 500),
            "--ttl-ms" | "--chunks" | "--duration-s" => (1, 3_600_000),
            "--chunk-delay-ms" => (0, 3_600_000),
            "--loops" => (1, 256),
            "--scale-ttl-ms" | "--probe-ms" | "--change-ms" => (1, 3_600_000),
            "--scale-duration-s" => (1, 3_600),
            "--act" => (1, 2),
            _ => return Err(format!("unknown flag `{flag}`")),
        };
        let value = inline
            .or_else(|| args.next())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .parse()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| {
                format!("{flag}: expected an integer in {min}..={max}, got `{value}`")
            })?;
        match flag.as_str() {
            "--concurrency" => flags.act1.concurrency = n,
            "--ttl-ms" => flags.act1.ttl = Duration::from_millis(n),
            "--chunks" => flags.act1.chunks = n,
            "--chunk-delay-ms" => flags.act1.chunk_delay = Duration::from_millis(n),
            "--duration-s" => flags.act1.duration = Duration::from_secs(n),
            "--loops" => flags.act2.loops = n,
            "--scale-ttl-ms" => flags.act2.ttl = Duration::from_millis(n),
            "--probe-ms" => flags.act2.probe_period = Duration::from_millis(n),
            "--change-ms" => flags.act2.change_at = Duration::from_millis(n),
            "--scale-duration-s" => flags.act2.duration = Duration::from_secs(n),
            _ => flags.act = Some(n),
        }
    }
    if flags.act2.change_at >= flags.act2.duration {
        return Err(format!(
            "--change-ms ({} ms) must come before the end of the load (--scale-duration-s, {} s)",
            flags.act2.change_at.as_millis(),
            flags.act2.duration.as_secs()
        ));
    }
    Ok(Some(flags))
}
