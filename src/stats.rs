//! Snapshots of a rotating client's state, for metrics and the retire hook.

use std::fmt;
use std::time::Duration;

/// The id of a generation: the first is `1`, and each rotation adds one.
///
/// Returned by [`RotatingClient::rotate`](crate::RotatingClient::rotate),
/// used in [`Stats`] and [`GenerationStats`], and added to each response's
/// extensions when
/// [`generation_extension`](crate::RotatingClientLayer::generation_extension)
/// is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(pub u64);

impl fmt::Display for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// A snapshot of a [`RotatingClient`](crate::RotatingClient), returned by
/// [`RotatingClient::stats`](crate::RotatingClient::stats).
///
/// Taking it locks a short list of live generations and reads a few
/// counters; it is meant for a metrics scrape, not for every request.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Stats {
    /// The current generation.
    pub current_generation: GenerationId,
    /// Rotations done: how many times a new generation became current.
    pub rotations: u64,
    /// Builds that failed, panicked or timed out, counting background
    /// builds and [`rotate`](crate::RotatingClient::rotate) calls alike.
    pub failed_builds: u64,
    /// Probes of
    /// [`rotate_on_change`](crate::RotatingClientLayer::rotate_on_change)
    /// that failed, panicked or timed out. None of them rotated anything.
    pub failed_probes: u64,
    /// Generations let go by `drain_timeout` while responses were still in
    /// flight.
    pub forced_retirements: u64,
    /// The live generations, oldest first: those still draining, then the
    /// current one.
    pub generations: Vec<GenerationStats>,
}

impl Stats {
    /// Live generations: the current one plus those still draining.
    pub fn live_generations(&self) -> usize {
        self.generations.len()
    }

    /// Responses in flight across all live generations: see
    /// [`GenerationStats::in_flight`].
    pub fn in_flight(&self) -> usize {
        self.generations
            .iter()
            .map(|generation| generation.in_flight)
            .sum()
    }

    /// How long the current generation has been current.
    pub fn current_age(&self) -> Duration {
        self.generations
            .iter()
            .find(|generation| generation.current)
            .map_or(Duration::ZERO, |generation| generation.age)
    }
}

/// Figures of one generation: live, in [`Stats::generations`], or at the
/// moment it retired, as handed to the
/// [`on_retire`](crate::RotatingClientLayer::on_retire) hook.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GenerationStats {
    /// The generation's id.
    pub id: GenerationId,
    /// Time since the generation became current.
    pub age: Duration,
    /// Responses in flight on this generation: response futures and bodies
    /// that have not finished, plus handles between a Ready `poll_ready`
    /// and `call`. A snapshot taken while requests start and finish on
    /// other threads may be off by the ones that start or finish during
    /// it. Always zero for a generation handed to the retire hook.
    pub in_flight: usize,
    /// Requests this generation has served, counted at `call`. Each thread
    /// counts on its own shard; a snapshot sums them, so one taken while
    /// requests start on other threads may miss the latest. Exact in the
    /// figures handed to the retire hook.
    pub requests: u64,
    /// Whether this is the current generation. At retirement, `true` only
    /// for the last generation, retired while current once every handle
    /// and response is gone.
    pub current: bool,
    /// For a generation that is no longer current, the time since it
    /// stopped being current: how long it has drained (or, at retirement,
    /// how long it took to drain).
    pub draining_for: Option<Duration>,
}
