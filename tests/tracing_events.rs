//! Lifecycle events of the `tracing` feature, in a test binary of its own.
//!
//! `tracing` caches each callsite's interest process-wide. A subscriber
//! installed per thread (`set_default`) while other tests run in parallel
//! loses events: with exactly one dispatch registered, tracing-core 0.1.36
//! computes a new callsite's interest from the default of whichever thread
//! reaches the callsite first (`Rebuilder::JustOne`), and a thread with no
//! subscriber caches `Interest::never` for everybody (tokio-rs/tracing#3611).
//! Hence one binary, one process-wide subscriber installed once with
//! `set_global_default`, and one test: every event of the process is
//! captured, so nothing else may run here.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use tower::Layer;
use tower_rotating_client::{Probe, RotatingClient, RotatingClientLayer};

mod test_utils;
use test_utils::{advance, open_stream, settle, Builds, TagClient};

/// What the probe of [`one_probe_lifecycle`] reads, a secret: its value
/// must never reach a log line.
const SECRETS: [&str; 2] = ["sk-live-FIRST-secret", "sk-live-SECOND-secret"];

/// Collects formatted events.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn clear(&self) {
        self.0.lock().expect("not poisoned").clear();
    }
}

fn line<'a>(lines: &'a [String], message: &str, field: &str) -> &'a str {
    lines
        .iter()
        .find(|line| line.contains(message) && line.contains(field))
        .unwrap_or_else(|| panic!("no `{message}` event with {field} in {lines:#?}"))
}

/// One stream that outlives a TTL rotation by five seconds, then ends.
async fn one_lifecycle() {
    let client: RotatingClient<TagClient> = RotatingClientLayer::new(Duration::from_secs(60))
        .jitter(0.0)
        .layer(Builds::default().factory());
    let (tx, mut body) = open_stream(&client).await;
    // Paused time does not move while the build at 60 s runs on the
    // blocking pool: the swap happens at exactly 60 s.
    tokio::time::sleep(Duration::from_secs(65)).await;
    drop(tx);
    assert!(body.frame().await.is_none(), "the stream ends");
    drop(client);
}

/// A probe whose secret value changes once and then fails once.
async fn one_probe_lifecycle() {
    let step = Arc::new(Mutex::new(0usize));
    let probe = Probe::new(Duration::from_secs(1), {
        let step = Arc::clone(&step);
        move || {
            let step = Arc::clone(&step);
            async move {
                let mut step = step.lock().expect("not poisoned");
                *step += 1;
                match *step {
                    1..=2 => Ok(SECRETS[0].to_owned()),
                    3..=5 => Ok(SECRETS[1].to_owned()),
                    _ => Err(std::io::Error::other("secret store unreachable")),
                }
            }
        }
    });
    let client: RotatingClient<TagClient> = RotatingClientLayer::new(Duration::from_secs(3600))
        .rotate_on_change(probe)
        .layer(Builds::default().factory());
    settle().await;
    for _ in 0..8 {
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(client.stats().rotations, 1, "the changed secret rotated");
    assert!(client.stats().failed_probes >= 1, "and a probe failed");
    drop(client);
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

#[test]
fn lifecycle_events_carry_the_generation_and_its_figures() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer({
            let captured = captured.clone();
            move || captured.clone()
        })
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");

    // Another thread reaches every callsite first: the way the flaky unit
    // test lost its events. With a global subscriber that must not matter.
    std::thread::spawn(|| paused_runtime().block_on(one_lifecycle()))
        .join()
        .expect("the other thread's lifecycle");
    assert!(
        captured
            .lines()
            .iter()
            .any(|line| line.contains("build started")),
        "events from another thread are captured too: {:#?}",
        captured.lines()
    );
    captured.clear();

    paused_runtime().block_on(one_lifecycle());

    let lines = captured.lines();
    line(&lines, "build started", "replacing=1");
    line(&lines, "build succeeded", "replacing=1");
    let swap = line(&lines, "swap", "generation=2");
    assert!(
        swap.contains("replacing=1") && swap.contains("reason=\"ttl\""),
        "the swap names the old generation and the reason: {swap}"
    );
    let drain = line(&lines, "drain started", "generation=1");
    assert!(
        drain.contains("in_flight=1") && drain.contains("requests=1"),
        "the drain carries its figures: {drain}"
    );
    let drained = line(&lines, "drained", "generation=1");
    assert!(
        drained.contains("drain_duration=5s"),
        "drained when the stream ended: {drained}"
    );
    let retired = line(&lines, "retired", "generation=1");
    assert!(
        retired.contains("age=65s") && retired.contains("requests=1"),
        "retired with its age and requests: {retired}"
    );
    line(&lines, "retired", "generation=2");

    captured.clear();
    paused_runtime().block_on(one_probe_lifecycle());
    let lines = captured.lines();
    let changed = line(&lines, "probed value changed", "generation=1");
    assert!(
        changed.contains("confirmations=2"),
        "the change names its confirmations: {changed}"
    );
    let swap = line(&lines, "swap", "generation=2");
    assert!(
        swap.contains("reason=\"changed\""),
        "a probe's rotation has reason `changed`: {swap}"
    );
    let failed = line(&lines, "probe failed", "generation=2");
    assert!(
        failed.contains("WARN") && failed.contains("secret store unreachable"),
        "a failed probe is a warning with its error: {failed}"
    );
    for secret in SECRETS {
        assert!(
            lines.iter().all(|line| !line.contains(secret)),
            "no probed value in any event: {lines:#?}"
        );
    }
}
