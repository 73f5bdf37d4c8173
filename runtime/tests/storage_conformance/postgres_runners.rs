//! `PostgresRunners`: the runner registry, shard locks, epochs, fencing of
//! stale completions and signals, on a real PostgreSQL server.

use std::time::Duration;

use flotilla::StorageError;
use flotilla::storage::{
    CompletionOutcome, Epoch, Fence, MessageStorage, PostgresRunners, PostgresStorage, RunnerInfo,
    RunnerStorage, Signal, WriteBatch,
};
use flotilla::{RunnerId, ShardId};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::mpsc;

use super::fixtures::*;
use super::postgres_db::TestSchema;

const PREFIX: &str = "flotilla_";
const LOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on things that happen "at once", generous for a loaded machine.
const PATIENCE: Duration = Duration::from_secs(10);

/// Runner `name` of this test's schema (ids are unique across the tests
/// sharing the server, so each test finds its own lock sessions).
fn runner(schema: &TestSchema, name: &str, port: u16) -> RunnerInfo {
    RunnerInfo {
        id: RunnerId::new(format!("{}-{name}", schema.name())),
        address: format!("127.0.0.1:{port}").parse().unwrap(),
        weight: 1,
        groups: Vec::new(),
    }
}

fn shards(indexes: &[u32]) -> Vec<ShardId> {
    indexes.iter().map(|i| ShardId::default_group(*i)).collect()
}

fn ids(live: &[RunnerInfo]) -> Vec<String> {
    live.iter().map(|r| r.id.to_string()).collect()
}

/// A registered runner on its own storage value (its own pool), as in its
/// own process.
async fn registered(
    schema: &TestSchema,
    info: &RunnerInfo,
    lock_timeout: Duration,
) -> (PostgresStorage, PostgresRunners) {
    let storage = schema.storage(PREFIX).await;
    let runners = storage.runners(lock_timeout);
    runners.register(info).await.expect("register");
    (storage, runners)
}

/// The backend pid of `runner`'s lock connection.
async fn lock_session_pid(app: &PgPool, runner: &RunnerInfo) -> i32 {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'flotilla-lock/' || $1",
    )
    .bind(runner.id.as_str())
    .fetch_one(app)
    .await
    .expect("exactly one lock session")
}

async fn terminate(app: &PgPool, pid: i32) {
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(app)
        .await
        .unwrap();
    assert!(done);
}

