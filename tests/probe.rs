//! `rotate_on_change`: a probe that looks often and rotates only when its
//! value changed. Paused time and a scripted probe ([`ScriptedProbe`]);
//! the scale-up on real loopback servers is in `tests/scale_up.rs`.

mod test_utils;

use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_rotating_client::{Probe, RotatingClient, RotatingClientLayer};

use test_utils::{
    live, open_stream, request, served_by, settle, Answer, Builds, ScriptedProbe, TagClient,
};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const PERIOD: Duration = Duration::from_secs(10);

/// A rotating client of `builds` with a TTL of two days, rotated by
/// `probe` alone.
fn probed(builds: &Builds, probe: Probe<u64>) -> RotatingClient<TagClient> {
    RotatingClientLayer::new(2 * DAY)
        .rotate_on_change(probe)
        .layer(builds.factory())
}

/// Which generation serves a request now.
async fn served(client: &RotatingClient<TagClient>) -> usize {
    let response = client.clone().oneshot(request()).await.expect("infallible");
    served_by(&response)
}

/// Sleeps (paused time, so the clock jumps from timer to timer) until
/// `probes` probes have started, at most `limit` periods, then lets what
/// the last one asked for happen.
async fn until_probes(script: &ScriptedProbe, probes: usize, limit: u32) {
    for _ in 0..limit * 20 {
        if script.probes() >= probes {
            settle().await;
            return;
        }
        tokio::time::sleep(PERIOD / 20).await;
    }
    panic!(
        "{} probes after {limit} periods, want {probes}",
        script.probes()
    );
}

#[tokio::test(start_paused = true)]
async fn a_stable_value_over_a_day_rotates_never() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(7);
    let client = probed(&builds, script.probe(PERIOD));
    tokio::time::sleep(DAY).await;
    let probes = script.probes();
    // One probe at the start, then one every 9 to 10 s.
    assert!(
        (8_641..=9_601).contains(&probes),
        "the probe ran all day: {probes} probes"
    );
    let stats = client.stats();
    assert_eq!(stats.rotations, 0, "a stable value never rotates");
    assert_eq!(stats.failed_probes, 0);
    assert_eq!(builds.count(), 1, "no build either");
    assert_eq!(served(&client).await, 1);
}

#[tokio::test(start_paused = true)]
async fn one_change_rotates_exactly_once_within_one_period() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = probed(&builds, script.probe(PERIOD).confirmations(1));
    until_probes(&script, 3, 3).await;
    assert_eq!(served(&client).await, 1);

    let changed_at = tokio::time::Instant::now();
    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    let took = script
        .first_probe_since(changed_at)
        .map(|probed| probed - changed_at);
    assert!(
        took.is_some_and(|took| took <= PERIOD),
        "the next probe comes within a period: {took:?}"
    );
    assert_eq!(
        client.stats().rotations,
        1,
        "the first probe that saw the change rotated"
    );
    assert_eq!(served(&client).await, 2, "the new generation serves");

    // The changed value is generation 2's: no further rotation all day.
    tokio::time::sleep(DAY).await;
    assert_eq!(client.stats().rotations, 1, "exactly one rotation");
    assert_eq!(builds.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_change_needs_n_equal_probes_in_a_row() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = probed(
        &builds,
        script
            .probe(PERIOD)
            .confirmations(3)
            .min_interval(Duration::ZERO),
    );
    until_probes(&script, 2, 3).await;

    // 2 then 3 then 2: never three equal ones in a row.
    for value in [2, 2, 3, 2, 2, 1, 2] {
        script.set(Answer::Value(value));
        until_probes(&script, script.probes() + 1, 2).await;
        assert_eq!(client.stats().rotations, 0, "no run of 3 yet ({value})");
    }
    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(client.stats().rotations, 0, "2 of 3");
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(client.stats().rotations, 1, "3 of 3: rotated");
    assert_eq!(served(&client).await, 2);
}

