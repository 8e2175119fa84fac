//! Limits on draining generations: `max_live_generations` postpones
//! rotation, `drain_timeout` lets go of a generation without cutting its
//! responses.

mod test_utils;

use std::time::Duration;

use http_body_util::BodyExt;
use tower::Layer;
use tower_rotating_client::RotatingClientLayer;

use test_utils::{advance, live, open_stream, settle, Builds, RetireLog, Step};

const TTL: Duration = Duration::from_secs(60);

#[tokio::test(start_paused = true)]
async fn max_live_generations_postpones_rotation_until_one_retires() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .max_live_generations(2)
        .on_retire(retired.hook())
        .layer(builds.factory());
    let (tx1, body1) = open_stream(&client).await;
    advance(TTL).await;
    let (tx2, body2) = open_stream(&client).await;
    assert_eq!(live(&client.stats()), vec![1, 2]);

    advance(TTL * 3).await;
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 2, "postponed at the cap");
    assert_eq!(stats.live_generations(), 2);
    assert_eq!(builds.count(), 2, "nothing is built while there is no room");

    drop((tx1, body1));
    settle().await;
    let stats = client.stats();
    assert_eq!(retired.ids(), vec![1]);
    assert_eq!(
        stats.current_generation.0, 3,
        "rotates as soon as there is room"
    );
    assert_eq!(live(&stats), vec![2, 3]);
    drop((tx2, body2));
}

#[tokio::test(start_paused = true)]
async fn max_live_one_waits_for_the_current_generation_to_go_idle() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .max_live_generations(1)
        .layer(builds.factory());
    let (tx, body) = open_stream(&client).await;
    advance(TTL * 2).await;
    assert_eq!(client.stats().current_generation.0, 1, "busy: postponed");
    drop((tx, body));
    advance(Duration::from_millis(100)).await;
    let stats = client.stats();
    assert_eq!(stats.current_generation.0, 2);
    assert_eq!(stats.live_generations(), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_lets_go_without_cutting_or_calling_the_hook() {
    let (builds, retired) = (Builds::default(), RetireLog::default());
    let client = RotatingClientLayer::new(TTL)
        .jitter(0.0)
        .drain_timeout(Duration::from_secs(5))
        .on_retire(retired.hook())
        .layer(builds.factory());
    let (tx, mut body) = open_stream(&client).await;
    client.rotate().await.expect("builds");
    tokio::time::sleep(Duration::from_millis(4999)).await;
    assert_eq!(live(&client.stats()), vec![1, 2], "still draining");
    advance(Duration::from_millis(1)).await;
    let stats = client.stats();
    assert_eq!(live(&stats), vec![2], "let go after the drain timeout");
    assert_eq!(stats.forced_retirements, 1);
    assert!(
        retired.ids().is_empty(),
        "the hook never sees a client with responses in flight"
    );

    // The layer does not cut the response: it runs on what it holds.
    tx.send(Step::Data("still here".into())).expect("alive");
    let frame = body.frame().await.expect("frame").expect("data");
    assert_eq!(frame.into_data().expect("data"), "still here");
    drop((tx, body));
    assert!(
        retired.ids().is_empty(),
        "a forced generation is not retired twice"
    );
    drop(client);
    assert_eq!(retired.ids(), vec![2]);
}
