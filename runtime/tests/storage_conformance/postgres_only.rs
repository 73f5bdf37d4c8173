//! PostgreSQL-only guarantees: table prefixes, the migrator, and staged
//! effects with `$n` placeholders.

use flotilla::SetupError;
use flotilla::StorageError;
use flotilla::storage::{
    Completion, CompletionOutcome, MessageStorage, PostgresStorage, SaveOutcome, SqlValue,
    Statement, StoredReply, WriteBatch,
};
use sqlx::{AssertSqlSafe, PgPool};

use super::fixtures::*;
use super::postgres_db::{TestSchema, database_url};

/// The number of migrations this build ships.
const MIGRATIONS: i64 = 3;

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .expect("count")
}

fn setup_error(error: &StorageError) -> &SetupError {
    error
        .setup_error()
        .unwrap_or_else(|| panic!("not a setup error: {error:?}"))
}

#[tokio::test]
async fn a_prefix_outside_the_rule_is_refused_with_the_rule() {
    let schema = TestSchema::create().await;
    for bad in ["Flotilla_", "1st_", "a-b_", "x; DROP TABLE y; --", ""] {
        let error = PostgresStorage::connect(&database_url(), bad)
            .await
            .expect_err(bad);
        assert_eq!(
            setup_error(&error),
            &SetupError::InvalidPrefix {
                prefix: bad.to_owned()
            }
        );
        assert!(
            error.to_string().contains("^[a-z_][a-z0-9_]{0,40}$"),
            "{error}"
        );
        let error = PostgresStorage::from_pool(schema.pool(1).await, bad)
            .await
            .expect_err(bad);
        assert!(matches!(
            setup_error(&error),
            SetupError::InvalidPrefix { .. }
        ));
    }
    // Nothing was created for a refused prefix.
    let app = schema.pool(1).await;
    let tables = count(
        &app,
        &format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}'",
            schema.name()
        ),
    )
    .await;
    assert_eq!(tables, 0);
    app.close().await;
}

#[tokio::test]
async fn two_prefixes_in_one_database_do_not_see_each_other() {
    let schema = TestSchema::create().await;
    let a = schema.storage("a_").await;
    let b = schema.storage("b_").await;
    assert_eq!(a.prefix(), "a_");

    let saved = save(&a, vec![keyed(1, "x", "k"), message(2, "y")]).await;
    assert_eq!(saved.saves, vec![SaveOutcome::Saved; 2]);
    assert_eq!(unprocessed_ids(&b, 0).await, Vec::<i64>::new());
    // The same key and id are free in the other prefix.
    let saved = save(&b, vec![keyed(1, "x", "k")]).await;
    assert_eq!(saved.saves, vec![SaveOutcome::Saved]);

    complete(
        &a,
        vec![Completion {
            state: Some(state("x", b"from a")),
            ..completion(1, b"ra")
        }],
    )
    .await;
    assert_eq!(b.load_state(ACCOUNT, "x").await.unwrap(), None);
    assert_eq!(
        b.reply(flotilla::storage::MessageId(1)).await.unwrap(),
        None
    );
    assert_eq!(unprocessed_ids(&a, 0).await, vec![2]);
    assert_eq!(unprocessed_ids(&b, 0).await, vec![1]);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn connecting_again_applies_no_migration_twice() {
    let schema = TestSchema::create().await;
    let first = schema.storage("flotilla_").await;
    save(&first, vec![message(1, "a")]).await;
    first.close().await;

    let again = schema.storage("flotilla_").await;
    // The data survived; the migrations are recorded once.
    assert_eq!(unprocessed_ids(&again, 0).await, vec![1]);
    let app = schema.pool(1).await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM flotilla_migrations").await,
        MIGRATIONS
    );
    again.close().await;
    app.close().await;
}

#[tokio::test]
async fn runners_connecting_at_once_both_succeed_with_one_set_of_tables() {
    let schema = TestSchema::create().await;
    let (one, two) = tokio::join!(schema.storage("flotilla_"), schema.storage("flotilla_"));
    let app = schema.pool(1).await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM flotilla_migrations").await,
        MIGRATIONS
    );
    let tables = count(
        &app,
        &format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{}'",
            schema.name()
        ),
    )
    .await;
    assert_eq!(
        tables, 6,
        "messages, entity_state, migrations, cluster, runners and shards"
    );
    // Migrated once: one lock namespace for the cluster.
    assert_eq!(
        count(&app, "SELECT count(*) FROM flotilla_cluster").await,
        1
    );
    // Both write to the same tables.
    save(&one, vec![message(1, "a")]).await;
    assert_eq!(unprocessed_ids(&two, 0).await, vec![1]);
    one.close().await;
    two.close().await;
    app.close().await;
}

