//! Staged effects on SQLite: they really run in the completion transaction,
//! and a failing one fails only its own completion, whatever way it fails.

use flotilla::storage::{
    Completion, CompletionOutcome, MessageId, MessageStorage, SaveOutcome, Statement, StoredReply,
    WriteBatch,
};
use sqlx::Connection;

use super::fixtures::*;

#[tokio::test]
async fn a_failing_effect_rolls_back_only_its_own_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    create_audit_table_in(&path).await;
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

    assert_eq!(audit_notes_in(&path).await, vec!["one", "three"]);
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
    let storage = open_sqlite(&path).await;
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
    let storage = open_sqlite(&path).await;
    create_audit_table_in(&path).await;
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
    assert_eq!(audit_notes_in(&path).await, Vec::<String>::new());
    storage.close().await;
}

#[tokio::test]
async fn effects_bind_every_value_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
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
async fn an_effect_that_rolls_back_the_whole_transaction_fails_only_its_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.db");
    let storage = open_sqlite(&path).await;
    create_audit_table_in(&path).await;
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

    assert_eq!(audit_notes_in(&path).await, vec!["fine"]);
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
