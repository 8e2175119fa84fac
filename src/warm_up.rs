//! [`warm_up`]: a probe that a fresh client must pass before it becomes
//! current.

use std::future::Future;
use std::pin::Pin;

use crate::BoxError;

/// The boxed build future of [`warm_up`]. Builds are off the request path,
/// so boxing here costs nothing that matters.
pub type WarmUpFuture<S> = Pin<Box<dyn Future<Output = Result<S, BoxError>> + Send>>;

/// Wraps an async factory so that each new client must pass `probe` before
/// it becomes current.
///
/// The probe gets a clone of the fresh client, for example to send a
/// health-check request through it, which also connects its pool. If the
/// factory or the probe fails, the build fails: the old generation keeps
/// serving and the build is retried with backoff, like any failed build.
/// The probe runs within [`build_timeout`]. Use the result with
/// [`layer_async`]; the first client is probed too, and its failure reaches
/// the caller of `layer_async`.
///
/// ```no_run
/// # async fn example() -> Result<(), tower_rotating_client::BoxError> {
/// use std::time::Duration;
/// use tonic::transport::Endpoint;
/// use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
/// use tower_rotating_client::{warm_up, RotatingClientLayer};
///
/// let endpoint = Endpoint::from_static("http://127.0.0.1:50051");
/// let channel = RotatingClientLayer::new(Duration::from_secs(1800))
///     .layer_async(warm_up(
///         move || {
///             let endpoint = endpoint.clone();
///             async move { endpoint.connect().await }
///         },
///         |channel| async move {
///             HealthClient::new(channel).check(HealthCheckRequest::default()).await.map(drop)
///         },
///     ))
///     .await?;
/// # let _ = channel;
/// # Ok(())
/// # }
/// ```
///
/// [`build_timeout`]: crate::RotatingClientLayer::build_timeout
/// [`layer_async`]: crate::RotatingClientLayer::layer_async
pub fn warm_up<M, Fut, S, E, P, PFut, PE>(
    make: M,
    probe: P,
) -> impl Fn() -> WarmUpFuture<S> + Send + Sync + 'static
where
    M: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<S, E>> + Send + 'static,
    E: Into<BoxError>,
    P: Fn(S) -> PFut + Send + Sync + 'static,
    PFut: Future<Output = Result<(), PE>> + Send + 'static,
    PE: Into<BoxError>,
    S: Clone + Send + 'static,
{
    let probe = std::sync::Arc::new(probe);
    move || {
        let built = make();
        let probe = std::sync::Arc::clone(&probe);
        Box::pin(async move {
            let client = built.await.map_err(Into::into)?;
            probe(client.clone()).await.map_err(Into::into)?;
            Ok(client)
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tower::ServiceExt;

    use super::warm_up;
    use crate::testing::{advance, served_by, ScriptBody, TagClient};
    use crate::RotatingClientLayer;

    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_keeps_the_old_generation_and_backs_off() {
        let builds = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let probes = Arc::new(AtomicUsize::new(0));
        let make = {
            let builds = Arc::clone(&builds);
            move || {
                let id = builds.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Ok::<_, std::convert::Infallible>(TagClient { id }) }
            }
        };
        let probe = {
            let (healthy, probes) = (Arc::clone(&healthy), Arc::clone(&probes));
            move |client: TagClient| {
                probes.fetch_add(1, Ordering::SeqCst);
                let healthy = healthy.load(Ordering::SeqCst);
                async move {
                    // The probe sends a real request through the new client.
                    let response = match client
                        .oneshot(http::Request::new(ScriptBody::empty()))
                        .await
                    {
                        Ok(response) => response,
                        Err(never) => match never {},
                    };
                    drop(response);
                    if healthy {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("probe failed"))
                    }
                }
            }
        };
        let client = RotatingClientLayer::new(Duration::from_secs(60))
            .jitter(0.0)
            .build_backoff(Duration::from_secs(5), Duration::from_secs(5))
            .layer_async(warm_up(make, probe))
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
            stats.current_generation, 1,
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
        assert_eq!(stats.current_generation, 2, "swapped once a probe passed");
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
}
