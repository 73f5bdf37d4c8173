//! Entity behaviour on one runner: activation, serial handling, mailboxes,
//! passivation, panics, deadlines, shutdown.

mod common;

use std::time::Duration;

use common::*;
use flotilla::prelude::*;
use flotilla::{ShardId, StartError};

async fn memory_cluster() -> Cluster {
    Cluster::builder()
        .memory()
        .register::<Worker>()
        .register::<Echo>()
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn volatile_call_reaches_the_entity_and_returns_its_reply() {
    let cluster = memory_cluster().await;
    assert_eq!(cluster.client::<Echo>("e").ping(41).await.unwrap(), 41);
    let worker = cluster.client::<Worker>("w-volatile");
    assert_eq!(worker.work(0).await.unwrap(), 1);
    assert_eq!(
        worker.work(0).await.unwrap(),
        2,
        "state is kept between calls"
    );
    assert_eq!(
        cluster.client::<Worker>("other").handled().await.unwrap(),
        0,
        "each id is its own entity"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn handler_errors_stay_typed_through_the_client() {
    let cluster = memory_cluster().await;
    let err = cluster
        .client::<Worker>("w")
        .refuse("no".into())
        .await
        .unwrap_err();
    match err {
        ClusterError::Handler(Refused(why)) => assert_eq!(why, "no"),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn an_entity_handles_one_message_at_a_time() {
    let cluster = memory_cluster().await;
    let worker = cluster.client::<Worker>("serial");
    let calls: Vec<_> = (0..4).map(|_| worker.work(20)).collect();
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(max_concurrency("serial"), 1);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_handler_panic_fails_only_that_request_and_restarts_the_entity() {
    let cluster = memory_cluster().await;
    let worker = cluster.client::<Worker>("panicky");
    assert_eq!(worker.work(0).await.unwrap(), 1);
    let err = worker.boom("kaboom".into()).await.unwrap_err();
    assert!(
        matches!(&err, ClusterError::HandlerPanicked(m) if m == "kaboom"),
        "{err:?}"
    );
    // Restarted from scratch (volatile state), and serving again.
    assert_eq!(worker.handled().await.unwrap(), 0);
    assert_eq!(worker.work(0).await.unwrap(), 1);
    // Other entities never noticed.
    assert_eq!(
        cluster.client::<Echo>("bystander").ping(7).await.unwrap(),
        7
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_persisted_handler_panic_is_recorded_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = builder(Backend::Sqlite, &dir)
        .register::<Worker>()
        .start()
        .await
        .unwrap();
    let worker = cluster.client::<Worker>("persisted-panic");
    let err = worker
        .persisted_boom("stored kaboom".into())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClusterError::HandlerPanicked(m) if m == "stored kaboom"),
        "{err:?}"
    );
    assert_eq!(worker.work(0).await.unwrap(), 1, "the entity serves again");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_full_mailbox_is_reported_and_loses_nothing_already_queued() {
    let cluster = memory_cluster().await;
    let worker = cluster.client::<Worker>("busy");
    // One handler runs, four wait in the mailbox (capacity 4); the sixth is refused.
    let mut queued = Vec::new();
    for _ in 0..5 {
        let w = worker.clone();
        queued.push(tokio::spawn(async move { w.work(200).await }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = worker.work(0).await.unwrap_err();
    assert!(
        matches!(err, ClusterError::MailboxFull { capacity: 4, .. }),
        "{err:?}"
    );
    for call in queued {
        call.await.unwrap().unwrap();
    }
    assert_eq!(worker.handled().await.unwrap(), 5);
    cluster.shutdown().await;
}

#[tokio::test]
async fn idle_entities_are_passivated_after_max_idle() {
    let cluster = memory_cluster().await;
    cluster.client::<Worker>("idle").work(0).await.unwrap();
    assert_eq!(cluster.active_entities("Worker"), 1);
    // max_idle = 300ms
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while cluster.active_entities("Worker") != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "entity was never passivated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The next message activates it again, from fresh state.
    assert_eq!(cluster.client::<Worker>("idle").handled().await.unwrap(), 0);
    cluster.shutdown().await;
}

#[tokio::test]
async fn every_call_has_a_deadline() {
    let cluster = memory_cluster().await;
    let worker = cluster
        .client::<Worker>("slow")
        .with_timeout(Duration::from_millis(50));
    let err = worker.work(1_000).await.unwrap_err();
    assert!(
        matches!(err, ClusterError::Timeout(d) if d == Duration::from_millis(50)),
        "{err:?}"
    );
    assert!(err.is_transient());
    cluster.shutdown().await;
}

#[tokio::test]
async fn the_default_deadline_comes_from_the_config() {
    let cluster = Cluster::builder()
        .memory()
        .call_timeout(Duration::from_millis(30))
        .register::<Worker>()
        .start()
        .await
        .unwrap();
    let err = cluster
        .client::<Worker>("slow")
        .work(1_000)
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Timeout(_)), "{err:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn calling_an_unregistered_entity_type_is_a_typed_error() {
    let cluster = memory_cluster().await;
    let err = cluster
        .client::<Unregistered>("x")
        .hello()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClusterError::UnknownEntityType(name) if name == "Unregistered"),
        "{err:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn registering_a_type_twice_fails_at_start() {
    let err = Cluster::builder()
        .memory()
        .register::<Echo>()
        .register::<Echo>()
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(err, StartError::DuplicateEntityType("Echo")),
        "{err:?}"
    );
}

#[tokio::test]
async fn handlers_see_their_entity_shard_and_runner() {
    let cluster = memory_cluster().await;
    let (id, shard, runner, volatile) = cluster
        .client::<Worker>("acct-42")
        .whereami()
        .await
        .unwrap();
    assert_eq!(id, "acct-42");
    assert_eq!(
        shard.parse::<ShardId>().unwrap(),
        ShardId::for_entity("default", "acct-42", 300)
    );
    assert_eq!(runner, cluster.runner_id().to_string());
    assert!(volatile, "a volatile call has no message id");
    cluster.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_handlers_finish_and_refuses_new_calls() {
    let cluster = memory_cluster().await;
    let worker = cluster.client::<Worker>("draining");
    let running = {
        let w = worker.clone();
        tokio::spawn(async move { w.work(300).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        cluster.shutdown().await,
        "shutdown finished within its timeout"
    );
    assert_eq!(
        running.await.unwrap().unwrap(),
        1,
        "the handler under way completed"
    );
    let err = worker.work(0).await.unwrap_err();
    assert!(matches!(err, ClusterError::ShuttingDown), "{err:?}");
}

#[tokio::test]
async fn a_single_runner_keeps_the_runner_id_it_was_given() {
    let cluster = Cluster::builder()
        .memory()
        .runner_id("orders-1")
        .start()
        .await
        .unwrap();
    assert_eq!(cluster.runner_id().as_str(), "orders-1");
    cluster.shutdown().await;
}
