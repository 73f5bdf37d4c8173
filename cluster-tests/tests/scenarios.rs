//! The cluster on PostgreSQL, tested with real runner processes: each test
//! starts `flotilla-test-node` processes on loopback against a fresh schema,
//! sends traffic from an in-process client (and from the runners), signals
//! the processes, and counts what the handlers recorded in the audit table
//! (written inside each completion transaction, so it holds exactly the
//! committed effects).
//!
//! The tests run one at a time (`exclusive`). Failover times are printed
//! with `eprintln!` (`cargo test -- --nocapture` shows them).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::de::IgnoredAny;

use flotilla::prelude::*;
use flotilla::transport::{ClusterSecret, Request, TcpTransport, TransportConfig, TransportError};
use flotilla_cluster_tests::{
    ClusterSettings, Probe, Stranger, TEST_PREFIX, TEST_SECRET, Work, exclusive, within,
};
use support::*;
use tokio::io::AsyncWriteExt;

const TEST_LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_from_anywhere_run_on_the_shard_owner_and_persisted_calls_record_once() {
    let _one_at_a_time = exclusive().await;
    let cluster = start(ClusterSettings::with_runners(3)).await;
    within(TEST_LIMIT, "scenario 1", async {
        let ids = cluster.runner_ids();
        let owners = cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let shards = cluster.db().shards(TEST_PREFIX).await.unwrap();
        let client = cluster.client().await.unwrap();

        let mut seen_runners = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for n in 0..48 {
            let entity = format!("e1-{n}");
            let shard = flotilla::sharding::shard_index(&entity, cluster.settings().shards);
            let probe = client.client::<Probe>(&entity);

            let here = probe.whereami().await.unwrap();
            assert_eq!(here.shard_index, shard, "{entity}: the shard hash");
            assert_eq!(
                here.runner_id, owners[&shard],
                "{entity} ran on {} but shard {shard} is owned by {}",
                here.runner_id, owners[&shard]
            );
            assert_eq!(
                here.epoch,
                Some(shards[&shard].epoch),
                "{entity}: the epoch"
            );
            seen_runners.insert(here.runner_id.clone());

            let key = format!("k1-{n}");
            let receipt = probe.record(key.clone(), Work::QUICK).await.unwrap();
            assert_eq!(
                receipt.placement, here,
                "{entity}: persisted call ran elsewhere"
            );
            keys.insert(key);
        }
        assert_eq!(
            seen_runners.len(),
            3,
            "calls reached every runner: {seen_runners:?}"
        );

        assert_exactly_once(&cluster.audit_counts().await.unwrap(), &keys);
        for row in cluster.audit_rows().await.unwrap() {
            let shard = row.shard_index as u32;
            assert_eq!(row.runner_id, owners[&shard], "audit row {row:?}");
            assert_eq!(row.epoch, Some(shards[&shard].epoch), "audit row {row:?}");
        }
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_runner_owning_half_the_shards_loses_no_persisted_message() {
    const MESSAGES: usize = 10_000;
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 2", async {
        let ids = cluster.runner_ids();
        let owners = cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let (victim, survivor) = (ids[0].clone(), ids[1].clone());
        let victim_shards = shards_of(&owners, &victim).len();
        let client = cluster.client().await.unwrap();

        let messages: Vec<(String, String)> = (0..MESSAGES)
            .map(|n| (format!("e2-{}", n % 256), format!("k2-{n}")))
            .collect();
        let keys: BTreeSet<String> = messages.iter().map(|(_, k)| k.clone()).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let sending = tokio::spawn(send_all(
            client.clone(),
            messages,
            64,
            Work::ANNOUNCED,
            done.clone(),
            Duration::from_secs(90),
        ));
        wait_until(
            "2,500 replies before the kill",
            Duration::from_secs(60),
            || done.load(Ordering::Relaxed) >= 2_500,
        )
        .await;
        let killed_at = Instant::now();
        let replied_before_kill = done.load(Ordering::Relaxed);
        cluster.runner_mut(0).kill().await.unwrap();
        let failover = cluster
            .wait_owned_by(&[&survivor], killed_at, Duration::from_secs(15))
            .await
            .unwrap();
        eprintln!(
            "scenario 2: SIGKILL of {victim} (owned {victim_shards} of {} shards) after \
             {replied_before_kill} replies; all shards owned by {survivor} {failover:?} after \
             the kill",
            cluster.settings().shards
        );
        let sent = sending.await.unwrap();
        eprintln!(
            "scenario 2: {} replies in {:?}; calls retried after an error: {:?}",
            sent.receipts.len(),
            started.elapsed(),
            sent.retries
        );
        sent.assert_all_replied_first_time(MESSAGES);
        assert_exactly_once(&cluster.audit_counts().await.unwrap(), &keys);
        assert_eq!(cluster.db().unprocessed(TEST_PREFIX).await.unwrap(), 0);
        let rerun = handler_runs(&cluster, "k2-")
            .values()
            .filter(|n| **n > 1)
            .count();
        eprintln!("scenario 2: handlers run again after the kill: {rerun}");
        let repeated = runs_repeated_under_one_owner(&cluster, "k2-");
        assert!(
            repeated.is_empty(),
            "{} messages ran more than once on one runner under one epoch, e.g. {:?}",
            repeated.len(),
            repeated.first()
        );
        assert!(
            failover < Duration::from_secs(5),
            "the survivor owned every shard only {failover:?} after the kill"
        );
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_lock_connection_fences_the_slow_handler_and_the_message_runs_once() {
    let _one_at_a_time = exclusive().await;
    let cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 3", async {
        let ids = cluster.runner_ids();
        let owners = cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let a = cluster.runner(0);
        let entity = entities_on(
            &shards_of(&owners, a.id()),
            cluster.settings().shards,
            "e3",
            1,
        )
        .remove(0);
        let shard = flotilla::sharding::shard_index(&entity, cluster.settings().shards);
        let old_epoch = cluster.db().shards(TEST_PREFIX).await.unwrap()[&shard].epoch;
        let client = cluster.client().await.unwrap();

        let skip = a.stdout_len();
        let probe = client.client::<Probe>(&entity);
        let call = tokio::spawn(async move { probe.record("k3".into(), Work::slow(1_500)).await });
        let started = a
            .wait_line(skip, Duration::from_secs(10), |l| {
                l.starts_with("STARTED k3 ")
            })
            .await
            .unwrap();
        assert_eq!(
            started.split_whitespace().nth(3),
            Some(old_epoch.to_string().as_str()),
            "k3 starts on A under its epoch: {started}"
        );

        let lock_pid = cluster
            .db()
            .lock_backend(a.id())
            .await
            .unwrap()
            .expect("runner A's lock connection in pg_stat_activity");
        let terminated_at = cluster.db().now_micros().await.unwrap();
        assert!(cluster.db().terminate_backend(lock_pid).await.unwrap());

        let receipt = call.await.unwrap().expect("the caller gets its reply");
        let rows: Vec<_> = cluster
            .audit_rows()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.msg_key == "k3")
            .collect();
        eprintln!(
            "scenario 3: lock connection of {} (pid {lock_pid}) terminated while k3 ran under \
             epoch {old_epoch}; recorded by {} under epoch {:?}",
            a.id(),
            receipt.placement.runner_id,
            receipt.placement.epoch
        );
        assert_eq!(rows.len(), 1, "exactly one audit row: {rows:?}");
        let fence_after = cluster.settings().fence_after.as_micros() as i64;
        assert!(
            !rows.iter().any(|r| r.runner_id == a.id()
                && r.epoch == Some(old_epoch)
                && r.started_at > terminated_at + fence_after),
            "A ran and committed under its lost epoch after it should have known: {rows:?}"
        );
        // The handler was still sleeping when the lock went: its completion
        // under the old epoch must not have committed.
        assert!(
            rows[0].epoch > Some(old_epoch),
            "the row was committed under the epoch A lost: {rows:?}"
        );
        assert_eq!(
            receipt.placement.epoch, rows[0].epoch,
            "the reply is the recorded one"
        );

        // A notices, registers again, and takes its share back.
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_frozen_past_its_lock_timeout_commits_nothing_for_the_shards_it_lost() {
    const SLOW: usize = 8;
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 4", async {
        let ids = cluster.runner_ids();
        let owners = cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let (a, b) = (ids[0].clone(), ids[1].clone());
        let shards = cluster.settings().shards;
        let entities = entities_on(&shards_of(&owners, &a), shards, "e4", SLOW);
        let epochs = cluster.db().shards(TEST_PREFIX).await.unwrap();
        let client = cluster.client().await.unwrap();

        let skip = cluster.runner(0).stdout_len();
        let calls: Vec<_> = entities
            .iter()
            .enumerate()
            .map(|(n, entity)| {
                let probe = client.client::<Probe>(entity);
                tokio::spawn(
                    async move { probe.record(format!("k4-{n}"), Work::slow(1_500)).await },
                )
            })
            .collect();
        for n in 0..SLOW {
            let prefix = format!("STARTED k4-{n} ");
            cluster
                .runner(0)
                .wait_line(skip, Duration::from_secs(10), |l| l.starts_with(&prefix))
                .await
                .unwrap();
        }

        let stopped_at = cluster.db().now_micros().await.unwrap();
        let stopped = Instant::now();
        cluster.runner(0).stop().await.unwrap();
        let failover = cluster
            .wait_owned_by(&[&b], stopped, Duration::from_secs(15))
            .await
            .unwrap();
        eprintln!(
            "scenario 4: {a} stopped (SIGSTOP) with {SLOW} slow handlers running; {b} owned \
             every shard {failover:?} later (lock timeout {:?})",
            cluster.settings().lock_timeout
        );
        let frozen_for = Duration::from_secs(4).saturating_sub(stopped.elapsed());
        tokio::time::sleep(frozen_for).await;
        cluster.runner(0).cont().await.unwrap();

        for (n, call) in calls.into_iter().enumerate() {
            let receipt = call
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("k4-{n}: {e}"));
            assert_eq!(receipt.key, format!("k4-{n}"));
        }
        // Whatever A had in hand when it woke up is done by now.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let keys: BTreeSet<String> = (0..SLOW).map(|n| format!("k4-{n}")).collect();
        assert_exactly_once(&cluster.audit_counts().await.unwrap(), &keys);
        let stale: Vec<_> = cluster
            .audit_rows()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| {
                r.runner_id == a
                    && r.epoch == Some(epochs[&(r.shard_index as u32)].epoch)
                    && r.inserted_at > stopped_at
            })
            .collect();
        assert!(
            stale.is_empty(),
            "A committed under epochs it lost: {stale:?}"
        );
        // A was frozen mid-handler (1.5 s handlers, frozen right after they
        // started): every message was recorded by a later owner.
        let old_epoch_rows: Vec<_> = cluster
            .audit_rows()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.epoch <= Some(epochs[&(r.shard_index as u32)].epoch))
            .collect();
        assert!(
            old_epoch_rows.is_empty(),
            "recorded under the epoch A held when it froze: {old_epoch_rows:?}"
        );

        let log = std::fs::read_to_string(cluster.runner(0).log_path()).unwrap_or_default();
        let fenced: Vec<&str> = log.lines().filter(|l| l.contains("fenced")).collect();
        eprintln!(
            "scenario 4: {} lines of {a}'s log mention fencing after SIGCONT, e.g. {:?}",
            fenced.len(),
            fenced.first()
        );
        assert!(cluster.runner_mut(0).is_alive(), "A survives being frozen");
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_redelivers_nothing_and_hands_the_shards_over_at_once() {
    const MESSAGES: usize = 3_000;
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 5", async {
        let ids = cluster.runner_ids();
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let (a, b) = (ids[0].clone(), ids[1].clone());
        let client = cluster.client().await.unwrap();

        let messages: Vec<(String, String)> = (0..MESSAGES)
            .map(|n| (format!("e5-{}", n % 128), format!("k5-{n}")))
            .collect();
        let keys: BTreeSet<String> = messages.iter().map(|(_, k)| k.clone()).collect();
        let done = Arc::new(AtomicUsize::new(0));
        let sending = tokio::spawn(send_all(
            client.clone(),
            messages,
            32,
            Work::ANNOUNCED,
            done.clone(),
            Duration::from_secs(60),
        ));
        wait_until(
            "1,000 replies before the SIGTERM",
            Duration::from_secs(60),
            || done.load(Ordering::Relaxed) >= 1_000,
        )
        .await;
        let termed = Instant::now();
        cluster.runner(0).send_term().await.unwrap();
        let handover = cluster
            .wait_owned_by(&[&b], termed, Duration::from_secs(15))
            .await
            .unwrap();
        let status = cluster
            .runner_mut(0)
            .wait_exit(Duration::from_secs(20))
            .await
            .unwrap();
        eprintln!(
            "scenario 5: SIGTERM to {a} under load; every shard owned by {b} {handover:?} \
             later; {a} exited with {status} after {:?}",
            termed.elapsed()
        );
        assert!(status.success(), "a graceful stop exits 0: {status}");
        let stopped = cluster
            .runner(0)
            .wait_line(0, Duration::from_secs(1), |l| l.starts_with("STOPPED "))
            .await
            .unwrap();
        assert_eq!(
            stopped,
            "STOPPED finished=true",
            "the handlers under way finished within the shutdown timeout ({:?})",
            cluster.settings().shutdown_timeout
        );

        let sent = sending.await.unwrap();
        eprintln!(
            "scenario 5: calls retried after an error: {:?}",
            sent.retries
        );
        sent.assert_all_replied_first_time(MESSAGES);
        assert_exactly_once(&cluster.audit_counts().await.unwrap(), &keys);
        let runs = handler_runs(&cluster, "k5-");
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{} handlers ran more than once: {twice:?}; e.g. {:?}",
            twice.len(),
            twice.first().map(|(k, _)| started_lines(&cluster, k))
        );
        assert_eq!(runs.len(), MESSAGES, "every message's handler ran");
        assert!(
            handover < Duration::from_secs(2),
            "the shards of the stopping runner were owned by {b} only {handover:?} after SIGTERM"
        );
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_full_stop_of_every_runner_pending_messages_complete_exactly_once() {
    const SCHEDULED: usize = 100;
    const DURING_OUTAGE: usize = 100;
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 6", async {
        let ids = cluster.runner_ids();
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let client = cluster.client().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // A deadline of 15 s per call: everything completes within a few
        // seconds of the restart, and a lost reply fails the test sooner.
        let spawn_call = |entity: String, key: String, at: Option<SystemTime>| {
            let mut probe = client
                .client::<Probe>(&entity)
                .with_timeout(Duration::from_secs(15));
            if let Some(at) = at {
                probe = probe.deliver_at(at);
            }
            tokio::spawn(async move {
                let (result, retried) = record_until_ok(&probe, &key, Work::QUICK, deadline).await;
                (key, result, retried)
            })
        };

        // Stored while the runners run, due in 5 s: still pending at the
        // kill (the margin covers a slow machine).
        let due = SystemTime::now() + Duration::from_secs(5);
        let mut calls: Vec<_> = (0..SCHEDULED)
            .map(|n| spawn_call(format!("e6-{}", n % 40), format!("k6-s-{n}"), Some(due)))
            .collect();
        cluster
            .db()
            .wait_for(
                "the scheduled messages stored",
                Duration::from_secs(10),
                || async {
                    let n = cluster.db().unprocessed(TEST_PREFIX).await?;
                    Ok(if n >= SCHEDULED as i64 {
                        Ok(())
                    } else {
                        Err(format!("{n} stored"))
                    })
                },
            )
            .await
            .unwrap();
        for runner in cluster.runners_mut() {
            runner.kill().await.unwrap();
        }
        assert!(
            cluster.audit_rows().await.unwrap().is_empty(),
            "nothing was handled before the kill"
        );

        // Stored while no runner is up.
        calls.extend(
            (0..DURING_OUTAGE)
                .map(|n| spawn_call(format!("e6-{}", n % 40), format!("k6-o-{n}"), None)),
        );
        let total = (SCHEDULED + DURING_OUTAGE) as i64;
        cluster
            .db()
            .wait_for(
                "the messages sent during the outage stored",
                Duration::from_secs(10),
                || async {
                    let n = cluster.db().unprocessed(TEST_PREFIX).await?;
                    Ok(if n >= total {
                        Ok(())
                    } else {
                        Err(format!("{n} stored"))
                    })
                },
            )
            .await
            .unwrap();

        let restarted = Instant::now();
        for runner in cluster.runners_mut() {
            runner.restart().await.unwrap();
        }
        let mut sent = Sent::default();
        for call in calls {
            let (key, result, retried) = call.await.unwrap();
            sent.add(key, result, retried);
        }
        eprintln!(
            "scenario 6: {total} pending messages completed {:?} after the restart began; \
             calls retried after an error: {:?}",
            restarted.elapsed(),
            sent.retries
        );
        let keys: BTreeSet<String> = (0..SCHEDULED)
            .map(|n| format!("k6-s-{n}"))
            .chain((0..DURING_OUTAGE).map(|n| format!("k6-o-{n}")))
            .collect();
        assert_exactly_once(&cluster.audit_counts().await.unwrap(), &keys);
        assert_eq!(cluster.db().unprocessed(TEST_PREFIX).await.unwrap(), 0);
        sent.assert_all_replied_first_time(keys.len());
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sends_of_one_key_from_three_runners_run_one_handler() {
    const PER_RUNNER: usize = 330;
    const FROM_CLIENT: usize = 10;
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(3)).await;
    within(TEST_LIMIT, "scenario 7", async {
        let ids = cluster.runner_ids();
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let client = cluster.client().await.unwrap();

        let skips: Vec<usize> = cluster.runners().iter().map(|r| r.stdout_len()).collect();
        for runner in cluster.runners_mut() {
            runner
                .command(&format!("BURST e7-target k7 {PER_RUNNER}"))
                .await
                .unwrap();
        }
        let from_client: Vec<_> = (0..FROM_CLIENT)
            .map(|_| {
                let probe = client.client::<Probe>("e7-target");
                tokio::spawn(async move { probe.record("k7".into(), Work::ANNOUNCED).await })
            })
            .collect();

        let mut replies = BTreeSet::new();
        for (runner, skip) in cluster.runners().iter().zip(skips) {
            let done = runner
                .wait_line(skip, Duration::from_secs(60), |l| {
                    l.starts_with("BURST-DONE ")
                })
                .await
                .unwrap();
            let (counts, first) = done.split_once(" first=").expect("BURST-DONE format");
            assert_eq!(
                counts,
                format!("BURST-DONE ok={PER_RUNNER} err=0 distinct=1"),
                "{}: {done}",
                runner.id()
            );
            replies.insert(first.to_owned());
        }
        for call in from_client {
            replies.insert(call.await.unwrap().unwrap().to_string());
        }
        assert_eq!(
            replies.len(),
            1,
            "every caller gets the same reply: {replies:?}"
        );
        let runs = handler_runs(&cluster, "k7");
        assert_eq!(runs.get("k7"), Some(&1), "one handler run: {runs:?}");
        assert_exactly_once(
            &cluster.audit_counts().await.unwrap(),
            &BTreeSet::from(["k7".to_owned()]),
        );
        eprintln!(
            "scenario 7: {} sends of k7 ({PER_RUNNER} from each of 3 runners, {FROM_CLIENT} \
             from the client): one run, one reply: {}",
            3 * PER_RUNNER + FROM_CLIENT,
            replies.first().map_or("", String::as_str)
        );
        client.shutdown().await;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_typed_error_or_a_closed_connection_and_the_runner_serves_on() {
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(2)).await;
    within(TEST_LIMIT, "scenario 8", async {
        let ids = cluster.runner_ids();
        cluster.wait_balanced(&ids, SETTLE).await.unwrap();
        let client = cluster
            .client_builder()
            .unwrap()
            .register::<Probe>()
            .register::<Stranger>()
            .start()
            .await
            .unwrap();
        let target = cluster.runner(0).id().to_owned();
        let registered = cluster.db().runner_addresses(TEST_PREFIX).await.unwrap();
        let addr: SocketAddr = registered[&target].parse().expect("a socket address");
        assert_eq!(
            Some(addr),
            cluster.runner(0).address(),
            "READY line and registry agree"
        );

        let mut rounds = 0;
        still_serving(&mut cluster, &client, &mut rounds, "nothing").await;

        // A peer with another secret is refused at the handshake.
        let stranger = TcpTransport::new(
            ClusterSecret::new("not the cluster secret at all").unwrap(),
            TransportConfig::default(),
        );
        let refused = stranger
            .call(
                addr,
                Request::new(b"hello".to_vec()),
                Duration::from_secs(5),
            )
            .await;
        assert!(
            matches!(refused, Err(TransportError::Handshake { .. })),
            "wrong secret: {refused:?}"
        );
        still_serving(&mut cluster, &client, &mut rounds, "a wrong secret").await;

        // Garbage instead of the client's handshake message.
        let mut raw = raw_transport::connect(addr).await;
        raw_transport::write_frame(&mut raw, &[0xc1, 0xc1, 0xc1, 0xc1])
            .await
            .unwrap();
        assert!(raw_transport::closed_within(&mut raw, Duration::from_secs(5)).await);
        still_serving(
            &mut cluster,
            &client,
            &mut rounds,
            "a malformed handshake frame",
        )
        .await;

        // A frame header announcing 4 GiB, before the handshake.
        let mut raw = raw_transport::connect(addr).await;
        raw.write_all(&[0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert!(raw_transport::closed_within(&mut raw, Duration::from_secs(5)).await);
        still_serving(
            &mut cluster,
            &client,
            &mut rounds,
            "an oversized handshake frame",
        )
        .await;

        // After a valid handshake: a frame that is not a frame...
        let mut raw = raw_transport::authenticated(addr, TEST_SECRET.as_bytes()).await;
        raw_transport::write_frame(&mut raw, &[0xc1, 0x00, 0xff, 0x13])
            .await
            .unwrap();
        assert!(raw_transport::closed_within(&mut raw, Duration::from_secs(5)).await);
        still_serving(&mut cluster, &client, &mut rounds, "a malformed frame").await;

        // ...and a frame larger than any limit.
        let mut raw = raw_transport::authenticated(addr, TEST_SECRET.as_bytes()).await;
        raw.write_all(&[0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 0])
            .await
            .unwrap();
        assert!(raw_transport::closed_within(&mut raw, Duration::from_secs(5)).await);
        still_serving(&mut cluster, &client, &mut rounds, "an oversized frame").await;

        // An entity type the runners do not serve: a typed error, at once.
        let unknown = tokio::time::timeout(
            Duration::from_secs(10),
            client.client::<Stranger>("s-1").hello(),
        )
        .await
        .expect("an answer, not a hang");
        match unknown {
            Err(ClusterError::UnknownEntityType(name)) => assert_eq!(name, "Stranger"),
            other => panic!("unknown entity type: {other:?}"),
        }
        still_serving(&mut cluster, &client, &mut rounds, "an unknown entity type").await;

        // Garbage request bodies from an authenticated peer: a typed error
        // back, either from the transport or as the runner protocol's
        // `Failed` reply (a MessagePack map with the one key `Failed`).
        let insider = TcpTransport::new(
            ClusterSecret::new(TEST_SECRET).unwrap(),
            TransportConfig::default(),
        );
        for body in [
            vec![0xc1, 0xff, 0x00, 0x13],
            rmp_serde::to_vec_named("not a request").unwrap(),
            Vec::new(),
        ] {
            let answer = insider
                .call(addr, Request::new(body.clone()), Duration::from_secs(5))
                .await;
            let typed = match &answer {
                Err(TransportError::Remote(_)) => true,
                Ok(reply) => rmp_serde::from_slice::<BTreeMap<String, IgnoredAny>>(reply)
                    .is_ok_and(|map| map.keys().eq(["Failed"])),
                Err(_) => false,
            };
            assert!(typed, "body {body:?}: {answer:?}");
        }
        still_serving(&mut cluster, &client, &mut rounds, "garbage request bodies").await;

        let normal_keys = 16 * rounds;
        assert_eq!(
            cluster.audit_rows().await.unwrap().len(),
            normal_keys,
            "bad input recorded nothing"
        );
        client.shutdown().await;
    })
    .await
    .unwrap();
}

/// Normal calls to entities on every shard (so both runners answer), and the
/// attacked runner is still alive.
async fn still_serving(
    cluster: &mut flotilla_cluster_tests::TestCluster,
    client: &Cluster,
    rounds: &mut usize,
    after: &str,
) {
    *rounds += 1;
    for n in 0..16 {
        let probe = client.client::<Probe>(format!("e8-{n}"));
        probe
            .whereami()
            .await
            .unwrap_or_else(|e| panic!("after {after}: {e}"));
        probe
            .record(format!("k8-{rounds}-{n}"), Work::QUICK)
            .await
            .unwrap_or_else(|e| panic!("after {after}: {e}"));
    }
    assert!(
        cluster.runner_mut(0).is_alive(),
        "the runner died after {after}"
    );
}
