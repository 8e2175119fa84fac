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

#[cfg(all(test, feature = "tracing", not(loom)))]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tower_layer::Layer;

    use crate::testing::{advance, Builds, ScriptBody};
    use crate::RotatingClientLayer;

    /// Collects formatted events.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("not poisoned").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().expect("not poisoned").clone();
            String::from_utf8(bytes)
                .expect("utf-8")
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    fn line<'a>(lines: &'a [String], message: &str, generation: &str) -> &'a str {
        lines
            .iter()
            .find(|line| line.contains(message) && line.contains(generation))
            .unwrap_or_else(|| panic!("no `{message}` event with {generation} in {lines:#?}"))
    }

    #[tokio::test(start_paused = true)]
    async fn lifecycle_events_carry_the_generation_and_its_figures() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer({
                let captured = captured.clone();
                move || captured.clone()
            })
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let client = RotatingClientLayer::new(Duration::from_secs(60))
            .jitter(0.0)
            .layer(Builds::default().factory());
        let (tx, body) = ScriptBody::channel();
        let mut body = client
            .clone()
            .oneshot(http::Request::new(body))
            .await
            .expect("ok")
            .into_body();
        advance(Duration::from_secs(60)).await;
        advance(Duration::from_secs(5)).await;
        drop(tx);
        assert!(body.frame().await.is_none());
        drop(client);

        let lines = captured.lines();
        line(&lines, "build started", "replacing=1");
        line(&lines, "build succeeded", "replacing=1");
        let swap = line(&lines, "swap", "generation=2");
        assert!(
            swap.contains("replacing=1") && swap.contains("reason=\"ttl\""),
            "{swap}"
        );
        let drain = line(&lines, "drain started", "generation=1");
        assert!(
            drain.contains("in_flight=1") && drain.contains("requests=1"),
            "{drain}"
        );
        let drained = line(&lines, "drained", "generation=1");
        assert!(drained.contains("drain_duration=5s"), "{drained}");
        let retired = line(&lines, "retired", "generation=1");
        assert!(
            retired.contains("age=65s") && retired.contains("requests=1"),
            "{retired}"
        );
        line(&lines, "retired", "generation=2");
    }
}
