//! Lifecycle events, emitted through `tracing` with the `tracing` feature
//! and compiled to nothing without it.
//!
//! Every event has target `tower_rotating_client` and carries the
//! generation id. Builds and retirements are `debug` and `info`; a failed
//! build is `warn`.

#![cfg_attr(not(feature = "tracing"), allow(unused_variables))]

use std::time::Duration;

use crate::error::RotateError;
use crate::generation::Generation;
use crate::stats::RetiredGeneration;
use crate::trigger::Reason;

#[cfg(feature = "tracing")]
const TARGET: &str = "tower_rotating_client";

/// A build of the successor of generation `current` started.
#[inline]
pub(crate) fn build_started(current: u64) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: TARGET, replacing = current, "build started");
}

#[inline]
pub(crate) fn build_succeeded(current: u64, took: Duration) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: TARGET, replacing = current, ?took, "build succeeded");
}

#[inline]
pub(crate) fn build_failed(current: u64, error: &RotateError, failures: u32, retry_in: Duration) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: TARGET,
        replacing = current,
        %error,
        consecutive_failures = failures,
        ?retry_in,
        "build failed"
    );
}

/// `new` became current in place of `old`, which starts draining.
#[inline]
pub(crate) fn swapped<S: 'static>(old: &Generation<S>, new: u64, in_flight: usize, reason: Reason) {
    #[cfg(feature = "tracing")]
    {
        tracing::info!(
            target: TARGET,
            generation = new,
            replacing = old.id,
            reason = reason.as_str(),
            "swap"
        );
        tracing::info!(
            target: TARGET,
            generation = old.id,
            age = ?old.born.elapsed(),
            requests = old.requests(),
            in_flight,
            "drain started"
        );
    }
}

/// A generation retired. `drained` is false for one that was still
/// current (the last one, when every handle is gone).
#[inline]
pub(crate) fn retired(info: &RetiredGeneration, drained: bool) {
    #[cfg(feature = "tracing")]
    {
        if info.forced {
            tracing::warn!(
                target: TARGET,
                generation = info.id,
                drain_duration = ?info.drained_in,
                in_flight = info.in_flight_at_retire,
                "drain timed out"
            );
        } else if drained {
            tracing::info!(
                target: TARGET,
                generation = info.id,
                drain_duration = ?info.drained_in,
                "drained"
            );
        }
        tracing::info!(
            target: TARGET,
            generation = info.id,
            age = ?info.age,
            requests = info.requests,
            forced = info.forced,
            "retired"
        );
    }
}