#[tokio::test]
async fn a_database_migrated_by_a_newer_version_is_refused() {
    let schema = TestSchema::create().await;
    schema.storage("flotilla_").await.close().await;
    let app = schema.pool(1).await;
    sqlx::query(
        "INSERT INTO flotilla_migrations (version, description, checksum) \
         VALUES (999, 'from the future', '\\x00')",
    )
    .execute(&app)
    .await
    .unwrap();

    let error = PostgresStorage::from_pool(schema.pool(1).await, "flotilla_")
        .await
        .expect_err("a newer database must be refused");
    assert_eq!(
        setup_error(&error),
        &SetupError::NewerSchema {
            found: 999,
            known: MIGRATIONS
        }
    );
    assert!(error.to_string().contains("newer Flotilla"), "{error}");
    assert_eq!(
        count(&app, "SELECT count(*) FROM flotilla_migrations").await,
        MIGRATIONS + 1
    );
    app.close().await;
}

#[tokio::test]
async fn an_applied_migration_that_changed_is_a_checksum_mismatch() {
    let schema = TestSchema::create().await;
    schema.storage("flotilla_").await.close().await;
    let app = schema.pool(1).await;
    sqlx::query("UPDATE flotilla_migrations SET checksum = '\\x0102' WHERE version = 1")
        .execute(&app)
        .await
        .unwrap();

    let error = PostgresStorage::from_pool(schema.pool(1).await, "flotilla_")
        .await
        .expect_err("a changed migration must be refused");
    assert_eq!(
        setup_error(&error),
        &SetupError::ChecksumMismatch { version: 1 }
    );
    app.close().await;
}

/// A completion of `id` with `effects` and a state for entity `e{id}`.
fn with_effects(id: i64, effects: Vec<Statement>) -> Completion {
    Completion {
        effects,
        state: Some(state(&format!("e{id}"), b"new")),
        ..completion(id, format!("r{id}").as_bytes())
    }
}

