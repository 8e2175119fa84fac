//! [`ResponseFuture`]: carries the generation's lease until the response
//! arrives, then hands it to the body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use pin_project_lite::pin_project;

use crate::lease::Lease;
use crate::response::sealed::Attach;
use crate::response::{observe, ClientResponse};

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
        // kept here so the common case costs one branch, not a call.
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.observe {
            // A separate function, so that the common path never takes the
            // response's address and the compiler can move it in place.
            return self.poll_observed(cx);
        }
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let lease = this.lease.take();
        Poll::Ready(result.map(|response| response.attach(Attach(lease))))
    }
}

impl<F, R, E> ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: ClientResponse,
    E: 'static,
{
    /// `poll` for a call whose generation watches outcomes: the failure
    /// trigger judges it, and the response may get a `GenerationId`.
    #[cold]
    #[inline(never)]
    fn poll_observed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R::Leased, E>> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let lease = this.lease.take();
        Poll::Ready(match result {
            Ok(mut response) => {
                if let Some(lease) = &lease {
                    observe(&mut response, lease);
                }
                Ok(response.attach(Attach(lease)))
            }
            Err(error) => {
                if let Some(lease) = &lease {
                    lease.on_error(&error);
                }
                Err(error)
            }
        })
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("generation", &self.lease.as_ref().map(Lease::generation_id))
            .finish_non_exhaustive()
    }
}
