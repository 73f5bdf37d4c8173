//! Guarantees of the SQLite backend beyond the shared scenarios: durability
//! across reopen, effects really running in the completion transaction, the
//! runner lock, migrations beside the application's, large values.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::StorageError;
use flotilla::storage::{
    Completion, CompletionOutcome, MessageId, MessageStorage, SaveOutcome, SqliteStorage,
    Statement, StoredReply, WriteBatch,
};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Connection, SqlSafeStr};

use super::fixtures::*;

async fn open(path: &Path) -> SqliteStorage {
    SqliteStorage::open(path)
        .await
        .expect("open SQLite storage")
}

async fn create_audit_table(path: &Path) {
    let mut app = app_connection(path).await;
    sqlx::query(AUDIT_TABLE).execute(&mut app).await.unwrap();
    app.close().await.unwrap();
}

async fn audit_notes(path: &Path) -> Vec<String> {
    let mut app = app_connection(path).await;
    let notes = sqlx::query_scalar("SELECT note FROM app_audit ORDER BY rowid")
        .fetch_all(&mut app)
        .await
        .unwrap();
    app.close().await.unwrap();
    notes
}

#[tokio::test]
async fn reopening_the_file_keeps_messages_replies_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/flotilla.db");
    let storage = open(&path).await;
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

    let storage = open(&path).await;
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
        storage.next_delivery(0).await.unwrap(),
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
    let storage = open(&path).await;
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
async fn a_failing_effect_rolls_back_only_its_own_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
    create_audit_table(&path).await;
    save(
        &storage,
        vec![message(1, "a"), message(2, "b"), message(3, "c")],
    )
    .await;

    let outcome = storage
        .write(WriteBatch {
            saves: vec![message(4, "d")],
            completions: vec![
                Completion {
                    effects: vec![audit(1, "one")],
                    state: Some(state("a", b"A")),
                    ..completion(1, b"r1")
                },
                Completion {
                    // The second effect breaks the UNIQUE note: the first
                    // effect and the state must go with it.
                    effects: vec![audit(2, "two"), audit(2, "one")],
                    state: Some(state("b", b"B")),
                    ..completion(2, b"r2")
                },
                Completion {
                    effects: vec![audit(3, "three")],
                    state: Some(state("c", b"C")),
                    ..completion(3, b"r3")
                },
            ],
        })
        .await
        .unwrap();

    assert_eq!(outcome.saves, vec![SaveOutcome::Saved]);
    let [first, failed, third] = &outcome.completions[..] else {
        panic!("three outcomes expected: {outcome:?}");
    };
    assert_eq!(first, &CompletionOutcome::Recorded);
    assert_eq!(third, &CompletionOutcome::Recorded);
    let CompletionOutcome::EffectsFailed(reason) = failed else {
        panic!("EffectsFailed expected, got {failed:?}");
    };
    assert!(reason.contains("UNIQUE"), "{reason}");

    assert_eq!(audit_notes(&path).await, vec!["one", "three"]);
    assert_eq!(storage.load_state(ACCOUNT, "b").await.unwrap(), None);
    assert_eq!(
        storage.load_state(ACCOUNT, "c").await.unwrap(),
        Some(b"C".to_vec())
    );
    // Recorded as failed, so never retried; the reply says why.
    assert_eq!(
        storage.reply(MessageId(2)).await.unwrap(),
        Some(StoredReply::EffectsFailed(reason.clone()))
    );
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![4]);
    storage.close().await;
}

#[tokio::test]
async fn an_effect_on_a_missing_table_fails_its_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
    save(&storage, vec![message(1, "a")]).await;
    let outcome = complete(
        &storage,
        vec![Completion {
            effects: vec![Statement::new("INSERT INTO no_such_table VALUES (1)")],
            ..completion(1, b"r")
        }],
    )
    .await;
    let [CompletionOutcome::EffectsFailed(reason)] = &outcome.completions[..] else {
        panic!("EffectsFailed expected: {outcome:?}");
    };
    assert!(reason.contains("no such table"), "{reason}");
    storage.close().await;
}