#[tokio::test]
async fn effects_with_dollar_placeholders_commit_or_roll_back_per_completion() {
    let schema = TestSchema::create().await;
    let storage = schema.storage("flotilla_").await;
    let app = schema.pool(1).await;
    sqlx::query(PG_AUDIT_TABLE).execute(&app).await.unwrap();
    sqlx::query(
        "CREATE TABLE app_values (message bigint, label text, amount integer, ratio float8, \
         blob bytea)",
    )
    .execute(&app)
    .await
    .unwrap();
    save(&storage, (1..=5).map(|id| message(id, "a")).collect()).await;

    let every_kind = Statement::new(
        "INSERT INTO app_values (message, label, amount, ratio, blob) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(1_i64)
    .bind(None::<String>)
    .bind(SqlValue::Null)
    .bind(0.5_f64)
    .bind(vec![0_u8, 1, 0xff]);
    let outcome = complete(
        &storage,
        vec![
            with_effects(1, vec![pg_audit(1, "one"), every_kind]),
            // The second insert breaks the unique note: the first is undone too.
            with_effects(2, vec![pg_audit(2, "two"), pg_audit(2, "one")]),
            with_effects(3, vec![pg_audit(3, "three")]),
            // Transaction control is refused before it runs.
            with_effects(4, vec![Statement::new("COMMIT")]),
            // Two statements in one effect: PostgreSQL refuses the prepared statement.
            with_effects(
                5,
                vec![Statement::new(
                    "INSERT INTO app_audit (message, note) VALUES (5, 'five'); SELECT 1",
                )],
            ),
        ],
    )
    .await;

    assert_eq!(outcome.completions[0], CompletionOutcome::Recorded);
    assert!(
        matches!(&outcome.completions[1], CompletionOutcome::EffectsFailed(m) if m.contains("duplicate key")),
        "{:?}",
        outcome.completions[1]
    );
    assert_eq!(outcome.completions[2], CompletionOutcome::Recorded);
    assert!(
        matches!(&outcome.completions[3], CompletionOutcome::EffectsFailed(m) if m.contains("`COMMIT` is not allowed")),
        "{:?}",
        outcome.completions[3]
    );
    assert!(
        matches!(&outcome.completions[4], CompletionOutcome::EffectsFailed(_)),
        "{:?}",
        outcome.completions[4]
    );

    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM app_audit ORDER BY seq")
        .fetch_all(&app)
        .await
        .unwrap();
    assert_eq!(notes, vec!["one", "three"]);
    let values: (i64, Option<String>, Option<i32>, f64, Vec<u8>) =
        sqlx::query_as("SELECT message, label, amount, ratio, blob FROM app_values")
            .fetch_one(&app)
            .await
            .unwrap();
    assert_eq!(values, (1, None, None, 0.5, vec![0, 1, 0xff]));

    // A failed completion is processed, its reply says why, its state is not kept.
    for (id, kept) in [(1, true), (2, false), (3, true), (4, false), (5, false)] {
        let reply = storage
            .reply(flotilla::storage::MessageId(id))
            .await
            .unwrap();
        let state = storage
            .load_state(ACCOUNT, &format!("e{id}"))
            .await
            .unwrap();
        if kept {
            assert_eq!(reply, Some(StoredReply::Ok(format!("r{id}").into_bytes())));
            assert_eq!(state, Some(b"new".to_vec()));
        } else {
            assert!(matches!(reply, Some(StoredReply::EffectsFailed(_))), "{id}");
            assert_eq!(state, None, "{id}");
        }
    }
    assert_eq!(unprocessed_ids(&storage, 0).await, Vec::<i64>::new());
    storage.close().await;
    app.close().await;
}

#[tokio::test]
async fn a_batch_that_fails_as_a_whole_commits_nothing() {
    let schema = TestSchema::create().await;
    let storage = schema.storage("flotilla_").await;
    save(&storage, vec![message(1, "a")]).await;
    // Message 1 stored again under a new key: an id is never reused, so the
    // whole batch fails, its completion included.
    let mut reused = keyed(1, "b", "k");
    reused.created_at = 5;
    let result = storage
        .write(WriteBatch {
            saves: vec![message(2, "b"), reused],
            completions: vec![Completion {
                state: Some(state("a", b"A")),
                ..completion(1, b"r1")
            }],
        })
        .await;
    assert!(
        matches!(result, Err(StorageError::Database(_))),
        "{result:?}"
    );
    assert_eq!(unprocessed_ids(&storage, 0).await, vec![1]);
    assert_eq!(storage.load_state(ACCOUNT, "a").await.unwrap(), None);
    // The storage is usable afterwards.
    let outcome = complete(&storage, vec![completion(1, b"r1")]).await;
    assert_eq!(outcome.completions, vec![CompletionOutcome::Recorded]);
    storage.close().await;
}

#[tokio::test]
async fn duplicates_across_statement_chunks_resolve_to_the_first() {
    let schema = TestSchema::create().await;
    let storage = schema.storage("flotilla_").await;
    // More saves than one statement carries, every key twice, the second
    // copy in a later chunk.
    let n = 1500;
    let mut saves: Vec<_> = (0..n)
        .map(|i| keyed(i + 1, "a", &format!("k{i}")))
        .collect();
    saves.extend((0..n).map(|i| keyed(n + i + 1, "a", &format!("k{i}"))));
    let outcome = save(&storage, saves).await;
    for i in 0..n as usize {
        assert_eq!(outcome.saves[i], SaveOutcome::Saved);
        assert_eq!(
            outcome.saves[n as usize + i],
            SaveOutcome::Duplicate {
                id: flotilla::storage::MessageId(i as i64 + 1),
                reply: None
            }
        );
    }
    assert_eq!(unprocessed_ids(&storage, 0).await.len(), n as usize);
    storage.close().await;
}

#[tokio::test]
async fn a_cancelled_write_commits_nothing_and_holds_no_lock() {
    let schema = TestSchema::create().await;
    let storage = schema.storage("flotilla_").await;
    let batch = WriteBatch {
        saves: (1..=2000).map(|id| message(id, "a")).collect(),
        completions: Vec::new(),
    };
    let app = schema.pool(1).await;
    {
        let write = storage.write(batch);
        tokio::pin!(write);
        // Driven until its transaction is open on the server, then dropped.
        let mut began = false;
        for _ in 0..10_000 {
            assert!(
                futures::poll!(&mut write).is_pending(),
                "the write committed before the test could cancel it"
            );
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid() \
                   AND xact_start IS NOT NULL",
            )
            .bind(schema.name())
            .fetch_one(&app)
            .await
            .unwrap();
            if open > 0 {
                began = true;
                break;
            }
        }
        assert!(began, "the write never began its transaction");
    }
    // All or nothing: the dropped write never reached its commit.
    assert_eq!(unprocessed_ids(&storage, 0).await, Vec::<i64>::new());
    // No transaction of it is left open: a lock that conflicts with every
    // other one is granted (within the bound, else the test fails).
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE flotilla_messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .expect("a cancelled write left a transaction holding a lock");
    tx.rollback().await.unwrap();
    // And the storage writes on.
    let outcome = save(&storage, vec![message(1, "a")]).await;
    assert_eq!(outcome.saves, vec![SaveOutcome::Saved]);
    storage.close().await;
    app.close().await;
}