/// Calls `acquire` until it returns something, within [`PATIENCE`].
async fn acquire_eventually(
    runners: &PostgresRunners,
    wanted: &[ShardId],
) -> Vec<(ShardId, Epoch)> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let taken = runners.acquire(wanted).await.expect("acquire");
        if !taken.is_empty() || tokio::time::Instant::now() > deadline {
            return taken;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn live_eventually(runners: &PostgresRunners, expected: &[String]) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let live = ids(&runners.live_runners().await.expect("live runners"));
        if live == expected || tokio::time::Instant::now() > deadline {
            return live;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn owner_and_epoch(app: &PgPool, shard: &ShardId) -> (Option<String>, i64) {
    sqlx::query_as(
        "SELECT owner, epoch FROM flotilla_shards WHERE shard_group = $1 AND shard_index = $2",
    )
    .bind(shard.group())
    .bind(i64::from(shard.index()))
    .fetch_one(app)
    .await
    .expect("shard row")
}

async fn next_signal(rx: &mut mpsc::Receiver<Signal>) -> Option<Signal> {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a signal within the patience")
}

#[tokio::test]
async fn registered_runners_are_live_in_id_order_until_they_unregister() {
    let schema = TestSchema::create().await;
    let app = schema.pool(1).await;
    let b = runner(&schema, "b", 7002);
    let mut a = runner(&schema, "a", 7001);
    a.weight = 3;
    a.groups = vec!["payments".to_owned(), "default".to_owned()];
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;

    assert_eq!(rb.live_runners().await.unwrap(), vec![a.clone(), b.clone()]);
    let debug = format!("{ra:?}");
    assert!(debug.contains(a.id.as_str()), "{debug}");
    assert!(
        !debug.contains("postgres://"),
        "no connection string: {debug}"
    );

    // Registering again (new address) replaces the lock connection and the row.
    a.address = "127.0.0.1:7101".parse().unwrap();
    ra.register(&a).await.unwrap();
    assert_eq!(rb.live_runners().await.unwrap(), vec![a.clone(), b.clone()]);
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flotilla-lock/' || $1",
    )
    .bind(a.id.as_str())
    .fetch_one(&app)
    .await
    .unwrap();
    assert_eq!(sessions, 1, "the earlier lock connection was closed");

    ra.unregister().await.unwrap();
    assert_eq!(rb.live_runners().await.unwrap(), vec![b.clone()]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM flotilla_runners")
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(rows, 1, "the registry row of a is gone");
    // Unregistering twice is harmless; a can come back.
    ra.unregister().await.unwrap();
    ra.register(&a).await.unwrap();
    assert_eq!(ids(&rb.live_runners().await.unwrap()).len(), 2);

    for storage in [sa, sb] {
        storage.close().await;
    }
    app.close().await;
}

#[tokio::test]
async fn one_runner_holds_a_shard_and_every_acquisition_bumps_its_epoch() {
    let schema = TestSchema::create().await;
    let app = schema.pool(1).await;
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;

    let taken = ra.acquire(&shards(&[0, 1])).await.unwrap();
    assert_eq!(
        taken,
        vec![
            (ShardId::default_group(0), Epoch(1)),
            (ShardId::default_group(1), Epoch(1))
        ]
    );
    // Held shards come back with their epoch and are not locked again, even
    // when asked twice in one call.
    let again = ra.acquire(&shards(&[1, 1, 0])).await.unwrap();
    assert_eq!(
        again,
        vec![
            (ShardId::default_group(1), Epoch(1)),
            (ShardId::default_group(0), Epoch(1))
        ]
    );
    assert_eq!(
        rb.acquire(&shards(&[0, 1, 2])).await.unwrap(),
        vec![(ShardId::default_group(2), Epoch(1))],
        "b gets only the shard a does not hold"
    );
    assert_eq!(
        owner_and_epoch(&app, &ShardId::default_group(0)).await,
        (Some(a.id.to_string()), 1)
    );
    // Trying held shards again and again draws no lock keys.
    let keys_drawn = || async {
        sqlx::query_scalar::<_, i64>("SELECT last_value FROM flotilla_lock_keys")
            .fetch_one(&app)
            .await
            .unwrap()
    };
    let before = keys_drawn().await;
    for _ in 0..3 {
        assert_eq!(rb.acquire(&shards(&[0, 1])).await.unwrap(), vec![]);
    }
    assert_eq!(keys_drawn().await, before);

    // One release frees the shard at once (it was locked once, however
    // often it was acquired), and the next acquisition bumps the epoch.
    ra.release(&shards(&[1, 7])).await.unwrap();
    assert_eq!(
        owner_and_epoch(&app, &ShardId::default_group(1)).await,
        (None, 1)
    );
    assert_eq!(
        rb.acquire(&shards(&[0, 1])).await.unwrap(),
        vec![(ShardId::default_group(1), Epoch(2))]
    );
    assert_eq!(
        owner_and_epoch(&app, &ShardId::default_group(1)).await,
        (Some(b.id.to_string()), 2)
    );
    rb.release(&shards(&[1])).await.unwrap();
    assert_eq!(
        ra.acquire(&shards(&[1])).await.unwrap(),
        vec![(ShardId::default_group(1), Epoch(3))]
    );

    // Unregistering frees every shard of the runner.
    ra.unregister().await.unwrap();
    assert_eq!(
        rb.acquire(&shards(&[0, 1])).await.unwrap(),
        vec![
            (ShardId::default_group(0), Epoch(2)),
            (ShardId::default_group(1), Epoch(4))
        ]
    );
    // Calls that need the lock connection fail once it is gone.
    assert!(ra.acquire(&shards(&[5])).await.is_err());
    assert!(ra.confirm().await.is_err());

    for storage in [sa, sb] {
        storage.close().await;
    }
    app.close().await;
}

#[tokio::test]
async fn a_second_live_registration_of_one_id_is_refused() {
    let schema = TestSchema::create().await;
    let a = runner(&schema, "a", 7001);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let storage = schema.storage(PREFIX).await;
    let twin = storage.runners(LOCK_TIMEOUT);
    let mut impostor = a.clone();
    impostor.address = "127.0.0.1:9999".parse().unwrap();

    let error = twin.register(&impostor).await.unwrap_err();
    assert!(
        matches!(&error, StorageError::RunnerIdInUse(id) if id == a.id.as_str()),
        "{error:?}"
    );
    // The live runner's row is untouched and it keeps working.
    assert_eq!(twin.live_runners().await.unwrap(), vec![a.clone()]);
    ra.confirm().await.unwrap();
    assert!(
        twin.confirm().await.is_err(),
        "the refused value holds nothing"
    );

    // Once the first leaves, the id is free.
    ra.unregister().await.unwrap();
    twin.register(&impostor).await.unwrap();
    assert_eq!(ra.live_runners().await.unwrap(), vec![impostor]);

    sa.close().await;
    storage.close().await;
}

#[tokio::test]
async fn a_terminated_lock_session_fences_the_old_owner() {
    let schema = TestSchema::create().await;
    let app = schema.pool(1).await;
    sqlx::query(PG_AUDIT_TABLE).execute(&app).await.unwrap();
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;

    let msg = message(1, "acct-1");
    let shard = msg.address.shard.clone();
    let other = ShardId::default_group((shard.index() + 1) % 300);
    let stale = ra.acquire(&[shard.clone(), other.clone()]).await.unwrap();
    assert_eq!(stale.len(), 2);
    let stale = stale[0].1;
    save(&sa, vec![msg.clone()]).await;

    terminate(&app, lock_session_pid(&app, &a).await).await;
    assert!(
        ra.confirm().await.is_err(),
        "confirm notices the lost session"
    );
    assert!(
        ra.acquire(std::slice::from_ref(&shard)).await.is_err(),
        "after a failed confirm the value holds nothing"
    );
    assert_eq!(
        live_eventually(&rb, &[b.id.to_string()]).await,
        vec![b.id.to_string()]
    );
    let fresh = rb.acquire(std::slice::from_ref(&shard)).await.unwrap();
    assert_eq!(fresh, vec![(shard.clone(), Epoch(stale.0 + 1))]);
    let fresh = fresh[0].1;

    // The old owner's completion, made under the stale epoch: nothing is written.
    let mut late = completion(1, b"late");
    late.state = Some(state("acct-1", b"stale state"));
    late.effects = vec![pg_audit(1, "stale effect")];
    late.fence = Some(Fence {
        shard: shard.clone(),
        epoch: stale,
    });
    let outcome = complete(&sa, vec![late]).await;
    assert_eq!(
        outcome.completions,
        vec![CompletionOutcome::Fenced {
            stale,
            current: Some(fresh)
        }]
    );
    assert_eq!(unprocessed_ids(&sb, i64::MAX).await, vec![1]);
    assert_eq!(sb.reply(msg.id).await.unwrap(), None);
    assert_eq!(sb.load_state(ACCOUNT, "acct-1").await.unwrap(), None);
    let audits: i64 = sqlx::query_scalar("SELECT count(*) FROM app_audit")
        .fetch_one(&app)
        .await
        .unwrap();
    assert_eq!(audits, 0, "no effect of the fenced completion");

    // The new owner's completion commits.
    let mut done = completion(1, b"done");
    done.state = Some(state("acct-1", b"new state"));
    done.effects = vec![pg_audit(1, "new effect")];
    done.fence = Some(Fence {
        shard: shard.clone(),
        epoch: fresh,
    });
    assert_eq!(
        complete(&sb, vec![done]).await.completions,
        vec![CompletionOutcome::Recorded]
    );
    assert_eq!(
        sb.load_state(ACCOUNT, "acct-1").await.unwrap(),
        Some(b"new state".to_vec())
    );

    // The old runner registers again and works.
    ra.register(&a).await.unwrap();
    ra.confirm().await.unwrap();
    assert_eq!(
        ra.acquire(std::slice::from_ref(&shard)).await.unwrap(),
        vec![]
    );
    assert_eq!(
        ra.acquire(std::slice::from_ref(&other))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        ids(&rb.live_runners().await.unwrap()),
        vec![a.id.to_string(), b.id.to_string()]
    );

    for storage in [sa, sb] {
        storage.close().await;
    }
    app.close().await;
}

/// Waits until a session named `application_name` whose query starts with
/// `query` waits for a lock.
async fn until_waiting_for_a_lock(app: &PgPool, application_name: &str, query: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock' AND query LIKE $2 || '%'",
        )
        .bind(application_name)
        .bind(query)
        .fetch_one(app)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{application_name} never waited for a lock in {query}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_owner_bumps_the_epoch_only_after_an_in_flight_fenced_write_commits() {
    let schema = TestSchema::create().await;
    let app = schema.pool(2).await;
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;
    let msg = message(1, "acct-1");
    let shard = msg.address.shard.clone();
    let epoch = ra.acquire(std::slice::from_ref(&shard)).await.unwrap()[0].1;
    save(&sa, vec![msg.clone()]).await;
    // a loses its locks but does not know yet; its handler finishes.
    terminate(&app, lock_session_pid(&app, &a).await).await;

    // Hold the message row so a's write stops half way, after its fence check.
    let mut blocker = app.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM flotilla_messages WHERE id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut late = completion(1, b"from a");
    late.fence = Some(Fence {
        shard: shard.clone(),
        epoch,
    });
    let sa = std::sync::Arc::new(sa);
    let write = tokio::spawn({
        let sa = sa.clone();
        async move {
            sa.write(WriteBatch {
                saves: Vec::new(),
                completions: vec![late],
            })
            .await
        }
    });
    until_waiting_for_a_lock(&app, schema.name(), "UPDATE flotilla_messages").await;

    // b takes the lock at once, but its epoch bump waits for a's write.
    let rb = std::sync::Arc::new(rb);
    let acquire = tokio::spawn({
        let rb = rb.clone();
        let shard = shard.clone();
        async move { rb.acquire(&[shard]).await }
    });
    let lock_session = format!("flotilla-lock/{}", b.id);
    until_waiting_for_a_lock(&app, &lock_session, "UPDATE flotilla_shards").await;
    blocker.commit().await.unwrap();

    assert_eq!(
        write.await.unwrap().unwrap().completions,
        vec![CompletionOutcome::Recorded],
        "a's fence was current when it was checked"
    );
    assert_eq!(
        acquire.await.unwrap().unwrap(),
        vec![(shard.clone(), Epoch(epoch.0 + 1))]
    );
    // b, now the owner, finds the message already handled: it runs once.
    assert_eq!(unprocessed_ids(&sb, i64::MAX).await, Vec::<i64>::new());
    assert!(sb.reply(msg.id).await.unwrap().is_some());

    sa.close().await;
    sb.close().await;
    app.close().await;
}

#[tokio::test]
async fn stale_missing_and_foreign_fences_write_nothing_and_keep_batch_order() {
    let schema = TestSchema::create().await;
    let a = runner(&schema, "a", 7001);
    let (storage, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let messages: Vec<_> = (1..=5).map(|i| message(i, &format!("acct-{i}"))).collect();
    save(&storage, messages.clone()).await;
    let shard_of = |i: usize| messages[i - 1].address.shard.clone();
    let mut wanted: Vec<ShardId> = (1..=4).map(shard_of).collect();
    wanted.dedup();
    let epochs = ra.acquire(&wanted).await.unwrap();
    let epoch_of = |shard: &ShardId| {
        epochs
            .iter()
            .find(|(s, _)| s == shard)
            .map(|(_, e)| *e)
            .unwrap()
    };
    let fenced = |id: i64, shard: ShardId, epoch: Epoch| {
        let mut c = completion(id, b"r");
        c.fence = Some(Fence { shard, epoch });
        c
    };
    let never = ShardId::new("never-acquired", 1);
    let foreign = wanted
        .iter()
        .find(|s| **s != shard_of(3))
        .cloned()
        .unwrap_or_else(|| ShardId::new("elsewhere", 0));
    let foreign_epoch = epochs.iter().find(|(s, _)| *s == foreign).map(|(_, e)| *e);
    let outcome = storage
        .write(WriteBatch {
            saves: Vec::new(),
            completions: vec![
                fenced(1, shard_of(1), epoch_of(&shard_of(1))),
                fenced(2, shard_of(2), Epoch(epoch_of(&shard_of(2)).0 + 5)),
                // Message 3 lives on another shard than its fence names.
                fenced(3, foreign.clone(), foreign_epoch.unwrap_or(Epoch(1))),
                fenced(4, never.clone(), Epoch(1)),
                // Unfenced completions (single-runner callers) are not checked.
                completion(5, b"r"),
            ],
        })
        .await
        .unwrap();
    assert_eq!(
        outcome.completions,
        vec![
            CompletionOutcome::Recorded,
            CompletionOutcome::Fenced {
                stale: Epoch(epoch_of(&shard_of(2)).0 + 5),
                current: Some(epoch_of(&shard_of(2)))
            },
            CompletionOutcome::Fenced {
                stale: foreign_epoch.unwrap_or(Epoch(1)),
                current: foreign_epoch
            },
            CompletionOutcome::Fenced {
                stale: Epoch(1),
                current: None
            },
            CompletionOutcome::Recorded,
        ]
    );
    assert_eq!(unprocessed_ids(&storage, i64::MAX).await, vec![2, 3, 4]);
    storage.close().await;
}

#[tokio::test]
async fn a_runner_whose_process_dies_leaves_the_live_set_at_once() {
    let schema = TestSchema::create().await;
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;
    assert_eq!(ra.acquire(&shards(&[0, 1])).await.unwrap().len(), 2);
    assert_eq!(rb.acquire(&shards(&[0, 1])).await.unwrap(), vec![]);

    // The process "dies": its lock connection closes without a word.
    drop(ra);
    sa.close().await;
    assert_eq!(
        live_eventually(&rb, &[b.id.to_string()]).await,
        vec![b.id.to_string()]
    );
    assert_eq!(
        acquire_eventually(&rb, &shards(&[0, 1])).await,
        vec![
            (ShardId::default_group(0), Epoch(2)),
            (ShardId::default_group(1), Epoch(2))
        ]
    );
    sb.close().await;
}

#[tokio::test]
async fn postgres_ends_an_idle_lock_session_after_the_lock_timeout() {
    let schema = TestSchema::create().await;
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    let (sa, ra) = registered(&schema, &a, Duration::from_secs(1)).await;
    let (sb, rb) = registered(&schema, &b, LOCK_TIMEOUT).await;
    assert_eq!(ra.acquire(&shards(&[0])).await.unwrap().len(), 1);
    assert_eq!(rb.acquire(&shards(&[0])).await.unwrap(), vec![]);

    // a never confirms: after about a second PostgreSQL ends its session.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acquire_eventually(&rb, &shards(&[0])).await,
        vec![(ShardId::default_group(0), Epoch(2))]
    );
    assert_eq!(
        ids(&rb.live_runners().await.unwrap()),
        vec![b.id.to_string()]
    );
    assert!(ra.confirm().await.is_err());

    for storage in [sa, sb] {
        storage.close().await;
    }
}

#[tokio::test]
async fn confirming_keeps_a_short_lock_timeout_session_alive() {
    let schema = TestSchema::create().await;
    let a = runner(&schema, "a", 7001);
    let (sa, ra) = registered(&schema, &a, Duration::from_millis(1500)).await;
    assert_eq!(ra.acquire(&shards(&[0])).await.unwrap().len(), 1);
    // Twice the timeout in all, with a wide margin at each step.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ra.confirm().await.expect("confirmed within the timeout");
    }
    assert_eq!(
        ids(&ra.live_runners().await.unwrap()),
        vec![a.id.to_string()]
    );
    sa.close().await;
}

#[tokio::test]
async fn signals_reach_every_listener_and_a_lost_listener_reports_lag() {
    let schema = TestSchema::create().await;
    let app = schema.pool(1).await;
    let a = runner(&schema, "a", 7001);
    let (sa, ra) = registered(&schema, &a, LOCK_TIMEOUT).await;
    let storage = schema.storage(PREFIX).await;
    let other = storage.runners(LOCK_TIMEOUT);
    let mut rx = other.listen().await.unwrap();

    let shard = ShardId::new("pay:ments", 299);
    ra.signal(Signal::MessagesReady(shard.clone()))
        .await
        .unwrap();
    assert_eq!(
        next_signal(&mut rx).await,
        Some(Signal::MessagesReady(shard))
    );
    other.register(&runner(&schema, "b", 7002)).await.unwrap();
    assert_eq!(next_signal(&mut rx).await, Some(Signal::MembershipChanged));
    ra.unregister().await.unwrap();
    assert_eq!(next_signal(&mut rx).await, Some(Signal::MembershipChanged));

    // Signals of other clusters are not heard: another prefix in this
    // schema, the same prefix in another schema (channels are database-wide).
    let elsewhere = schema.storage("elsewhere_").await;
    let other_schema = TestSchema::create().await;
    let same_prefix = other_schema.storage(PREFIX).await;
    for cluster in [&elsewhere, &same_prefix] {
        cluster
            .runners(LOCK_TIMEOUT)
            .signal(Signal::MembershipChanged)
            .await
            .unwrap();
    }

    // The listening session is terminated: the listener comes back and says
    // it may have missed signals, then hears the next ones.
    let listeners: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE application_name = $1 AND query LIKE 'LISTEN %flotilla_signals%'",
    )
    .bind(schema.name())
    .fetch_all(&app)
    .await
    .unwrap();
    assert_eq!(listeners.len(), 1);
    terminate(&app, listeners[0]).await;
    assert_eq!(next_signal(&mut rx).await, Some(Signal::Lagged));
    ra.signal(Signal::MessagesReady(ShardId::default_group(1)))
        .await
        .unwrap();
    assert_eq!(
        next_signal(&mut rx).await,
        Some(Signal::MessagesReady(ShardId::default_group(1)))
    );

    // Closing the storage ends the listener.
    storage.close().await;
    assert_eq!(next_signal(&mut rx).await, None);

    sa.close().await;
    elsewhere.close().await;
    same_prefix.close().await;
    app.close().await;
}

