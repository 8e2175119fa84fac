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

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::{Body, SizeHint};
    use http_body_util::BodyExt;

    use super::ResponseBody;
    use crate::lease::{Lease, Leased};
    use crate::testing::{BodyError, ScriptBody, Step};

    /// Stands in for a generation: its strong count tells whether a lease
    /// still holds it.
    struct Probe;

    impl Leased for Probe {
        fn id(&self) -> u64 {
            7
        }
    }

    fn leased(inner: ScriptBody) -> (Arc<Probe>, ResponseBody<ScriptBody>) {
        let probe = Arc::new(Probe);
        let lease = Lease::new(Arc::clone(&probe));
        (probe, ResponseBody::new(inner, Some(lease)))
    }

    fn held(probe: &Arc<Probe>) -> bool {
        Arc::strong_count(probe) > 1
    }

    fn trailers() -> HeaderMap {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("valid"));
        trailers
    }

    #[tokio::test]
    async fn forwards_data_and_releases_at_end_of_stream_before_drop() {
        let (probe, mut body) = leased(ScriptBody::script([
            Step::Data("a"),
            Step::Pending,
            Step::Data("b"),
        ]));
        assert!(held(&probe), "a new body holds its generation");
        let frame = body.frame().await.expect("a frame").expect("not an error");
        assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"a"));
        assert!(held(&probe), "half-read: still held");
        let frame = body.frame().await.expect("a frame").expect("not an error");
        assert_eq!(frame.into_data().expect("data"), Bytes::from_static(b"b"));
        assert!(held(&probe), "no end hint yet: still held");
        assert!(
            body.frame().await.is_none(),
            "inner end of stream is forwarded"
        );
        assert!(
            !held(&probe),
            "released at end of stream, while the body is alive"
        );
        assert!(!body.holds_generation());
    }

    #[tokio::test]
    async fn releases_on_the_frame_after_which_is_end_stream_turns_true() {
        let (probe, mut body) = leased(ScriptBody::script([Step::Data("last")]).with_end_hint());
        assert!(!body.is_end_stream(), "not over before the last frame");
        body.frame().await.expect("a frame").expect("not an error");
        assert!(body.is_end_stream(), "is_end_stream is forwarded");
        assert!(
            !held(&probe),
            "released with the last frame, without waiting for None"
        );
    }

    #[tokio::test]
    async fn forwards_trailers_and_releases_with_them() {
        let (probe, mut body) = leased(ScriptBody::script([
            Step::Data("x"),
            Step::Trailers(trailers()),
        ]));
        body.frame().await.expect("a frame").expect("not an error");
        assert!(held(&probe));
        let frame = body.frame().await.expect("a frame").expect("not an error");
        assert_eq!(frame.into_trailers().expect("trailers")["grpc-status"], "0");
        assert!(!held(&probe), "trailers end the stream");
    }

    #[tokio::test]
    async fn forwards_errors_unchanged_and_releases() {
        let (probe, mut body) = leased(ScriptBody::script([Step::Data("x"), Step::Error("reset")]));
        body.frame().await.expect("a frame").expect("not an error");
        let error = body
            .frame()
            .await
            .expect("a frame")
            .expect_err("the inner error");
        assert_eq!(error, BodyError("reset"), "the inner error, untouched");
        assert!(!held(&probe), "released on error");
    }

    #[tokio::test]
    async fn releases_on_drop_mid_stream() {
        let (probe, mut body) = leased(ScriptBody::script([Step::Data("x"), Step::Data("y")]));
        body.frame().await.expect("a frame").expect("not an error");
        assert!(held(&probe));
        drop(body);
        assert!(!held(&probe), "released on drop");
    }

    #[test]
    fn an_empty_body_never_holds() {
        let (probe, body) = leased(ScriptBody::empty());
        assert!(!held(&probe), "HEAD / 204: nothing to wait for");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
    }

    #[test]
    fn forwards_size_hint() {
        let mut hint = SizeHint::new();
        hint.set_lower(3);
        hint.set_upper(10);
        let (_probe, body) = leased(ScriptBody::script([Step::Data("abc")]).with_size_hint(hint));
        assert_eq!(body.size_hint().lower(), 3);
        assert_eq!(body.size_hint().upper(), Some(10));
    }
}
