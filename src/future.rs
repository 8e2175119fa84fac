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
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(crate) fn new(inner: F, lease: Lease) -> Self {
        ResponseFuture {
            inner,
            lease: Some(lease),
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
    // it is used instead of being copied out of a return slot. An outcome
    // that needs a look leaves right after the inner poll, for a cold
    // function of its own: a call, or a branch that merges back, between
    // the inner output and this one would make the common path copy the
    // response head (measured: 14 instructions per request more on the
    // bench's single-thread path, and 17 per fresh clone).
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if this.lease.as_ref().is_some_and(Lease::observes) {
            return Poll::Ready(observed(result, this.lease.take()));
        }
        let lease = this.lease.take();
        Poll::Ready(match result {
            Ok(response) => Ok(response.attach(Attach {
                lease,
                observe: false,
            })),
            Err(error) => Err(error),
        })
    }
}

/// The outcome of a generation that looks at each one (failure trigger,
/// `generation_extension`): the response head is judged and tagged in
/// `attach`, an error here.
#[cold]
#[inline(never)]
fn observed<R, E>(result: Result<R, E>, lease: Option<Lease>) -> Result<R::Leased, E>
where
    R: ClientResponse,
    E: 'static,
{
    match result {
        Ok(response) => Ok(response.attach(Attach {
            lease,
            observe: true,
        })),
        Err(error) => {
            if let Some(lease) = &lease {
                lease.on_error(&error);
            }
            Err(error)
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("generation", &self.lease.as_ref().map(Lease::generation_id))
            .finish_non_exhaustive()
    }
}