#[tokio::test]
async fn an_effect_cannot_end_the_completion_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
    create_audit_table(&path).await;
    save(
        &storage,
        vec![message(1, "a"), message(2, "a"), message(3, "a")],
    )
    .await;
    let outcome = complete(
        &storage,
        vec![
            Completion {
                effects: vec![Statement::new("COMMIT")],
                ..completion(1, b"r")
            },
            Completion {
                effects: vec![
                    audit(2, "before"),
                    Statement::new("INSERT INTO app_audit VALUES (2, 'x'); COMMIT"),
                ],
                ..completion(2, b"r")
            },
            Completion {
                effects: vec![Statement::new("PRAGMA foreign_keys = OFF")],
                ..completion(3, b"r")
            },
        ],
    )
    .await;
    assert!(
        outcome
            .completions
            .iter()
            .all(|c| matches!(c, CompletionOutcome::EffectsFailed(_))),
        "{outcome:?}"
    );
    assert_eq!(audit_notes(&path).await, Vec::<String>::new());
    storage.close().await;
}

#[tokio::test]
async fn effects_bind_every_value_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
    let mut app = app_connection(&path).await;
    sqlx::query("CREATE TABLE app_values (n, i, r, t, b)")
        .execute(&mut app)
        .await
        .unwrap();
    save(&storage, vec![message(1, "a")]).await;
    let effect = Statement::new("INSERT INTO app_values VALUES (?, ?, ?, ?, ?)")
        .bind(None::<i64>)
        .bind(i64::MIN)
        .bind(0.5_f64)
        .bind("text ✓")
        .bind(vec![0_u8, 255]);
    let outcome = complete(
        &storage,
        vec![Completion {
            effects: vec![effect],
            ..completion(1, b"r")
        }],
    )
    .await;
    assert_eq!(outcome.completions, vec![CompletionOutcome::Recorded]);
    let row: (Option<i64>, i64, f64, String, Vec<u8>) =
        sqlx::query_as("SELECT n, i, r, t, b FROM app_values")
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(
        row,
        (None, i64::MIN, 0.5, "text ✓".to_owned(), vec![0, 255])
    );
    app.close().await.unwrap();
    storage.close().await;
}

#[tokio::test]
async fn a_failed_batch_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
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
    let storage = open(&path).await;
    create_audit_table(&path).await;
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
        let audited = audit_notes(&path).await.contains(&format!("note {base}"));
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
    let first = open(&path).await;
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
    let reopened = open(&path).await;
    assert_eq!(unprocessed_ids(&reopened, 0).await, vec![1]);
    // Dropping without close releases the lock too.
    drop(reopened);
    open(&path).await.close().await;
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
    let storage = open(Path::new(&path)).await;
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
    let storage = open(&path).await;
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

    let storage = open(&path).await;
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
    open(&path).await.close().await;

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
    open(&path).await.close().await;
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
    open(&path).await.close().await;
}

#[tokio::test]
async fn one_mib_payloads_and_states_round_trip_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
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

    let storage = open(&path).await;
    assert!(storage.load_state(ACCOUNT, "a").await.unwrap() == Some(blob(2)));
    assert!(storage.reply(MessageId(1)).await.unwrap() == Some(StoredReply::Ok(blob(3))));
    storage.close().await;
}