#[tokio::test(start_paused = true)]
async fn a_value_flapping_on_every_probe_rotates_at_most_once_per_minimum_interval() {
    const MIN_INTERVAL: Duration = Duration::from_secs(600);
    let builds = Builds::default();
    let script = ScriptedProbe::new(0);
    let client = probed(
        &builds,
        script
            .probe(PERIOD)
            .confirmations(1)
            .min_interval(MIN_INTERVAL),
    );
    // Flip the value after every probe, for a day.
    let end = tokio::time::Instant::now() + DAY;
    let mut value = 0;
    while tokio::time::Instant::now() < end {
        value = 1 - value;
        script.set(Answer::Value(value));
        until_probes(&script, script.probes() + 1, 2).await;
    }
    let rotations = client.stats().rotations;
    let bound = DAY.as_secs() / MIN_INTERVAL.as_secs() + 1;
    assert!(
        rotations <= bound,
        "{rotations} rotations in a day, at most {bound} allowed"
    );
    // Each rotation comes with the first differing probe after the
    // interval: within two periods of it.
    let least = DAY.as_secs() / (MIN_INTERVAL + 2 * PERIOD).as_secs() - 1;
    assert!(
        rotations >= least,
        "the flapping value does rotate, about once per interval: {rotations}, want {least} or more"
    );

    // With the default of two confirmations the same flapping never
    // rotates at all.
    let script = ScriptedProbe::new(0);
    let client = probed(
        &Builds::default(),
        script.probe(PERIOD).min_interval(Duration::ZERO),
    );
    for round in 0..1_000 {
        script.set(Answer::Value(round % 2 + 1));
        until_probes(&script, script.probes() + 1, 2).await;
    }
    assert_eq!(
        client.stats().rotations,
        0,
        "never two equal values in a row"
    );
}

#[tokio::test(start_paused = true)]
async fn failed_panicking_and_hanging_probes_rotate_nothing_and_are_counted() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = probed(
        &builds,
        script
            .probe(PERIOD)
            .confirmations(1)
            .timeout(Duration::from_secs(2)),
    );
    until_probes(&script, 1, 1).await;

    let mut failed = 0;
    for answer in [Answer::Fail, Answer::Panic, Answer::Hang] {
        script.set(answer);
        // A request while the probe fails: served as usual.
        assert_eq!(served(&client).await, 1, "{answer:?}: requests unaffected");
        until_probes(&script, script.probes() + 2, 3).await;
        // The second of them has finished once the third starts.
        until_probes(&script, script.probes() + 1, 3).await;
        let stats = client.stats();
        assert!(
            stats.failed_probes >= failed + 2,
            "{answer:?}: counted ({} failed probes, {failed} before)",
            stats.failed_probes
        );
        failed = stats.failed_probes;
        assert_eq!(stats.rotations, 0, "{answer:?}: no rotation");
        assert_eq!(served(&client).await, 1, "{answer:?}: requests unaffected");
    }

    // The baseline survived the failures: the old value again is no change,
    // a new value still is.
    script.set(Answer::Value(1));
    until_probes(&script, script.probes() + 2, 3).await;
    assert_eq!(client.stats().rotations, 0);
    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(client.stats().rotations, 1, "the probe still works");
}

#[tokio::test(start_paused = true)]
async fn the_probe_stops_and_is_dropped_with_the_last_handle() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let layer = RotatingClientLayer::new(2 * DAY).rotate_on_change(script.probe(PERIOD));
    let client = layer.layer(builds.factory());
    drop(layer);
    let (tx, body) = open_stream(&client).await;
    until_probes(&script, 3, 3).await;
    assert!(
        script.live_copies() >= 1,
        "the probe holds its state while it runs"
    );

    drop(client);
    settle().await;
    let probes = script.probes();
    tokio::time::sleep(10 * PERIOD).await;
    assert_eq!(script.probes(), probes, "no probe after the last handle");
    assert_eq!(
        script.live_copies(),
        1,
        "an open response keeps the shared state, and with it the probe"
    );
    assert_eq!(builds.live_copies(1), 1, "the open body keeps its client");

    drop(tx);
    drop(body);
    settle().await;
    assert_eq!(
        script.live_copies(),
        0,
        "the probe's captured state is gone"
    );
    assert_eq!(builds.live_copies(1), 0, "the probe kept no client");
}

#[tokio::test(start_paused = true)]
async fn the_ttl_still_fires_beside_the_probe() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = RotatingClientLayer::new(Duration::from_secs(3600))
        .jitter(0.0)
        .rotate_on_change(script.probe(PERIOD))
        .layer(builds.factory());
    tokio::time::sleep(Duration::from_secs(3600) + PERIOD).await;
    assert_eq!(client.stats().rotations, 1, "the TTL rotated");
    assert_eq!(served(&client).await, 2);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(client.stats().rotations, 2, "and keeps rotating");
    assert!(script.probes() > 700, "the probe ran meanwhile");
}

#[tokio::test(start_paused = true)]
async fn max_live_generations_still_holds() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = RotatingClientLayer::new(2 * DAY)
        .max_live_generations(2)
        .rotate_on_change(
            script
                .probe(PERIOD)
                .confirmations(1)
                .min_interval(Duration::ZERO),
        )
        .layer(builds.factory());
    until_probes(&script, 1, 1).await;
    let (tx1, body1) = open_stream(&client).await;

    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(live(&client.stats()), [1, 2], "generation 1 drains");
    let (tx2, body2) = open_stream(&client).await;

    script.set(Answer::Value(3));
    for _ in 0..20 {
        until_probes(&script, script.probes() + 1, 2).await;
        assert_eq!(
            live(&client.stats()),
            [1, 2],
            "at the cap: the rotation waits for room"
        );
    }
    drop((tx1, body1));
    settle().await;
    assert_eq!(live(&client.stats()), [2, 3], "room made, rotated");
    assert_eq!(served(&client).await, 3);
    drop((tx2, body2));
}

