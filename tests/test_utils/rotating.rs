//! Helpers around a `RotatingClient` of [`TagClient`]s.

use tokio::sync::mpsc;
use tower::ServiceExt;
use tower_rotating_client::{ResponseBody, RotatingClient, Stats};

use super::{open_request, ScriptBody, Step, TagClient};

/// Starts a response whose body stays open until the sender is dropped.
pub async fn open_stream(
    client: &RotatingClient<TagClient>,
) -> (mpsc::UnboundedSender<Step>, ResponseBody<ScriptBody>) {
    let (tx, response) = open_response(client).await;
    (tx, response.into_body())
}

/// Like [`open_stream`], with the response's head (see [`super::served_by`]).
pub async fn open_response(
    client: &RotatingClient<TagClient>,
) -> (
    mpsc::UnboundedSender<Step>,
    http::Response<ResponseBody<ScriptBody>>,
) {
    let (tx, req) = open_request();
    let response = client.clone().oneshot(req).await.expect("infallible");
    (tx, response)
}

/// The ids of the live generations, oldest first.
pub fn live(stats: &Stats) -> Vec<u64> {
    stats
        .generations
        .iter()
        .map(|generation| generation.id.0)
        .collect()
}