#[tokio::test]
async fn a_large_purge_deletes_every_old_row_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
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

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks of 10 ms.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// Not a pass/fail test: prints what the backend sustains on this machine.
/// `cargo test --release -p flotilla --test storage_conformance -- --ignored --nocapture group_commit`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly"]
async fn group_commit_throughput_and_latency() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage: Arc<dyn MessageStorage> = Arc::new(open(&path).await);

    // One message's round trip: its save commits, then its completion.
    let mut latencies = Vec::new();
    for id in 1..=500_i64 {
        let started = Instant::now();
        save(&*storage, vec![keyed(id, "a", &id.to_string())]).await;
        complete(&*storage, vec![completion(id, b"ok")]).await;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    println!(
        "one message alone (2 commits): p50 {:?}, p99 {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100]
    );

    // Steady state under 64 concurrent callers: each commit holds the saves
    // of 64 new messages and the completions of the 64 before them.
    let per_batch = 64_i64;
    let rounds = 400_i64;
    let new_messages = |round: i64| -> Vec<i64> {
        (0..per_batch)
            .map(|i| 1_000_000 + round * per_batch + i)
            .collect()
    };
    let mut batch_times = Vec::new();
    let cpu_before = cpu_time();
    let started = Instant::now();
    for round in 0..=rounds {
        let saves = if round < rounds {
            new_messages(round)
                .iter()
                .map(|id| keyed(*id, &format!("e{}", id % 97), &id.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let completions = if round > 0 {
            new_messages(round - 1)
                .iter()
                .map(|id| Completion {
                    state: Some(state(&format!("e{}", id % 97), b"state")),
                    ..completion(*id, b"ok")
                })
                .collect()
        } else {
            Vec::new()
        };
        let batch_started = Instant::now();
        storage
            .write(WriteBatch { saves, completions })
            .await
            .unwrap();
        batch_times.push(batch_started.elapsed());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    batch_times.sort();
    let messages = (rounds * per_batch) as f64;
    println!(
        "{per_batch} saves + {per_batch} completions per commit: {:.0} messages/s; \
         commit p50 {:?}, p99 {:?}; CPU {:.1} µs per message",
        messages / elapsed.as_secs_f64(),
        batch_times[batch_times.len() / 2],
        batch_times[batch_times.len() * 99 / 100],
        cpu.as_secs_f64() * 1e6 / messages,
    );
    storage.close().await;
}

#[tokio::test]
async fn an_effect_that_rolls_back_the_whole_transaction_fails_only_its_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open(&path).await;
    create_audit_table(&path).await;
    let mut app = app_connection(&path).await;
    sqlx::query(
        "CREATE TRIGGER no_vetoes BEFORE INSERT ON app_audit WHEN NEW.note = 'veto' \
         BEGIN SELECT RAISE(ROLLBACK, 'vetoed by trigger'); END",
    )
    .execute(&mut app)
    .await
    .unwrap();
    app.close().await.unwrap();
    save(
        &storage,
        vec![message(1, "a"), message(2, "b"), message(3, "c")],
    )
    .await;

    // A trigger's RAISE(ROLLBACK) and an INSERT OR ROLLBACK both end the
    // transaction of the whole batch, not just their statement.
    let outcome = storage
        .write(WriteBatch {
            saves: vec![message(4, "d")],
            completions: vec![
                Completion {
                    effects: vec![audit(1, "fine")],
                    state: Some(state("a", b"A")),
                    ..completion(1, b"r1")
                },
                Completion {
                    effects: vec![audit(2, "kept back"), audit(2, "veto")],
                    state: Some(state("b", b"B")),
                    ..completion(2, b"r2")
                },
                Completion {
                    effects: vec![Statement::new(
                        "INSERT OR ROLLBACK INTO app_audit (message, note) VALUES (3, 'fine')",
                    )],
                    state: Some(state("c", b"C")),
                    ..completion(3, b"r3")
                },
            ],
        })
        .await
        .unwrap();
    assert_eq!(outcome.saves, vec![SaveOutcome::Saved]);
    let [first, vetoed, conflicted] = &outcome.completions[..] else {
        panic!("three outcomes expected: {outcome:?}");
    };
    assert_eq!(first, &CompletionOutcome::Recorded);
    assert_eq!(
        vetoed,
        &CompletionOutcome::EffectsFailed("vetoed by trigger".to_owned())
    );
    let CompletionOutcome::EffectsFailed(reason) = conflicted else {
        panic!("EffectsFailed expected, got {conflicted:?}");
    };
    assert!(reason.contains("UNIQUE"), "{reason}");

    assert_eq!(audit_notes(&path).await, vec!["fine"]);
    assert_eq!(
        storage.load_state(ACCOUNT, "a").await.unwrap(),
        Some(b"A".to_vec())
    );
    assert_eq!(storage.load_state(ACCOUNT, "b").await.unwrap(), None);
    assert_eq!(storage.load_state(ACCOUNT, "c").await.unwrap(), None);
    assert_eq!(
        storage.reply(MessageId(2)).await.unwrap(),
        Some(StoredReply::EffectsFailed("vetoed by trigger".to_owned()))
    );
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![4]);

    // The writer goes on as usual.
    assert_eq!(
        save(&storage, vec![message(5, "e")]).await.saves,
        vec![SaveOutcome::Saved]
    );
    storage.close().await;
}
