//! The surface of the API: construction without a runtime, use as a tower
//! service, auto traits, and the panics on invalid configuration.

mod test_utils;

use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_rotating_client::{
    ResponseBody, ResponseFuture, RotateError, RotatingClient, RotatingClientLayer, Stats,
};

use test_utils::{request, served_by, Builds, ScriptBody, TagClient};

const TTL: Duration = Duration::from_secs(60);

#[test]
fn constructing_needs_no_runtime() {
    let builds = Builds::default();
    let client = RotatingClientLayer::new(TTL).layer(builds.factory());
    assert_eq!(client.stats().current_generation.0, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let response = client.clone().oneshot(request()).await.expect("ok");
        assert_eq!(served_by(&response), 1);
    });
}

#[tokio::test]
async fn works_in_a_service_builder_and_boxes() {
    let builds = Builds::default();
    let client = tower::ServiceBuilder::new()
        .layer(RotatingClientLayer::new(TTL))
        .service(builds.factory());
    let boxed = tower::util::BoxCloneSyncService::new(client);
    let response = boxed.oneshot(request()).await.expect("ok");
    assert_eq!(served_by(&response), 1);
}

#[test]
fn public_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<RotatingClientLayer>();
    send_sync::<RotatingClient<TagClient>>();
    send_sync::<ResponseFuture<std::future::Ready<Result<http::Response<ScriptBody>, ()>>>>();
    send_sync::<ResponseBody<ScriptBody>>();
    send_sync::<Stats>();
    send_sync::<RotateError>();
    let client = RotatingClientLayer::new(TTL).layer(Builds::default().factory());
    send(&client.rotate());
}

#[test]
#[should_panic(expected = "`ttl` must be greater than zero")]
fn zero_ttl_panics() {
    let _ = RotatingClientLayer::new(Duration::ZERO);
}

#[test]
#[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
fn negative_jitter_panics() {
    let _ = RotatingClientLayer::new(TTL).jitter(-0.1);
}

#[test]
#[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
fn jitter_above_one_panics() {
    let _ = RotatingClientLayer::new(TTL).jitter(1.5);
}

#[test]
#[should_panic(expected = "`jitter` must be within 0.0..=1.0")]
fn nan_jitter_panics() {
    let _ = RotatingClientLayer::new(TTL).jitter(f64::NAN);
}

#[test]
#[should_panic(expected = "`max_live_generations` must be at least 1")]
fn zero_max_live_generations_panics() {
    let _ = RotatingClientLayer::new(TTL).max_live_generations(0);
}

/// A hook that is not `Clone` (no derive), counting into a shared counter.
struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl tower_rotating_client::OnRetire<TagClient> for Counting {
    fn on_retire(&self, _client: TagClient, _generation: tower_rotating_client::GenerationStats) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_layer_clones_whatever_its_hook_and_its_services_share_the_hook() {
    let (builds, retired) = (Builds::default(), std::sync::Arc::default());
    let layer = RotatingClientLayer::new(TTL).on_retire(Counting(std::sync::Arc::clone(&retired)));
    let (first, second) = (
        layer.layer(builds.factory()),
        layer.clone().layer(builds.factory()),
    );
    first.rotate().await.expect("builds");
    second.rotate().await.expect("builds");
    drop((first, second));
    assert_eq!(builds.count(), 4, "two services, two generations each");
    assert_eq!(
        retired.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "both services retire through the one hook"
    );
}
