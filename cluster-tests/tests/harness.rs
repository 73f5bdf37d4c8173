//! The harness itself: runner processes start, take signals, restart and
//! are gone with their schema when the test cluster is dropped.

mod support;

use std::time::Duration;

use flotilla_cluster_tests::{
    ClusterSettings, HarnessError, TestCluster, database_url, exclusive, process_state,
};
use support::*;

async fn schema_exists(schema: &str) -> bool {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let found: Option<String> = sqlx::query_scalar(
        "SELECT schema_name::text FROM information_schema.schemata WHERE schema_name = $1",
    )
    .bind(schema)
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    found.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_processes_take_signals_restart_and_vanish_with_their_schema() {
    let _one_at_a_time = exclusive().await;
    let (schema, pids) = {
        let mut cluster = start(ClusterSettings::with_runners(1)).await;
        let schema = cluster.db().schema().to_owned();
        assert!(schema_exists(&schema).await);
        assert!(
            cluster.audit_rows().await.unwrap().is_empty(),
            "the audit table exists"
        );
        let runner = cluster.runner_mut(0);
        assert!(runner.is_alive());
        assert!(
            runner.address().is_some(),
            "READY names the transport address"
        );
        let first = runner.pid();

        runner.stop().await.unwrap();
        assert_eq!(process_state(first), Some('T'), "SIGSTOP stops it");
        runner.cont().await.unwrap();
        assert_ne!(process_state(first), Some('T'), "SIGCONT resumes it");

        runner.restart().await.unwrap();
        let second = runner.pid();
        assert_ne!(first, second, "a restart is a new process");
        assert_eq!(process_state(first), None, "the old process is gone");

        let status = runner.term(Duration::from_secs(20)).await.unwrap();
        assert!(
            status.success(),
            "SIGTERM: a graceful exit with 0, got {status}"
        );
        assert!(!runner.is_alive());
        assert!(matches!(
            runner.command("BURST x y 1").await,
            Err(HarnessError::NotRunning(_))
        ));

        runner.restart().await.unwrap();
        let third = runner.pid();
        assert!(runner.is_alive());
        (schema, vec![first, second, third])
    };
    // Dropped: the last incarnation was killed, the schema dropped.
    for pid in pids {
        assert_eq!(
            process_state(pid),
            None,
            "process {pid} outlived its test cluster"
        );
    }
    assert!(
        !schema_exists(&schema).await,
        "schema {schema} was not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_cannot_start_is_reported_with_its_log() {
    let _one_at_a_time = exclusive().await;
    let mut settings = ClusterSettings::with_runners(1);
    settings
        .extra_env
        .push(("FLOTILLA_SHARDS".into(), "none".into()));
    match TestCluster::start(NODE, settings).await {
        Err(HarnessError::NotReady {
            reason, log_tail, ..
        }) => {
            assert!(reason.contains("exited"), "{reason}");
            assert!(log_tail.contains("FLOTILLA_SHARDS"), "{log_tail}");
        }
        other => panic!("expected NotReady, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_exits_by_itself_when_its_test_process_goes_away() {
    let _one_at_a_time = exclusive().await;
    let mut cluster = start(ClusterSettings::with_runners(1)).await;
    let runner = cluster.runner_mut(0);
    runner.close_stdin();
    let status = runner.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(3), "{status}");
}
