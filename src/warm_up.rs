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
