//! [`Lease`]: the private guard that response futures and bodies hold on
//! the generation that served them.
//!
//! A lease is a strong reference to one shard of a generation: one thin
//! pointer, whatever the client's type, so that the future and body types
//! stay generic over the inner future and body only. Dropping it is the
//! release: one decrement on the shard's own cache line. The generation
//! retires when its last shard goes (see `shard.rs` and `generation.rs`).

use std::any::Any;
use std::fmt;

use http::{HeaderMap, StatusCode};

use crate::shard::Shard;
use crate::stats::GenerationId;
use crate::sync::Arc;

/// A strong reference to a generation's shard.
pub(crate) struct Lease(Arc<Shard>);

impl Lease {
    #[inline]
    pub(crate) fn new(shard: Arc<Shard>) -> Self {
        Lease(shard)
    }

    /// Whether the generation looks at every outcome (failure trigger,
    /// generation extension).
    #[inline]
    pub(crate) fn observes(&self) -> bool {
        self.0.observes()
    }

    /// The id of the generation this lease keeps alive.
    pub(crate) fn generation_id(&self) -> u64 {
        self.0.generation_id()
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
        f.debug_tuple("Lease").field(&self.generation_id()).finish()
    }
}
