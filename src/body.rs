//! [`ResponseBody`]: forwards the inner body and releases the generation's
//! lease at the earliest moment the stream is over.

use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::lease::Lease;

pin_project! {
    /// Response body of [`RotatingClient`](crate::RotatingClient).
    ///
    /// Forwards `poll_frame`, `is_end_stream` and `size_hint` of the inner
    /// body unchanged, so data, trailers (gRPC status) and length hints all
    /// pass through. It keeps the generation that served the response alive
    /// until the first of:
    ///
    /// - the end of the stream: `poll_frame` returns `None`, returns
    ///   trailers, or returns a frame after which `is_end_stream()` is
    ///   `true`;
    /// - an error from the inner body, which is passed through unchanged;
    /// - the body being dropped.
    ///
    /// A body that is empty from the start (a HEAD response, a 204) holds
    /// nothing at all.
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        lease: Option<Lease>,
    }
}

impl<B: Body> ResponseBody<B> {
    #[inline]
    pub(crate) fn new(inner: B, lease: Option<Lease>) -> Self {
        let lease = if inner.is_end_stream() { None } else { lease };
        ResponseBody { inner, lease }
    }
}

impl<B> ResponseBody<B> {
    /// Whether this body still keeps its generation alive. `false` once the
    /// stream has ended, failed, or was empty from the start.
    pub fn holds_generation(&self) -> bool {
        self.lease.is_some()
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if this.lease.is_some() {
            let over = match &frame {
                None | Some(Err(_)) => true,
                Some(Ok(frame)) => frame.is_trailers() || this.inner.is_end_stream(),
            };
            if over {
                *this.lease = None;
            }
        }
        Poll::Ready(frame)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("generation", &self.lease.as_ref().map(Lease::generation_id))
            .finish_non_exhaustive()
    }
}
