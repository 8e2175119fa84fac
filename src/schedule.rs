//! Schedule maths: lifetimes with jitter, backoff after failed builds, how
//! far ahead async builds start, and the randomness behind them. Pure
//! functions of their inputs, apart from [`Rng`].

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::config::{Config, DEFAULT_BUILD_AHEAD_MAX};

/// Sleeps are cut into pieces of at most this, so that far deadlines (a
/// TTL of years, or `Duration::MAX`) never overflow the timer. Backoff
/// delays are capped at it too.
pub(crate) const MAX_SLEEP: Duration = Duration::from_secs(24 * 60 * 60);

/// Why a generation was swapped out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    Ttl,
    Rotate,
    MaxRequests,
    Failures,
    Changed,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::Ttl => "ttl",
            Reason::Rotate => "rotate",
            Reason::MaxRequests => "max_requests",
            Reason::Failures => "failures",
            Reason::Changed => "changed",
        }
    }
}

/// A small lock-free random source: splitmix64 over an atomic counter,
/// seeded per rotating client from the standard library's random keys, so
/// that two clients created at the same moment draw different jitter.
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new() -> Self {
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Rng(AtomicU64::new(seed))
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&self) -> f64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 53 random bits, the precision of an f64 mantissa.
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl fmt::Debug for Rng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Rng")
    }
}

/// `ttl * (1 - jitter * u)`: jitter only shortens a lifetime.
pub(crate) fn lifetime(ttl: Duration, jitter: f64, u: f64) -> Duration {
    let cut = ttl.as_secs_f64() * jitter * u;
    // `cut <= ttl`, so this never underflows; `try_from` guards NaN/inf.
    ttl.saturating_sub(Duration::try_from_secs_f64(cut).unwrap_or(Duration::ZERO))
}

/// The lifetime of the first generation: jittered like every other, or
/// `ttl * u'` with `u'` uniform in `(0, 1]` under `stagger_first_rotation`.
pub(crate) fn first_lifetime(config: &Config, u: f64) -> Duration {
    if config.stagger_first {
        lifetime(config.ttl, 1.0, u)
    } else {
        lifetime(config.ttl, config.jitter, u)
    }
}

/// Delay before retry number `failures` (1-based): doubling from the
/// configured minimum, capped at its maximum, with up to half taken off at
/// random.
pub(crate) fn backoff(config: &Config, failures: u32, u: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let base = config
        .backoff_min
        .checked_mul(1u32 << exp)
        .unwrap_or(config.backoff_max)
        .min(config.backoff_max);
    // Clamped so that `now + delay` never overflows, whatever `max` is.
    base.saturating_sub(base.mul_f64(0.5 * u)).min(MAX_SLEEP)
}

/// How long before expiry an async build starts.
pub(crate) fn build_ahead(config: &Config, lifetime: Duration) -> Duration {
    match config.build_ahead {
        Some(ahead) => ahead.min(lifetime),
        None => (lifetime / 10).min(DEFAULT_BUILD_AHEAD_MAX),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::Duration;

    use super::{backoff, build_ahead, first_lifetime, lifetime, Rng, MAX_SLEEP};
    use crate::config::Config;

    #[test]
    fn lifetime_only_shortens_and_spans_the_jitter() {
        let ttl = Duration::from_secs(100);
        assert_eq!(lifetime(ttl, 0.0, 0.99), ttl, "no jitter: exactly the TTL");
        assert_eq!(lifetime(ttl, 0.1, 0.0), ttl, "u = 0: the full TTL");
        let shortest = lifetime(ttl, 0.1, 1.0 - f64::EPSILON);
        assert!(
            shortest >= Duration::from_secs(90) && shortest < ttl,
            "{shortest:?}"
        );
        assert_eq!(lifetime(ttl, 0.5, 0.5), Duration::from_secs(75));
        assert!(
            lifetime(Duration::MAX, 0.1, 0.9) < Duration::MAX,
            "no overflow at MAX"
        );
        assert!(!lifetime(Duration::from_nanos(1), 1.0, 0.0).is_zero());
    }

    #[test]
    fn the_first_lifetime_is_staggered_over_the_whole_ttl_only_when_asked() {
        let mut config = Config::new(Duration::from_secs(100));
        assert_eq!(
            first_lifetime(&config, 0.5),
            Duration::from_secs(95),
            "jittered like any other by default"
        );
        config.stagger_first = true;
        assert_eq!(first_lifetime(&config, 0.5), Duration::from_secs(50));
        assert_eq!(
            first_lifetime(&config, 0.0),
            Duration::from_secs(100),
            "the TTL stays an upper bound"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_at_most_half_off() {
        let mut config = Config::new(Duration::from_secs(60));
        config.backoff_min = Duration::from_secs(1);
        config.backoff_max = Duration::from_secs(8);
        let full: Vec<_> = (1..=6).map(|n| backoff(&config, n, 0.0)).collect();
        assert_eq!(full, [1, 2, 4, 8, 8, 8].map(Duration::from_secs));
        assert_eq!(
            backoff(&config, 3, 1.0),
            Duration::from_secs(2),
            "half off at most"
        );
        assert_eq!(
            backoff(&config, u32::MAX, 0.0),
            Duration::from_secs(8),
            "no overflow"
        );

        config.backoff_max = Duration::MAX;
        assert_eq!(backoff(&config, 64, 0.0), MAX_SLEEP, "clamped to a day");
    }

    #[test]
    fn async_builds_start_a_tenth_ahead_at_most_ten_seconds() {
        let mut config = Config::new(Duration::from_secs(60));
        assert_eq!(
            build_ahead(&config, Duration::from_secs(60)),
            Duration::from_secs(6)
        );
        assert_eq!(
            build_ahead(&config, Duration::from_secs(3600)),
            Duration::from_secs(10)
        );
        config.build_ahead = Some(Duration::from_secs(120));
        assert_eq!(
            build_ahead(&config, Duration::from_secs(60)),
            Duration::from_secs(60),
            "capped at the lifetime"
        );
    }

    #[test]
    fn two_sources_draw_different_sequences_within_zero_and_one() {
        let (a, b) = (Rng::new(), Rng::new());
        let (xs, ys): (Vec<f64>, Vec<f64>) = (0..8).map(|_| (a.next_f64(), b.next_f64())).unzip();
        assert_ne!(xs, ys, "seeded per source");
        assert!(xs.iter().chain(&ys).all(|u| (0.0..1.0).contains(u)));
    }
}
