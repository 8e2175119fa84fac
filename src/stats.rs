//! Snapshots of a rotating client's state, for metrics and the retire hook.

use std::time::Duration;

/// A snapshot of a [`RotatingClient`](crate::RotatingClient), returned by
/// [`RotatingClient::stats`](crate::RotatingClient::stats).
///
/// Taking it locks a short list of live generations and reads a few
/// counters; it is meant for a metrics scrape, not for every request.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Stats {
    /// Id of the current generation. The first generation is `1`, and each
    /// rotation adds one.
    pub current_generation: u64,
    /// How long the current generation has been current.
    pub current_age: Duration,
    /// Live generations: the current one plus those still draining.
    pub live_generations: usize,
    /// Responses in flight across all live generations. This counts
    /// response futures and bodies that have not finished, plus handles
    /// between a Ready `poll_ready` and `call`.
    pub in_flight: usize,
    /// Rotations done: how many times a new generation became current.
    pub rotations: u64,
    /// Builds that failed, panicked or timed out, counting background
    /// builds and [`rotate`](crate::RotatingClient::rotate) calls alike.
    pub failed_builds: u64,
    /// Generations let go by `drain_timeout` while responses were still in
    /// flight.
    pub forced_retirements: u64,
    /// Per-generation figures, oldest first; the current generation is last.
    pub generations: Vec<GenerationStats>,
}

/// Figures for one live generation, part of [`Stats`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GenerationStats {
    /// The generation's id.
    pub id: u64,
    /// Time since the generation became current.
    pub age: Duration,
    /// Responses (and ready reservations) in flight on this generation.
    pub in_flight: usize,
    /// Requests this generation has served.
    pub requests: u64,
    /// Whether this is the current generation.
    pub current: bool,
    /// For a draining generation, time since it stopped being current.
    pub draining_for: Option<Duration>,
}

/// Figures of a generation at the moment it retired, handed to the retire
/// hook with its client and emitted with the `tracing` feature.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetiredGeneration {
    /// The generation's id.
    pub id: u64,
    /// Time from becoming current to retiring.
    pub age: Duration,
    /// Requests the generation served.
    pub requests: u64,
    /// Time from ceasing to be current to retiring: how long it drained.
    /// Zero for a generation retired while current (at shutdown).
    pub drained_in: Duration,
    /// `true` when `drain_timeout` let go of the generation while responses
    /// were still in flight. The retire hook never sees such a generation.
    pub forced: bool,
    /// Responses still in flight at retirement: zero unless `forced`.
    pub in_flight_at_retire: usize,
}
