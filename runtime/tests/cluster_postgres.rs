//! Two runners and a client-only process in one test process, on one
//! PostgreSQL schema: the PostgreSQL runner storage wired into the cluster
//! (registration, shard locks, routing, fencing by epoch). The multi-process
//! scenarios (SIGKILL, SIGSTOP, ...) live in `cluster-tests`.
#![cfg(feature = "postgres")]

#[path = "storage_conformance/postgres_db.rs"]
#[allow(dead_code, unreachable_pub)]
mod postgres_db;

use std::time::{Duration, Instant};

use flotilla::prelude::*;
use flotilla::transport::ClusterSecret;
use postgres_db::{TestSchema, database_url};

const SHARDS: u32 = 12;

#[derive(Default, Serialize, Deserialize)]
struct Tally {
    n: u64,
}

#[entity(state = persisted)]
impl Tally {
    #[rpc]
    async fn runner(&self, ctx: &EntityContext) -> (String, Option<i64>) {
        (ctx.runner_id().to_string(), ctx.epoch().map(|e| e.0))
    }

    #[rpc(persisted, primary_key = key)]
    async fn add(&mut self, key: u64) -> u64 {
        let _ = key;
        self.n += 1;
        self.n
    }
}

/// A URL whose sessions see `schema` first.
fn url_for(schema: &TestSchema) -> String {
    format!(
        "{}?options=-c%20search_path%3D{}",
        database_url(),
        schema.name()
    )
}

fn builder(schema: &TestSchema) -> flotilla::ClusterBuilder {
    Cluster::builder()
        .postgres(url_for(schema))
        .secret(ClusterSecret::new("postgres cluster test secret").unwrap())
        .shards(SHARDS)
        .membership_poll(Duration::from_millis(50))
        .call_timeout(Duration::from_secs(10))
        .register::<Tally>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_on_postgres_share_the_shards_and_route_calls() {
    let schema = TestSchema::create().await;
    let a = builder(&schema).runner_id("a").start().await.unwrap();
    let b = builder(&schema).runner_id("b").start().await.unwrap();
    let client = builder(&schema)
        .runner_id("c")
        .client_only()
        .start()
        .await
        .unwrap();
    let start = Instant::now();
    while a.owned_shards().len() + b.owned_shards().len() != SHARDS as usize
        || a.owned_shards().is_empty()
        || b.owned_shards().is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "shards not shared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..24 {
        let id = format!("t-{i}");
        let shard = ShardId::for_entity("default", &id, SHARDS);
        let owner = if a.owned_shards().contains(&shard) {
            &a
        } else {
            &b
        };
        for sender in [&a, &b, &client] {
            let (ran_on, epoch) = sender.client::<Tally>(&id).runner().await.unwrap();
            assert_eq!(ran_on, owner.runner_id().to_string());
            assert!(epoch.is_some_and(|e| e >= 1), "{epoch:?}");
            assert_eq!(sender.client::<Tally>(&id).add(1).await.unwrap(), 1);
        }
    }
    // Every process of the cluster leased its own snowflake machine id, so
    // message ids never collide across processes.
    let machines: std::collections::HashSet<u16> = [&a, &b, &client]
        .iter()
        .map(|c| c.snowflake().machine_id())
        .collect();
    assert_eq!(machines.len(), 3, "{machines:?}");
    // A second runner with a live runner's id is refused, typed.
    let err = builder(&schema).runner_id("a").start().await.unwrap_err();
    assert!(err.to_string().contains("held by a live runner"), "{err}");
    client.shutdown().await;
    assert!(a.shutdown().await);
    let start = Instant::now();
    while b.owned_shards().len() != SHARDS as usize {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "b did not take a's shards"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "hand-over after a's graceful shutdown: {:?}",
        start.elapsed()
    );
    // State moved with the shards.
    for i in 0..24 {
        assert_eq!(b.client::<Tally>(format!("t-{i}")).add(2).await.unwrap(), 2);
    }
    b.shutdown().await;
}