#[tokio::test]
async fn two_prefixes_in_one_schema_share_neither_runners_nor_locks() {
    let schema = TestSchema::create().await;
    let app = schema.pool(1).await;
    let one = schema.storage("one_").await;
    let two = schema.storage("two_").await;
    let (r1, r2) = (one.runners(LOCK_TIMEOUT), two.runners(LOCK_TIMEOUT));
    let a = runner(&schema, "a", 7001);
    let b = runner(&schema, "b", 7002);
    r1.register(&a).await.unwrap();
    r2.register(&b).await.unwrap();
    assert_eq!(r1.live_runners().await.unwrap(), vec![a.clone()]);
    assert_eq!(r2.live_runners().await.unwrap(), vec![b.clone()]);

    // Both clusters' lock keys start at 1; their namespaces tell them apart.
    let namespaces: (i32, i32) = sqlx::query_as(
        "SELECT (SELECT lock_namespace FROM one_cluster), (SELECT lock_namespace FROM two_cluster)",
    )
    .fetch_one(&app)
    .await
    .unwrap();
    assert_ne!(namespaces.0, namespaces.1);
    assert_eq!(r1.acquire(&shards(&[0, 1])).await.unwrap().len(), 2);
    assert_eq!(r2.acquire(&shards(&[0, 1])).await.unwrap().len(), 2);

    // The same runner id may live in both clusters.
    let (r1b, r2a) = (one.runners(LOCK_TIMEOUT), two.runners(LOCK_TIMEOUT));
    r1b.register(&b).await.unwrap();
    r2a.register(&a).await.unwrap();
    assert_eq!(ids(&r1.live_runners().await.unwrap()).len(), 2);
    assert_eq!(ids(&r2.live_runners().await.unwrap()).len(), 2);
    for table in ["one_runners", "two_runners"] {
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&app)
            .await
            .unwrap();
        assert_eq!(rows, 2, "{table}");
    }

    one.close().await;
    two.close().await;
    app.close().await;
}

#[tokio::test]
async fn machine_ids_are_leased_once_per_live_session() {
    let schema = TestSchema::create().await;
    let storage = schema.storage("flotilla_").await;
    let a = storage.runners(std::time::Duration::from_secs(10));
    let b = storage.runners(std::time::Duration::from_secs(10));
    let client = flotilla::RunnerId::new("client-1");
    let first = a.lease_machine_id(&client).await.unwrap();
    // The same session keeps its lease.
    assert_eq!(a.lease_machine_id(&client).await.unwrap(), first);
    let second = b
        .lease_machine_id(&flotilla::RunnerId::new("client-2"))
        .await
        .unwrap();
    assert_ne!(first, second);
    assert!(first < flotilla::storage::MACHINE_IDS && second < flotilla::storage::MACHINE_IDS);
    // A session kept alive by confirm holds its lease.
    a.confirm().await.unwrap();
    storage.close().await;
}
