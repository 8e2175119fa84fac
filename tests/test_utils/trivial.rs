//! Clients that answer at once and allocate nothing per request, and one
//! request through a service polled by hand: for the allocation test and the
//! hot path benchmark, which includes this file alone.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use tower::Service;

/// Answers every request at once with a static one-chunk body. Allocates
/// nothing: `Response::new` has no headers or extensions yet, and the body
/// is `Bytes::from_static`.
#[derive(Clone, Copy, Debug)]
pub struct Trivial;

/// The body [`Trivial`] answers with.
pub const TRIVIAL_BODY: &[u8] = b"hello";

impl Service<Request<()>> for Trivial {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _request: Request<()>) -> Self::Future {
        answer(TRIVIAL_BODY)
    }
}

/// The answer of both trivial clients: a response with `body` in one chunk.
#[inline]
fn answer(body: &'static [u8]) -> Ready<Result<Response<Full<Bytes>>, Infallible>> {
    ready(Ok(Response::new(Full::new(Bytes::from_static(body)))))
}

/// [`Trivial`] with its state behind one `Arc`, as a real client's handle
/// is (a `reqwest::Client` is one `Arc`; a hyper client a few): cloning it
/// is one atomic increment, dropping a clone one decrement. The body it
/// answers with is read through the `Arc`; otherwise a request does what
/// [`Trivial`]'s does and allocates nothing.
#[derive(Clone, Debug)]
pub struct SharedTrivial(Arc<Shared>);

/// What a [`SharedTrivial`] and its clones share.
#[derive(Debug)]
struct Shared {
    body: &'static [u8],
}

impl Default for SharedTrivial {
    /// A client answering with [`TRIVIAL_BODY`]. Allocates its `Arc`.
    fn default() -> Self {
        SharedTrivial(Arc::new(Shared { body: TRIVIAL_BODY }))
    }
}

impl Service<Request<()>> for SharedTrivial {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    #[inline]
    fn call(&mut self, _request: Request<()>) -> Self::Future {
        answer(self.0.body)
    }
}

/// `poll_ready` + `call` + response + the whole body; returns the body
/// bytes seen. Panics if anything is not ready at once, which the trivial
/// client guarantees.
#[inline(always)]
pub fn one_request<S, B>(service: &mut S, cx: &mut Context<'_>) -> usize
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    assert!(
        service.poll_ready(cx).is_ready(),
        "the trivial client is always ready"
    );
    let future = pin!(service.call(Request::new(())));
    let Poll::Ready(Ok(response)) = future.poll(cx) else {
        panic!("the trivial client answers at once");
    };
    let mut body = pin!(response.into_body());
    let mut len = 0;
    while let Poll::Ready(Some(frame)) = body.as_mut().poll_frame(cx) {
        let frame = frame.expect("an infallible body");
        len += frame.data_ref().map_or(0, Bytes::len);
    }
    len
}
