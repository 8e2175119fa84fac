//! reqwest glue (feature `reqwest`): `reqwest::Response` carries the
//! generation's lease in its body, and `RotatingClient<reqwest::Client>`
//! gets reqwest's own `execute`.

use std::future::poll_fn;

use ::reqwest::{Body, Client, Error, Request, Response, ResponseBuilderExt};
use tower_service::Service;

use crate::body::ResponseBody;
use crate::response::sealed::{Attach, Sealed};
use crate::response::{observe_parts, ClientResponse};
use crate::service::RotatingClient;

#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl ClientResponse for Response {
    type Leased = Response;

    /// `reqwest::Response` has no way to map its body, so this goes through
    /// `http::Response<reqwest::Body>` and back, wrapping the body in a
    /// [`ResponseBody`]. reqwest drops the URL on the way out, so it is put
    /// back as the extension reqwest reads on the way in.
    ///
    /// Costs, per response, on this path only: a clone of the URL, the
    /// extension map for it, and the boxes reqwest's own conversions make
    /// (`Body::wrap` on the way out and in, the boxed URL).
    fn attach(self, lease: Attach) -> Response {
        let url = self.url().clone();
        let (mut parts, body) = http::Response::<Body>::from(self).into_parts();
        if lease.observe {
            parts = observe_parts(parts, lease.lease.as_ref());
        }
        // A fresh builder with one extension cannot fail.
        if let Ok(marker) = http::Response::builder().url(url).body(()) {
            parts.extensions.extend(marker.into_parts().0.extensions);
        }
        let body = Body::wrap(ResponseBody::new(body, lease.lease));
        Response::from(http::Response::from_parts(parts, body))
    }
}

impl Sealed for Response {}

#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl RotatingClient<Client> {
    /// Executes a `reqwest::Request` on the current generation, like
    /// [`reqwest::Client::execute`].
    ///
    /// The same as `self.clone().oneshot(request)`: a fresh handle, so
    /// nothing is cached between calls. The response is reqwest's own, with
    /// the generation's lease in its body: the generation stays alive until
    /// the body is read to the end, fails or is dropped. Errors are
    /// reqwest's, unchanged.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), reqwest::Error> {
    /// use std::time::Duration;
    /// use tower::Layer;
    /// use tower_rotating_client::RotatingClientLayer;
    ///
    /// let client = RotatingClientLayer::new(Duration::from_secs(300)).layer(reqwest::Client::new);
    /// let url = "http://127.0.0.1:8080/".parse().expect("a valid URL");
    /// let response = client
    ///     .execute(reqwest::Request::new(reqwest::Method::GET, url))
    ///     .await?
    ///     .error_for_status()?;
    /// let body = response.bytes().await?;
    /// # drop(body);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute(&self, request: Request) -> Result<Response, Error> {
        let mut handle = self.clone();
        poll_fn(|cx| handle.poll_ready(cx)).await?;
        handle.call(request).await
    }
}
