//! [`ClientResponse`]: the responses an inner client may return, and how
//! the generation's lease is attached to each.

use crate::body::ResponseBody;
use crate::lease::Lease;

/// A response type that [`RotatingClient`](crate::RotatingClient) can
/// carry a generation's lease in.
///
/// Implemented for:
///
/// - `http::Response<B>` with `B: http_body::Body` (hyper, hyper-util,
///   tonic, axum, and any tower HTTP service). The rotating client returns
///   `http::Response<ResponseBody<B>>`.
/// - `reqwest::Response`, with the `reqwest` feature. The rotating client
///   returns a `reqwest::Response` whose body carries the lease.
///
/// The trait is sealed. An inner client that returns something else can be
/// adapted with `tower::util::MapResponse` (or `ServiceExt::map_response`)
/// into one that returns `http::Response<B>`; see
/// [Which clients work](crate#which-clients-work).
#[diagnostic::on_unimplemented(
    message = "the inner client of a `RotatingClient` returns `{Self}`, which cannot carry a generation's lease",
    label = "this client's response type is not supported",
    note = "the inner client must return `http::Response<B>` with `B: http_body::Body`, or `reqwest::Response` (with the `reqwest` feature of tower-rotating-client)",
    note = "adapt other clients with `tower::ServiceExt::map_response` (`tower::util::MapResponse`) into an `http::Response<B>`; see the crate docs, \"Which clients work\""
)]
pub trait ClientResponse: sealed::Sealed {
    /// What the rotating client returns for this response: the same
    /// response, with the lease riding in its body.
    type Leased;

    /// Moves the lease into the response's body. Only the crate can call
    /// it: nothing outside can make an [`sealed::Attach`].
    #[doc(hidden)]
    fn attach(self, lease: sealed::Attach) -> Self::Leased;
}

pub(crate) mod sealed {
    use super::Lease;

    /// The lease on its way into a response's body, and whether its
    /// generation looks at the response head on the way (failure trigger,
    /// `generation_extension`). The flag could be read from the lease;
    /// `ResponseFuture` passes it as a constant instead, so that the common
    /// path's `attach` has no branch (and no copy of the head for one).
    #[allow(unreachable_pub, missing_debug_implementations)]
    pub struct Attach {
        pub(crate) lease: Option<Lease>,
        pub(crate) observe: bool,
    }

    /// Not nameable outside the crate, so `ClientResponse` cannot be
    /// implemented elsewhere.
    #[allow(unreachable_pub)]
    pub trait Sealed: Sized {}
}

/// Lets the generation judge the response head (failure trigger) and tag
/// it (`generation_extension`). Out of line and cold: the common response
/// goes through `attach` with its flag a constant `false`, so that it moves
/// in place.
#[cold]
#[inline(never)]
pub(crate) fn observe_parts(
    mut parts: http::response::Parts,
    lease: Option<&Lease>,
) -> http::response::Parts {
    if let Some(id) = lease.and_then(|lease| lease.on_response(parts.status, &parts.headers)) {
        parts.extensions.insert(id);
    }
    parts
}

impl<B: http_body::Body> ClientResponse for http::Response<B> {
    type Leased = http::Response<ResponseBody<B>>;

    // Whether the body holds the lease (an empty one holds none) is settled
    // before the response is taken apart, so that nothing but the body's
    // wrapping sits between `into_parts` and `from_parts` (measured: 9
    // instructions per request less on the bench's single-thread path, and
    // 7 per fresh clone, than settling it in `ResponseBody::new` alone). A
    // generation that looks at each response keeps the lease until the head
    // is judged, whatever the body (an empty 503 counts as a failure too);
    // `ResponseBody::new` then lets go of it.
    #[inline(always)]
    fn attach(self, attach: sealed::Attach) -> http::Response<ResponseBody<B>> {
        let lease = if !attach.observe && self.body().is_end_stream() {
            None
        } else {
            attach.lease
        };
        let (mut parts, body) = self.into_parts();
        if attach.observe {
            parts = observe_parts(parts, lease.as_ref());
        }
        http::Response::from_parts(parts, ResponseBody::new(body, lease))
    }
}

impl<B: http_body::Body> sealed::Sealed for http::Response<B> {}
