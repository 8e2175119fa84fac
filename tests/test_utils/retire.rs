//! A retire hook that records every retirement.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use super::TagClient;
use tower_rotating_client::GenerationStats;

/// Records every retirement that a rotating client's retire hook sees
/// (see [`RetireLog::hook`]). Clones share the record.
#[derive(Clone, Default)]
pub struct RetireLog(Arc<Mutex<Vec<Retirement>>>);

/// The id of the client handed to a [`RetireLog::tag_hook`], if any, and
/// the generation retired.
type Retirement = (Option<usize>, GenerationStats);

impl RetireLog {
    /// A hook for `RotatingClientLayer::on_retire`: drops the retired client
    /// at once (a pooled client closes its idle connections with it) and
    /// records the generation.
    pub fn hook<S>(&self) -> impl Fn(S, GenerationStats) + Send + Sync + 'static {
        let log = Arc::clone(&self.0);
        move |client, generation| {
            drop(client);
            log.lock().expect("not poisoned").push((None, generation));
        }
    }

    /// Like [`RetireLog::hook`], and also records which [`TagClient`] the
    /// hook was handed (see [`RetireLog::clients`]).
    pub fn tag_hook(&self) -> impl Fn(TagClient, GenerationStats) + Send + Sync + 'static {
        let log = Arc::clone(&self.0);
        move |client, generation| {
            log.lock()
                .expect("not poisoned")
                .push((Some(client.id), generation));
        }
    }

    /// Every retirement so far, in the order they happened.
    pub fn all(&self) -> Vec<GenerationStats> {
        let log = self.0.lock().expect("not poisoned");
        log.iter()
            .map(|(_, generation)| generation.clone())
            .collect()
    }

    /// The ids of the retired generations, in the order they retired.
    pub fn ids(&self) -> Vec<u64> {
        self.all()
            .iter()
            .map(|generation| generation.id.0)
            .collect()
    }

    /// The ids of the clients handed to a [`RetireLog::tag_hook`], in the
    /// order they retired.
    pub fn clients(&self) -> Vec<Option<usize>> {
        let log = self.0.lock().expect("not poisoned");
        log.iter().map(|(client, _)| *client).collect()
    }

    /// Whether exactly the generations before `current` (`1..current`)
    /// retired, each once, in any order.
    pub fn is_all_before(&self, current: u64) -> bool {
        let mut ids = self.ids();
        ids.sort_unstable();
        ids == (1..current).collect::<Vec<_>>()
    }

    /// Asserts that `count` generations retired, each exactly once, each
    /// drained (nothing in flight), and returns their ids.
    pub fn assert_each_once(&self, count: u64) -> BTreeSet<u64> {
        let all = self.all();
        let ids: BTreeSet<u64> = all.iter().map(|generation| generation.id.0).collect();
        assert_eq!(ids.len(), all.len(), "a generation retired twice: {all:?}");
        assert_eq!(all.len() as u64, count, "retirements: {all:?}");
        for generation in &all {
            assert!(
                generation.in_flight == 0,
                "retired while in use: {generation:?}"
            );
        }
        ids
    }
}
