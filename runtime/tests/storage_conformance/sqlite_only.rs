//! Guarantees of the SQLite backend beyond the shared scenarios: durability
//! across reopen, atomic batches, the runner lock, migrations beside the
//! application's, large values, purge.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla::StorageError;
use flotilla::storage::{
    Completion, MessageId, MessageStorage, SaveOutcome, ShardFilter, SqliteStorage, StoredReply,
    WriteBatch,
};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Connection, SqlSafeStr};

use super::fixtures::*;

#[tokio::test]
async fn reopening_the_file_keeps_messages_replies_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/flotilla.db");
    let storage = open_sqlite(&path).await;
    let mut scheduled = keyed(2, "b", "k");
    scheduled.deliver_at = Some(1_800_000_000_000);
    save(
        &storage,
        vec![message(1, "a"), scheduled.clone(), message(3, "c")],
    )
    .await;
    complete(
        &storage,
        vec![Completion {
            state: Some(state("a", b"A")),
            ..completion(1, b"r1")
        }],
    )
    .await;
    storage.close().await;

    let storage = open_sqlite(&path).await;
    assert_eq!(
        storage.reply(MessageId(1)).await.unwrap(),
        Some(StoredReply::Ok(b"r1".to_vec()))
    );
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"A".to_vec())
    );
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![3]);
    assert_eq!(
        unprocessed_ids(&storage, 1_800_000_000_000).await,
        vec![2, 3]
    );
    assert_eq!(
        storage.next_delivery(0, &ShardFilter::All).await.unwrap(),
        Some(1_800_000_000_000)
    );
    assert_eq!(
        save(&storage, vec![keyed(4, "b", "k")]).await.saves,
        vec![SaveOutcome::Duplicate {
            id: MessageId(2),
            reply: None
        }]
    );
    storage.close().await;
}

#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused() {
    let refused = SqliteStorage::open(":memory:").await;
    let Err(StorageError::Io(error)) = &refused else {
        panic!("Io(InvalidInput) expected, got {refused:?}");
    };
    assert!(error.to_string().contains("MemoryStorage"), "{error}");
}

#[tokio::test]
async fn the_database_is_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    let mut app = app_connection(&path).await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    app.close().await.unwrap();
    storage.close().await;
}

#[tokio::test]
async fn a_failed_batch_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    save(&storage, vec![message(1, "a")]).await;
    // The reused id 1 is a primary-key violation: the whole batch fails.
    let result = storage
        .write(WriteBatch {
            saves: vec![message(2, "a"), message(1, "b")],
            completions: vec![Completion {
                state: Some(state("a", b"A")),
                ..completion(1, b"r")
            }],
        })
        .await;
    assert!(
        matches!(result, Err(StorageError::Database(_))),
        "{result:?}"
    );
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![1]);
    assert_eq!(storage.reply(MessageId(1)).await.unwrap(), None);
    assert_eq!(storage.load_state(ACCOUNT, "a").await.unwrap(), None);
    // The writer is usable afterwards.
    assert_eq!(
        save(&storage, vec![message(2, "a")]).await.saves,
        vec![SaveOutcome::Saved]
    );
    storage.close().await;
}

#[tokio::test]
async fn a_write_cancelled_at_any_point_commits_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    create_audit_table_in(&path).await;
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    for polls in 1..=12_i64 {
        let base = polls * 100;
        save(&storage, vec![message(base, "a")]).await;
        let batch = WriteBatch {
            saves: vec![
                message(base + 1, "b"),
                keyed(base + 2, "b", &base.to_string()),
            ],
            completions: vec![
                Completion {
                    effects: vec![audit(base, &format!("note {base}"))],
                    state: Some(state("a", &base.to_le_bytes())),
                    ..completion(base, b"r")
                },
                completion(base + 1, b"r"),
            ],
        };
        // Poll the write a few times, then drop it half way.
        let mut cancelled = Box::pin(storage.write(batch));
        for _ in 0..polls {
            if cancelled.as_mut().poll(&mut context).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(cancelled);

        // The next write goes through, and the cancelled one either
        // committed entirely or not at all.
        save(&storage, vec![message(base + 50, "c")]).await;
        let committed = storage.reply(MessageId(base)).await.unwrap().is_some();
        let saved = unprocessed_ids(&storage, 0).await.contains(&(base + 2));
        let audited = audit_notes_in(&path)
            .await
            .contains(&format!("note {base}"));
        assert_eq!(
            (saved, audited),
            (committed, committed),
            "after {polls} polls"
        );
    }
    storage.close().await;
}

#[tokio::test]
async fn a_second_open_is_refused_while_the_first_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let first = open_sqlite(&path).await;
    let second = SqliteStorage::open(&path).await;
    let Err(StorageError::InUse(reason)) = &second else {
        panic!("InUse expected, got {second:?}");
    };
    assert!(
        reason.contains("another process runs a Flotilla runner on this database"),
        "{reason}"
    );
    // The refused open changed nothing for the holder.
    save(&first, vec![message(1, "a")]).await;

    first.close().await;
    let reopened = open_sqlite(&path).await;
    assert_eq!(unprocessed_ids(&reopened, 0).await, vec![1]);
    // Dropping without close releases the lock too.
    drop(reopened);
    open_sqlite(&path).await.close().await;
}

/// The environment variable that makes `lock_holder_child` hold a database.
const HOLDER_ENV: &str = "FLOTILLA_TEST_LOCK_HOLDER_DB";

