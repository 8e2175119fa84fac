//! Lifecycle events, emitted through `tracing` with the `tracing` feature
//! and compiled to nothing without it. Each takes plain values.
//!
//! Every event has target `tower_rotating_client` and carries the
//! generation id. Builds are `debug`, swaps, retirements and a changed
//! probe value `info`; a failed build, a failed probe and a drain timeout
//! are `warn`.

#![cfg_attr(not(feature = "tracing"), allow(unused_variables))]

use std::time::Duration;

use crate::error::{ProbeError, RotateError};
use crate::stats::GenerationStats;

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

/// A probe failed, panicked or timed out while generation `current` was
/// current. The error says which; no probed value is ever traced.
#[inline]
pub(crate) fn probe_failed(current: u64, error: &ProbeError) {
    #[cfg(feature = "tracing")]
    tracing::warn!(target: TARGET, generation = current, %error, "probe failed");
}

/// The probed value differs from generation `current`'s, seen on
/// `confirmations` probes in a row: a rotation is asked for. The values
/// themselves (addresses, digests, versions) are not traced.
#[inline]
pub(crate) fn probe_changed(current: u64, confirmations: u32) {
    #[cfg(feature = "tracing")]
    tracing::info!(
        target: TARGET,
        generation = current,
        confirmations,
        "probed value changed"
    );
}

/// Generation `new` became current in place of `old`, which starts
/// draining. `reason` is what triggered the swap.
#[inline]
pub(crate) fn swapped(old: &GenerationStats, new: u64, reason: &'static str) {
    #[cfg(feature = "tracing")]
    {
        tracing::info!(
            target: TARGET,
            generation = new,
            replacing = old.id.0,
            reason,
            "swap"
        );
        tracing::info!(
            target: TARGET,
            generation = old.id.0,
            age = ?old.age,
            requests = old.requests,
            in_flight = old.in_flight,
            "drain started"
        );
    }
}

/// A generation retired: let go by `drain_timeout` with responses still
/// in flight (`forced`), drained, or retired while current (the last one,
/// once every handle is gone).
#[inline]
pub(crate) fn retired(info: &GenerationStats, forced: bool) {
    #[cfg(feature = "tracing")]
    {
        if forced {
            tracing::warn!(
                target: TARGET,
                generation = info.id.0,
                drain_duration = ?info.draining_for.unwrap_or_default(),
                in_flight = info.in_flight,
                "drain timed out"
            );
        } else if let Some(drain_duration) = info.draining_for {
            tracing::info!(
                target: TARGET,
                generation = info.id.0,
                ?drain_duration,
                "drained"
            );
        }
        tracing::info!(
            target: TARGET,
            generation = info.id.0,
            age = ?info.age,
            requests = info.requests,
            forced,
            "retired"
        );
    }
}
