//! [`ResponseFuture`]: carries the generation's lease until the response
//! arrives, then hands it to the body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use crate::lease::Lease;
use crate::response::sealed::Attach;
use crate::response::ClientResponse;

pin_project! {
    /// Response future of [`RotatingClient`](crate::RotatingClient).
    ///
    /// Keeps the generation that serves the request alive until the inner
    /// future finishes. On a response, the lease moves into its body (the
    /// [`ResponseBody`](crate::ResponseBody) of an `http::Response`, or the
    /// body of a `reqwest::Response`); on an error, or if the future is
    /// dropped, it is released at once. Errors pass through unchanged.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        lease: Option<Lease>,
        // Whether the outcome needs a look (failure trigger, extension):
        // tested on the response's parts inside `attach`, and on an error,
        // so that `poll` has a single output path and the response moves
        // in place.
        observe: bool,
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn new(inner: F, lease: Lease, observe: bool) -> Self {
        ResponseFuture {
            inner,
            lease: Some(lease),
            observe,
        }
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: ClientResponse,
    E: 'static,
{
    type Output = Result<R::Leased, E>;

    // Always inlined: into the caller's frame, the response is built where
    // it is used instead of being copied out of a return slot.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let lease = this.lease.take();
        let observe = *this.observe;
        Poll::Ready(match result {
            Ok(response) => Ok(response.attach(Attach { lease, observe })),
            Err(error) => {
                if observe {
                    on_error(lease.as_ref(), &error);
                }
                Err(error)
            }
        })
    }
}

/// Lets the generation judge an error of its client (failure trigger).
#[cold]
#[inline(never)]
fn on_error<E: 'static>(lease: Option<&Lease>, error: &E) {
    if let Some(lease) = lease {
        lease.on_error(error);
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("generation", &self.lease.as_ref().map(Lease::generation_id))
            .finish_non_exhaustive()
    }
}