/// Run as a child process by `a_sigkilled_runner_releases_the_lock_at_once`:
/// opens the database, stores a message, says so and waits to be killed (or
/// for its parent to go away, which closes its stdin).
#[tokio::test]
#[ignore = "a child process of a_sigkilled_runner_releases_the_lock_at_once"]
async fn lock_holder_child() {
    let Ok(path) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let storage = open_sqlite(Path::new(&path)).await;
    save(&storage, vec![keyed(1, "a", "from-child")]).await;
    println!("HOLDING");
    let parent_gone = tokio::task::spawn_blocking(|| {
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
    });
    let _ = tokio::time::timeout(Duration::from_secs(60), parent_gone).await;
}

#[tokio::test]
async fn a_sigkilled_runner_releases_the_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "sqlite_only::lock_holder_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let holding = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("HOLDING"))
    });
    let holding = tokio::time::timeout(Duration::from_secs(60), holding).await;
    if !matches!(holding, Ok(Ok(true))) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child never held the database: {holding:?}");
    }

    assert!(matches!(
        SqliteStorage::open(&path).await,
        Err(StorageError::InUse(_))
    ));
    child.kill().unwrap(); // SIGKILL: no destructor, no close
    child.wait().unwrap();

    let started = Instant::now();
    let storage = open_sqlite(&path).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // The child's acknowledged write survived its death.
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![1]);
    storage.close().await;
}

fn migration(version: i64, description: &'static str, sql: &'static str) -> Migration {
    Migration::new(
        version,
        description.into(),
        MigrationType::Simple,
        sql.into_sql_str(),
        false,
    )
}

async fn applied_versions(path: &Path, table: &str) -> Vec<i64> {
    let mut app = app_connection(path).await;
    let versions = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {table} ORDER BY version"
    )))
    .fetch_all(&mut app)
    .await
    .unwrap();
    app.close().await.unwrap();
    versions
}

#[tokio::test]
async fn flotilla_and_application_migrations_coexist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    // The application migrates first, with sqlx's default table and the
    // same version numbers as Flotilla's.
    let app_v1 = Migrator::with_migrations(vec![migration(
        1,
        "users",
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
    )]);
    let mut app = sqlx::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", path.display()))
        .await
        .unwrap();
    app_v1.run(&mut app).await.unwrap();

    let storage = open_sqlite(&path).await;
    // ...and again while Flotilla runs, with a new migration.
    let app_v2 = Migrator::with_migrations(vec![
        migration(
            1,
            "users",
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
        ),
        migration(2, "orders", "CREATE TABLE orders (id INTEGER PRIMARY KEY)"),
    ]);
    app_v2.run(&mut app).await.unwrap();
    app.close().await.unwrap();
    storage.close().await;
    // Flotilla reopens (re-validating its own migrations) beside them.
    open_sqlite(&path).await.close().await;

    assert_eq!(
        applied_versions(&path, "_sqlx_migrations").await,
        vec![1, 2]
    );
    assert_eq!(
        applied_versions(&path, "flotilla_migrations").await,
        vec![1, 2]
    );
    let mut app = app_connection(&path).await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut app)
            .await
            .unwrap();
    app.close().await.unwrap();
    assert_eq!(
        tables,
        vec![
            "_sqlx_migrations",
            "flotilla_entity_state",
            "flotilla_messages",
            "flotilla_migrations",
            "orders",
            "users"
        ]
    );
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_flotilla_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    open_sqlite(&path).await.close().await;
    let mut app = app_connection(&path).await;
    sqlx::query(
        "INSERT INTO flotilla_migrations \
         (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from the future', TRUE, X'00', 0)",
    )
    .execute(&mut app)
    .await
    .unwrap();
    app.close().await.unwrap();

    let refused = SqliteStorage::open(&path).await;
    assert!(
        matches!(refused, Err(StorageError::Migration(_))),
        "{refused:?}"
    );
    // The refusal released the runner lock.
    let mut app = app_connection(&path).await;
    sqlx::query("DELETE FROM flotilla_migrations WHERE version = 9999")
        .execute(&mut app)
        .await
        .unwrap();
    app.close().await.unwrap();
    open_sqlite(&path).await.close().await;
}

#[tokio::test]
async fn one_mib_payloads_and_states_round_trip_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    // Every byte value, in a pattern that no page boundary aligns with.
    let blob = |seed: u32| -> Vec<u8> {
        (0..1024 * 1024_u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
            .collect()
    };
    let mut big = message(1, "a");
    big.payload = blob(1);
    save(&storage, vec![big.clone(), message(2, "a")]).await;
    let read = storage.unprocessed(all_ready_at(0)).await.unwrap();
    assert!(read[0].payload == big.payload, "payload differs");

    complete(
        &storage,
        vec![Completion {
            state: Some(state("a", &blob(2))),
            reply: StoredReply::Ok(blob(3)),
            ..completion(1, b"")
        }],
    )
    .await;
    storage.close().await;

    let storage = open_sqlite(&path).await;
    assert!(storage.load_state(ACCOUNT, "a").await.unwrap() == Some(blob(2)));
    assert!(storage.reply(MessageId(1)).await.unwrap() == Some(StoredReply::Ok(blob(3))));
    storage.close().await;
}

#[tokio::test]
async fn a_large_purge_deletes_every_old_row_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    let ids: Vec<i64> = (1..=2_500).collect();
    save(&storage, ids.iter().map(|id| message(*id, "a")).collect()).await;
    complete(
        &storage,
        ids.iter().map(|id| completion(*id, b"r")).collect(),
    )
    .await;
    save(&storage, vec![message(5_000, "a")]).await;
    assert_eq!(storage.purge_processed(now_ms() + 1).await.unwrap(), 2_500);
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![5_000]);
    storage.close().await;
}
