//! Builds that must pass a probe before they become current: the guide's
//! warm-up recipe, a probe inside the async factory.

mod test_utils;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::ServiceExt;
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
