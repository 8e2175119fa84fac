//! [`Lease`]: the private guard that response futures and bodies hold on
//! the generation that served them.
//!
//! A lease is a strong reference to one shard of a generation, type-erased
//! so that the future and body types stay generic over the inner future and
//! body only. Dropping it is the release: one decrement on the shard's own
//! cache line. The generation retires when its last shard goes (see
//! `shard.rs` and `generation.rs`).

use std::any::Any;
use std::fmt;

use http::{HeaderMap, StatusCode};

use crate::stats::GenerationId;
use crate::sync::Arc;

/// What a lease holds on to: a generation's shard, which answers for its
/// generation.
pub(crate) trait Leased: Send + Sync + 'static {
    fn id(&self) -> u64;

    /// A response head arrived from this generation's client. Returns the
    /// id to add to the response's extensions, if that is on.
    fn on_response(&self, _status: StatusCode, _headers: &HeaderMap) -> Option<GenerationId> {
        None
    }

    /// This generation's client returned an error.
    fn on_error(&self, _error: &dyn Any) {}
}

/// A type-erased strong reference to a generation's shard.
#[cfg(not(loom))]
pub(crate) struct Lease(Arc<dyn Leased>);

/// Under loom, whose `Arc` (the facade's) cannot be unsized, a box around
/// the `Arc`.
#[cfg(loom)]
pub(crate) struct Lease(Box<dyn Leased>);

#[cfg(loom)]
impl<L: Leased> Leased for Arc<L> {
    fn id(&self) -> u64 {
        L::id(self)
    }
}

impl Lease {
    #[inline]
    pub(crate) fn new<L: Leased>(leased: Arc<L>) -> Self {
        #[cfg(not(loom))]
        return Lease(leased);
        #[cfg(loom)]
        return Lease(Box::new(leased));
    }

    /// The id of the generation this lease keeps alive.
    pub(crate) fn generation_id(&self) -> u64 {
        self.0.id()
    }

    #[inline]
    pub(crate) fn on_response(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<GenerationId> {
        self.0.on_response(status, headers)
    }

    #[inline]
    pub(crate) fn on_error(&self, error: &dyn Any) {
        self.0.on_error(error);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&self.0.id()).finish()
    }
}
