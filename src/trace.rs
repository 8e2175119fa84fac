//! Lifecycle events, emitted through `tracing` with the `tracing` feature
//! and compiled to nothing without it.

#![cfg_attr(not(feature = "tracing"), allow(unused_variables))]

use std::time::Duration;

use crate::error::RotateError;
use crate::generation::Generation;
use crate::stats::RetiredGeneration;

#[cfg(feature = "tracing")]
const TARGET: &str = "tower_rotating_client";

#[inline]
pub(crate) fn build_started(generation: u64) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: TARGET, generation, "build started");
}

#[inline]
pub(crate) fn build_succeeded(took: Duration) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: TARGET, ?took, "build succeeded");
}

#[inline]
pub(crate) fn build_failed(error: &RotateError, failures: u32, retry_in: Duration) {
    #[cfg(feature = "tracing")]
    tracing::warn!(target: TARGET, %error, failures, ?retry_in, "build failed");
}

#[inline]
pub(crate) fn swapped<S: 'static>(old: &Generation<S>, new: u64, in_flight: usize) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        target: TARGET,
        generation = new,
        retiring = old.id,
        age = ?old.born.elapsed(),
        requests = old.requests(),
        in_flight,
        "swapped; drain started"
    );
}

#[inline]
pub(crate) fn retired(info: &RetiredGeneration) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        target: TARGET,
        generation = info.id,
        age = ?info.age,
        requests = info.requests,
        drained_in = ?info.drained_in,
        forced = info.forced,
        in_flight = info.in_flight_at_retire,
        "retired"
    );
}
