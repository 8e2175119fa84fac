//! Where builds run, and builds that must pass a probe before they become
//! current: the guide's warm-up recipe, a probe inside the async factory.

mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_rotating_client::{BoxError, GenerationId, RotatingClientLayer};

use test_utils::{advance, served_by, ScriptBody, TagClient};

#[tokio::test(start_paused = true)]
async fn a_failing_probe_keeps_the_old_generation_and_backs_off() {
    let builds = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let probes = Arc::new(AtomicUsize::new(0));
    let make = {
        let (builds, healthy, probes) = (
            Arc::clone(&builds),
            Arc::clone(&healthy),
            Arc::clone(&probes),
        );
        move || {
            let id = builds.fetch_add(1, Ordering::SeqCst) + 1;
            let (healthy, probes) = (Arc::clone(&healthy), Arc::clone(&probes));
            async move {
                let client = TagClient::new(id);
                // The probe sends a real request through the new client.
                probes.fetch_add(1, Ordering::SeqCst);
                let response = match client
                    .clone()
                    .oneshot(http::Request::new(ScriptBody::empty()))
                    .await
                {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                drop(response);
                if healthy.load(Ordering::SeqCst) {
                    Ok::<_, BoxError>(client)
                } else {
                    Err(std::io::Error::other("probe failed").into())
                }
            }
        }
    };
    let client = RotatingClientLayer::new(Duration::from_secs(60))
        .jitter(0.0)
        .build_backoff(Duration::from_secs(5), Duration::from_secs(5))
        .layer_async(make)
        .await
        .expect("the first client passes its probe");
    assert_eq!(
        probes.load(Ordering::SeqCst),
        1,
        "the first client is probed too"
    );

    healthy.store(false, Ordering::SeqCst);
    advance(Duration::from_secs(60)).await;
    let stats = client.stats();
    assert_eq!(
        stats.current_generation,
        GenerationId(1),
        "a failed probe keeps the old generation"
    );
    assert!(stats.failed_builds >= 1);
    let response = client
        .clone()
        .oneshot(http::Request::new(ScriptBody::empty()))
        .await
        .expect("ok");
    assert_eq!(served_by(&response), 1);

    healthy.store(true, Ordering::SeqCst);
    let failed = stats.failed_builds;
    for _ in 0..10 {
        advance(Duration::from_secs(1)).await;
    }
    let stats = client.stats();
    assert_eq!(
        stats.current_generation,
        GenerationId(2),
        "swapped once a probe passed"
    );
    assert!(
        stats.failed_builds <= failed + 1,
        "backed off between attempts"
    );
    let response = client
        .clone()
        .oneshot(http::Request::new(ScriptBody::empty()))
        .await
        .expect("ok");
    assert!(served_by(&response) > 1, "the probed client serves");
}

/// Only the first build of a sync factory runs on the caller's thread (the
/// runtime's only thread here); timed builds and those of `rotate()` run on
/// the blocking pool. `tests/blocking_factory.rs` measures what that spares
/// the runtime.
#[tokio::test(start_paused = true)]
async fn a_sync_factory_builds_on_the_blocking_pool_after_the_first() {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let client = RotatingClientLayer::new(Duration::from_secs(60))
        .jitter(0.0)
        .layer({
            let threads = Arc::clone(&threads);
            move || {
                let mut threads = threads.lock().expect("not poisoned");
                threads.push(std::thread::current().id());
                TagClient::new(threads.len())
            }
        });
    assert_eq!(client.rotate().await.expect("builds"), GenerationId(2));
    advance(Duration::from_secs(60)).await;
    assert_eq!(client.stats().current_generation, GenerationId(3));

    let runtime = std::thread::current().id();
    let threads = threads.lock().expect("not poisoned").clone();
    assert_eq!(threads.len(), 3, "{threads:?}");
    assert_eq!(
        threads[0], runtime,
        "the first build runs inside layer(), on the caller's thread"
    );
    assert!(
        threads[1..].iter().all(|thread| *thread != runtime),
        "rotate() and the timed rotation build off the runtime's thread: {threads:?}"
    );
}
