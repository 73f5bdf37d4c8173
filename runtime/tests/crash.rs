//! A runner killed with SIGKILL while persisted messages are in flight loses
//! nothing: after a restart every acknowledged message has been handled, no
//! effect was recorded twice, and the entities' persisted state agrees with
//! the effects.
//!
//! The test re-runs its own binary as the child runner (`crash_child_runner`
//! below does nothing unless `FLOTILLA_CRASH_CHILD_DB` is set).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use flotilla::prelude::*;
use flotilla::storage::UnprocessedQuery;
use tokio::io::{AsyncBufReadExt, BufReader};

const CHILD_ENV: &str = "FLOTILLA_CRASH_CHILD_DB";
const ENTITIES: u64 = 20;
const SENDERS: u64 = 16;

/// The child runner: sends audited persisted calls from 16 tasks forever,
/// printing `ACK <entity> <key>` for each reply, until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child_runner() {
    let Ok(db) = std::env::var(CHILD_ENV) else {
        return; // a normal test run: nothing to do
    };
    let cluster = Cluster::builder()
        .sqlite(db)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let cluster = cluster.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let key = sender + SENDERS * i;
                    let entity = format!("acct-{}", key % ENTITIES);
                    if cluster
                        .client::<Ledger>(&entity)
                        .apply_audited(key, 1, "audit".into())
                        .await
                        .is_ok()
                    {
                        println!("ACK {entity} {key}");
                    }
                }
            })
        })
        .collect();
    for s in senders {
        let _ = s.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_persisted_messages_in_flight_loses_nothing_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("flotilla.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE audit (entity TEXT NOT NULL, key INTEGER NOT NULL, amount INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_runner",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked: BTreeSet<(String, u64)> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 2_000 {
        assert!(
            Instant::now() < deadline,
            "child acknowledged only {} messages",
            acked.len()
        );
        let Some(line) = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("child went silent")
            .unwrap()
        else {
            panic!("child exited early");
        };
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (entity, key) = rest.split_once(' ').unwrap();
            acked.insert((entity.to_owned(), key.parse().unwrap()));
        }
    }
    child.start_kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the child was killed, not finished");
    // Acks printed before the kill but read after it still count.
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let (entity, key) = rest.split_once(' ').unwrap();
            acked.insert((entity.to_owned(), key.parse().unwrap()));
        }
    }

    // Restart on the same file: the lock died with the child.
    let cluster = Cluster::builder()
        .sqlite(&db)
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = cluster
            .storage()
            .unprocessed(UnprocessedQuery {
                ready_at: i64::MAX,
                after: None,
                limit: 1,
                shards: Default::default(),
            })
            .await
            .unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "messages stored before the crash were not resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT entity, key FROM audit")
        .fetch_all(&pool)
        .await
        .unwrap();
    let mut effects: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for (entity, key) in rows {
        *effects.entry((entity, key as u64)).or_default() += 1;
    }
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "effects recorded twice: {twice:?}");
    let lost: Vec<_> = acked.iter().filter(|k| !effects.contains_key(*k)).collect();
    assert!(lost.is_empty(), "acknowledged but never handled: {lost:?}");
    assert!(effects.len() >= acked.len());

    // Persisted state moved exactly once per recorded effect.
    for e in 0..ENTITIES {
        let entity = format!("acct-{e}");
        let expected = effects.keys().filter(|(name, _)| *name == entity).count() as i64;
        let (balance, applied) = cluster.client::<Ledger>(&entity).balance().await.unwrap();
        assert_eq!(
            balance, expected,
            "state of {entity} disagrees with its effects"
        );
        assert_eq!(applied as i64, expected);
    }
    cluster.shutdown().await;
    pool.close().await;
}