#[tokio::test(start_paused = true)]
async fn an_async_factory_builds_afresh_and_connects_before_serving() {
    // TTL 100 s: the async factory builds the successor of generation 1
    // 50 s ahead. A change confirmed after that must not use that client.
    let builds = Builds::default();
    let factory = builds.factory();
    let script = ScriptedProbe::new(1);
    let client = RotatingClientLayer::new(Duration::from_secs(100))
        .jitter(0.0)
        .build_ahead(Duration::from_secs(50))
        .rotate_on_change(script.probe(PERIOD).confirmations(1))
        .layer_async(move || {
            let client = factory();
            async move {
                // Connecting takes 5 s.
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok::<_, std::io::Error>(client)
            }
        })
        .await
        .expect("first build");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(builds.count(), 2, "built ahead at 50 s");

    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(
        served(&client).await,
        1,
        "while the new client connects, the old one serves"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    settle().await;
    assert_eq!(builds.count(), 3, "a fresh build after the change");
    assert_eq!(
        served(&client).await,
        3,
        "the client built after the change serves, not the one built ahead"
    );
    assert_eq!(client.stats().rotations, 1);
}

#[cfg(feature = "dns")]
#[tokio::test]
async fn the_dns_probe_resolves_and_a_stable_answer_rotates_nothing() {
    // Address literals: resolved without asking any DNS server. The
    // second has no port, which the resolver refuses.
    let period = Duration::from_millis(5);
    let stable = RotatingClientLayer::new(DAY)
        .rotate_on_change(Probe::dns("127.0.0.1:8080", period).timeout(Duration::from_secs(5)))
        .layer(Builds::default().factory());
    let refused = RotatingClientLayer::new(DAY)
        .rotate_on_change(Probe::dns("127.0.0.1", period).timeout(Duration::from_secs(5)))
        .layer(Builds::default().factory());
    for _ in 0..1_000 {
        if refused.stats().failed_probes >= 3 {
            break;
        }
        tokio::time::sleep(period).await;
    }
    assert!(
        refused.stats().failed_probes >= 3,
        "the probe runs: a lookup without a port fails, and is counted"
    );
    assert_eq!(
        refused.stats().rotations,
        0,
        "a failed lookup rotates nothing"
    );
    let stats = stable.stats();
    assert_eq!(stats.failed_probes, 0, "the lookup succeeds");
    assert_eq!(stats.rotations, 0, "the same answer every time");
}

#[tokio::test(start_paused = true)]
async fn a_change_seen_while_a_client_builds_is_not_lost() {
    // `rotate()` builds for three periods; the probe sees a change during
    // the build. The client `rotate()` installs may predate the change,
    // so another rotation follows, with a client built after it.
    const BUILD: Duration = Duration::from_secs(30);
    let builds = Builds::default();
    let factory = builds.factory();
    let script = ScriptedProbe::new(1);
    let client = RotatingClientLayer::new(2 * DAY)
        .rotate_on_change(script.probe(PERIOD).confirmations(1))
        .layer_async(move || {
            let client = factory();
            async move {
                tokio::time::sleep(BUILD).await;
                Ok::<_, std::io::Error>(client)
            }
        })
        .await
        .expect("first build");
    until_probes(&script, 1, 1).await;
    let rotation = tokio::spawn({
        let client = client.clone();
        async move { client.rotate().await }
    });
    settle().await;
    assert_eq!(builds.count(), 2, "rotate() is building");
    script.set(Answer::Value(2));
    until_probes(&script, script.probes() + 1, 2).await;
    assert_eq!(builds.count(), 2, "still building");

    let id = rotation.await.expect("no panic").expect("rotate builds");
    assert_eq!(id.0, 2);
    tokio::time::sleep(BUILD + PERIOD).await;
    assert_eq!(builds.count(), 3, "a client built after the change");
    assert_eq!(served(&client).await, 3, "and it serves");

    tokio::time::sleep(DAY).await;
    assert_eq!(
        client.stats().rotations,
        2,
        "rotate() and the change: nothing more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_period_of_duration_max_probes_once_and_never_panics() {
    let builds = Builds::default();
    let script = ScriptedProbe::new(1);
    let client = probed(&builds, script.probe(Duration::MAX));
    tokio::time::sleep(DAY).await;
    assert_eq!(script.probes(), 1, "the first probe, then none");
    assert_eq!(served(&client).await, 1);
}
