//! A scripted probe for `rotate_on_change`: the test sets what the next
//! probes answer, and counts the probes run and the live copies of what
//! the probe captures.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tower_rotating_client::Probe;

/// What the next probes answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// This value.
    Value(u64),
    /// An error.
    Fail,
    /// A panic inside the probe's future.
    Panic,
    /// Never: the probe times out.
    Hang,
}

#[derive(Debug)]
struct Script {
    answer: Answer,
    /// When each probe started, first to last.
    started: Vec<tokio::time::Instant>,
}

/// The script of a probe. Clones share it; the probe made by
/// [`ScriptedProbe::probe`] holds clones, counted by
/// [`ScriptedProbe::live_copies`].
#[derive(Clone, Debug)]
pub struct ScriptedProbe(Arc<Mutex<Script>>);

impl ScriptedProbe {
    /// A probe that answers `value` until told otherwise.
    pub fn new(value: u64) -> Self {
        ScriptedProbe(Arc::new(Mutex::new(Script {
            answer: Answer::Value(value),
            started: Vec::new(),
        })))
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From the next probe on, answer `answer`.
    pub fn set(&self, answer: Answer) {
        self.script().answer = answer;
    }

    /// Probes started so far.
    pub fn probes(&self) -> usize {
        self.script().started.len()
    }

    /// When the first probe at or after `instant` started, if one has.
    pub fn first_probe_since(&self, instant: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.script()
            .started
            .iter()
            .copied()
            .find(|started| *started >= instant)
    }

    /// Copies of the script alive besides this one: the probe's own, and
    /// one per probe in progress.
    pub fn live_copies(&self) -> usize {
        Arc::strong_count(&self.0) - 1
    }

    /// The probe, run every `period`.
    pub fn probe(&self, period: Duration) -> Probe<u64> {
        let script = self.clone();
        Probe::new(period, move || {
            let script = script.clone();
            async move {
                let answer = {
                    let mut state = script.script();
                    state.started.push(tokio::time::Instant::now());
                    state.answer
                };
                match answer {
                    Answer::Value(value) => Ok(value),
                    Answer::Fail => Err(std::io::Error::other("the probe failed")),
                    Answer::Panic => panic!("the probe panicked"),
                    Answer::Hang => std::future::pending().await,
                }
            }
        })
    }
}
