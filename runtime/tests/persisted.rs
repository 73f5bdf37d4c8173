//! Persisted messages on one runner, on in-memory and SQLite storage:
//! run-once, dedup, scheduling, persisted state, effects, limits.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use flotilla::prelude::*;
use flotilla::storage::{MessageStorage, UnprocessedQuery};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_persisted_calls_from_64_callers_each_run_once_and_get_their_own_reply() {
    each_backend(|backend, dir| async move {
        let cluster = builder(backend, &dir)
            .register::<Echo>()
            .start()
            .await
            .unwrap();
        let prefix = format!("many-{backend:?}");
        let callers: Vec<_> = (0..64u32)
            .map(|caller| {
                let cluster = cluster.clone();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    for n in (caller..10_000).step_by(64) {
                        let id = format!("{prefix}-{}", n % 100);
                        let reply = cluster.client::<Echo>(&id).echo(caller, n).await.unwrap();
                        assert_eq!(
                            reply,
                            (id, caller, n),
                            "a caller got another request's reply"
                        );
                    }
                })
            })
            .collect();
        for c in callers {
            c.await.unwrap();
        }
        let mine: Vec<u32> = common::RUNS
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, runs)| *runs)
            .collect();
        assert_eq!(
            mine.len(),
            10_000,
            "only {} distinct messages ran",
            mine.len()
        );
        assert!(mine.iter().all(|runs| *runs == 1), "a handler ran twice");
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_duplicate_primary_key_returns_the_stored_reply_without_running_again() {
    each_backend(|backend, dir| async move {
        let cluster = builder(backend, &dir)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let id = format!("dedup-{backend:?}");
        let ledger = cluster.client::<Ledger>(&id);
        assert_eq!(ledger.apply(7, 100).await.unwrap(), 100);
        assert_eq!(ledger.apply(7, 100).await.unwrap(), 100, "same reply");
        assert_eq!(
            ledger.apply(7, 999).await.unwrap(),
            100,
            "the key decides, not the payload"
        );
        assert_eq!(runs(&format!("{id}/7")), 1);
        assert_eq!(ledger.balance().await.unwrap(), (100, 1));
        // A handler error is a reply too, and is deduplicated the same way.
        let e1 = ledger.apply(8, -1_000).await.unwrap_err();
        let e2 = ledger.apply(8, -1_000).await.unwrap_err();
        assert!(matches!(
            e1,
            ClusterError::Handler(LedgerError::Insufficient { balance: 100 })
        ));
        assert!(matches!(
            e2,
            ClusterError::Handler(LedgerError::Insufficient { balance: 100 })
        ));
        assert_eq!(runs(&format!("{id}/8")), 1);
        // The key is per entity: another account may use the same transfer id.
        assert_eq!(
            cluster
                .client::<Ledger>(format!("{id}-b"))
                .apply(7, 5)
                .await
                .unwrap(),
            5
        );
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_sends_of_one_key_run_the_handler_once_and_share_the_reply() {
    each_backend(|backend, dir| async move {
        let cluster = builder(backend, &dir)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let id = format!("concurrent-dedup-{backend:?}");
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let ledger = cluster.client::<Ledger>(&id);
                tokio::spawn(async move { ledger.apply(1, 10).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap(), 10);
        }
        assert_eq!(runs(&format!("{id}/1")), 1);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn identical_calls_without_a_key_are_two_messages() {
    each_backend(|backend, dir| async move {
        let cluster = builder(backend, &dir)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let id = format!("nokey-{backend:?}");
        let ledger = cluster.client::<Ledger>(&id);
        assert_eq!(ledger.note("same".into()).await.unwrap(), 1);
        assert_eq!(ledger.note("same".into()).await.unwrap(), 2);
        assert_eq!(runs(&format!("{id}/note/same")), 2);
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn scheduled_delivery_fires_on_its_timer_not_a_poll() {
    each_backend(|backend, dir| async move {
        // A safety poll of a minute: only the timer can deliver in time.
        let cluster = builder(backend, &dir)
            .safety_poll(Duration::from_secs(60))
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let id = format!("scheduled-{backend:?}");
        let started = Instant::now();
        let at = SystemTime::now() + Duration::from_millis(400);
        let reply = cluster
            .client::<Ledger>(&id)
            .deliver_at(at)
            .apply(1, 5)
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(reply, 5);
        assert!(
            took >= Duration::from_millis(390),
            "delivered early, after {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "delivered late, after {took:?}"
        );
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn persisted_state_changes_once_per_message_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = "restart-state";
    {
        let cluster = builder(Backend::Sqlite, &dir)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let ledger = cluster.client::<Ledger>(id);
        for key in 0..5 {
            ledger.apply(key, 10).await.unwrap();
            ledger.apply(key, 10).await.unwrap(); // duplicate: no state change
        }
        assert!(cluster.shutdown().await);
    }
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    assert_eq!(
        cluster.client::<Ledger>(id).balance().await.unwrap(),
        (50, 5)
    );
    // Dedup also survives the restart.
    assert_eq!(cluster.client::<Ledger>(id).apply(0, 10).await.unwrap(), 10);
    assert_eq!(
        cluster.client::<Ledger>(id).balance().await.unwrap(),
        (50, 5)
    );
    cluster.shutdown().await;
}

async fn create_audit_table(dir: &tempfile::TempDir, table: &str) {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("flotilla.db").display()
    );
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (entity TEXT NOT NULL, key INTEGER NOT NULL CHECK (amount <> 13), amount INTEGER NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

async fn audit_rows(dir: &tempfile::TempDir, table: &str) -> Vec<(String, i64, i64)> {
    let url = format!("sqlite://{}", dir.path().join("flotilla.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT entity, key, amount FROM {table} ORDER BY key"
    )))
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}

#[tokio::test]
async fn effects_staged_by_a_handler_commit_exactly_once_with_its_reply() {
    let dir = tempfile::tempdir().unwrap();
    create_audit_table(&dir, "audit").await;
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let ledger = cluster.client::<Ledger>("audited");
    for key in 1..=3 {
        assert_eq!(
            ledger.apply_audited(key, 10, "audit".into()).await.unwrap(),
            key as i64 * 10
        );
        ledger.apply_audited(key, 10, "audit".into()).await.unwrap(); // duplicate
    }
    cluster.shutdown().await;
    let rows = audit_rows(&dir, "audit").await;
    assert_eq!(
        rows,
        vec![
            ("audited".into(), 1, 10),
            ("audited".into(), 2, 10),
            ("audited".into(), 3, 10)
        ]
    );
}

#[tokio::test]
async fn a_failing_effect_rolls_back_its_state_and_reports_effects_failed() {
    let dir = tempfile::tempdir().unwrap();
    create_audit_table(&dir, "audit").await;
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let ledger = cluster.client::<Ledger>("effect-fails");
    ledger.apply_audited(1, 10, "audit".into()).await.unwrap();
    // amount 13 violates the CHECK constraint of the audit table.
    let err = ledger
        .apply_audited(2, 13, "audit".into())
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::EffectsFailed(_)), "{err:?}");
    // The duplicate gets the same recorded failure; the state change was rolled back.
    let again = ledger
        .apply_audited(2, 13, "audit".into())
        .await
        .unwrap_err();
    assert!(matches!(again, ClusterError::EffectsFailed(_)), "{again:?}");
    assert_eq!(ledger.balance().await.unwrap(), (10, 1));
    ledger.apply_audited(3, 5, "audit".into()).await.unwrap();
    assert_eq!(ledger.balance().await.unwrap(), (15, 2));
    cluster.shutdown().await;
    assert_eq!(audit_rows(&dir, "audit").await.len(), 2);
}

#[tokio::test]
async fn a_payload_over_the_limit_is_rejected_before_it_is_stored() {
    each_backend(|backend, dir| async move {
        let cluster = builder(backend, &dir)
            .max_payload_bytes(1024)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        let err = cluster
            .client::<Ledger>("big")
            .note("x".repeat(4096))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClusterError::PayloadTooLarge { limit: 1024, .. }),
            "{err:?}"
        );
        let stored = cluster
            .storage()
            .unprocessed(UnprocessedQuery {
                ready_at: i64::MAX,
                after: None,
                limit: 10,
                shards: Default::default(),
            })
            .await
            .unwrap();
        assert!(stored.is_empty(), "nothing was stored");
        cluster.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_stored_message_whose_payload_no_longer_decodes_is_rejected_not_retried_forever() {
    use flotilla::storage::{MessageId, NewMessage, StoredReply, WriteBatch};
    use flotilla::{EntityAddress, ShardId};
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn MessageStorage> = Arc::new(
        flotilla::storage::SqliteStorage::open(dir.path().join("flotilla.db"))
            .await
            .unwrap(),
    );
    let id = MessageId(42);
    storage
        .write(WriteBatch {
            saves: vec![NewMessage {
                id,
                address: EntityAddress {
                    entity_type: "Ledger".into(),
                    entity_id: "garbled".into(),
                    shard: ShardId::for_entity("default", "garbled", 300),
                },
                tag: "apply".into(),
                key: None,
                payload: vec![0xc1, 0x00, 0xff],
                headers: Default::default(),
                deliver_at: None,
                created_at: 0,
            }],
            completions: vec![],
        })
        .await
        .unwrap();
    let cluster = builder(Backend::Sqlite, &dir)
        .storage(storage.clone())
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(reply) = storage.reply(id).await.unwrap() {
            assert!(matches!(reply, StoredReply::Rejected(_)), "{reply:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bad message was never rejected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The runner keeps serving.
    assert_eq!(
        cluster.client::<Ledger>("fine").apply(1, 1).await.unwrap(),
        1
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn unprocessed_messages_are_resumed_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let id = "resumed";
    {
        let cluster = builder(Backend::Sqlite, &dir)
            .register::<Ledger>()
            .start()
            .await
            .unwrap();
        // Scheduled a second from now; the runner stops before it is due.
        let ledger = cluster
            .client::<Ledger>(id)
            .deliver_at(SystemTime::now() + Duration::from_secs(1));
        let call = tokio::spawn(async move { ledger.apply(1, 25).await });
        while cluster
            .storage()
            .next_delivery(0, &Default::default())
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        call.abort();
        cluster.shutdown().await;
    }
    assert_eq!(runs(&format!("{id}/1")), 0);
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while runs(&format!("{id}/1")) == 0 {
        assert!(Instant::now() < deadline, "stored message was not resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The resumed run's reply is the stored one: a retry with the key gets it.
    assert_eq!(cluster.client::<Ledger>(id).apply(1, 25).await.unwrap(), 25);
    assert_eq!(runs(&format!("{id}/1")), 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn message_ids_are_unique_snowflakes() {
    let cluster = Cluster::builder().memory().start().await.unwrap();
    let ids: HashSet<_> = (0..10_000).map(|_| cluster.snowflake()).collect();
    assert_eq!(ids.len(), 10_000);
    cluster.shutdown().await;
}

/// Delegates to memory storage; each commit takes 5 ms (an fsync) and is counted.
#[derive(Debug, Default)]
struct SlowCountingStorage {
    inner: flotilla::storage::MemoryStorage,
    commits: std::sync::atomic::AtomicUsize,
    largest: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl MessageStorage for SlowCountingStorage {
    async fn write(
        &self,
        batch: flotilla::storage::WriteBatch,
    ) -> Result<flotilla::storage::WriteOutcome, flotilla::StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.commits.fetch_add(1, SeqCst);
        self.largest
            .fetch_max(batch.saves.len() + batch.completions.len(), SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.inner.write(batch).await
    }
    async fn unprocessed(
        &self,
        query: UnprocessedQuery,
    ) -> Result<Vec<flotilla::storage::StoredMessage>, flotilla::StorageError> {
        self.inner.unprocessed(query).await
    }
    async fn next_delivery(
        &self,
        after: i64,
        shards: &flotilla::storage::ShardFilter,
    ) -> Result<Option<i64>, flotilla::StorageError> {
        self.inner.next_delivery(after, shards).await
    }
    async fn reply(
        &self,
        id: flotilla::storage::MessageId,
    ) -> Result<Option<flotilla::storage::StoredReply>, flotilla::StorageError> {
        self.inner.reply(id).await
    }
    async fn load_state(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Vec<u8>>, flotilla::StorageError> {
        self.inner.load_state(entity_type, entity_id).await
    }
    async fn purge_processed(&self, before: i64) -> Result<u64, flotilla::StorageError> {
        self.inner.purge_processed(before).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_persisted_calls_share_commits() {
    use std::sync::atomic::Ordering::SeqCst;
    let storage = Arc::new(SlowCountingStorage::default());
    let cluster = Cluster::builder()
        .storage(storage.clone())
        .register::<Echo>()
        .start()
        .await
        .unwrap();
    let calls: Vec<_> = (0..64u32)
        .map(|caller| {
            let echo = cluster.client::<Echo>(format!("group-commit-{caller}"));
            tokio::spawn(async move { echo.echo(caller, 0).await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // 64 saves and 64 completions: one commit each would be 128.
    let commits = storage.commits.load(SeqCst);
    assert!(commits <= 16, "{commits} commits for 128 writes");
    assert!(storage.largest.load(SeqCst) >= 32, "batches stayed small");
    cluster.shutdown().await;
}
