//! Several runners in one process on a shared in-memory registry and
//! message store: routing of volatile and persisted calls to the owner over
//! the real TCP transport, hand-over on graceful shutdown, fencing when a
//! runner's lock session ends. (Fencing by epoch in storage, and real
//! processes, are tested on PostgreSQL by `cluster-tests`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::ClusterError;
use flotilla::prelude::*;
use flotilla::storage::{MemoryRunners, MemoryStorage};
use flotilla::transport::ClusterSecret;

const SHARDS: u32 = 16;

#[derive(Default, Serialize, Deserialize)]
struct Where {
    seen: u32,
}

#[entity(state = persisted)]
impl Where {
    #[rpc]
    async fn runner(&self, ctx: &EntityContext) -> String {
        ctx.runner_id().to_string()
    }

    #[rpc(persisted, primary_key = key)]
    async fn count(&mut self, ctx: &EntityContext, key: u64) -> (String, u32) {
        let _ = key;
        self.seen += 1;
        (ctx.runner_id().to_string(), self.seen)
    }

    /// Whether the runner handling this call leads, as handlers see it.
    #[rpc]
    async fn leads(&self) -> Option<bool> {
        flotilla::context::is_leader()
    }

    #[rpc]
    async fn boom(&self) -> u32 {
        panic!("boom")
    }
}

#[derive(Default)]
struct Unregistered;

#[entity]
impl Unregistered {
    #[rpc]
    async fn hello(&self) -> u32 {
        1
    }
}

fn secret() -> ClusterSecret {
    ClusterSecret::new("in-process cluster test secret").unwrap()
}

struct Fixture {
    storage: Arc<MemoryStorage>,
    registry: MemoryRunners,
}

impl Fixture {
    fn new() -> Self {
        Self {
            storage: Arc::new(MemoryStorage::new()),
            registry: MemoryRunners::new(),
        }
    }

    fn builder(&self, id: &str, member: Arc<MemoryRunners>) -> flotilla::ClusterBuilder {
        Cluster::builder()
            .storage(Arc::new(self.storage.share()))
            .runner_storage(member)
            .runner_id(id)
            .secret(secret())
            .shards(SHARDS)
            .membership_poll(Duration::from_millis(50))
            .call_timeout(Duration::from_secs(10))
            .register::<Where>()
    }

    async fn runner(&self, id: &str) -> (Cluster, Arc<MemoryRunners>) {
        let member = Arc::new(self.registry.join());
        let cluster = self.builder(id, member.clone()).start().await.unwrap();
        (cluster, member)
    }
}

async fn until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn all_owned(runners: &[&Cluster]) -> bool {
    runners
        .iter()
        .map(|c| c.owned_shards().len())
        .sum::<usize>()
        == SHARDS as usize
        && runners.iter().all(|c| !c.owned_shards().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_run_on_the_owner_whichever_runner_sends_them() {
    let fx = Fixture::new();
    let (a, _) = fx.runner("a").await;
    let (b, _) = fx.runner("b").await;
    let (c, _) = fx.runner("c").await;
    // Every runner sees all three (ownership alone can still be the
    // hand-over from a two-runner view) and every shard is owned.
    until(
        "every shard owned, by all three",
        Duration::from_secs(5),
        || [&a, &b, &c].iter().all(|r| r.live_runners().len() == 3) && all_owned(&[&a, &b, &c]),
    )
    .await;
    assert_eq!(a.live_runners().len(), 3);
    let machines: std::collections::HashSet<u16> = [&a, &b, &c]
        .iter()
        .map(|r| r.snowflake().machine_id())
        .collect();
    assert_eq!(machines.len(), 3, "each runner leases its own machine id");
    for i in 0..40 {
        let id = format!("w-{i}");
        let shard = flotilla::sharding::ShardId::for_entity("default", &id, SHARDS);
        let owner = [&a, &b, &c]
            .into_iter()
            .find(|r| r.owned_shards().contains(&shard))
            .unwrap();
        for sender in [&a, &b, &c] {
            let ran_on = sender.client::<Where>(&id).runner().await.unwrap();
            assert_eq!(
                ran_on,
                owner.runner_id().to_string(),
                "{id} from {}",
                sender.runner_id()
            );
        }
        // Persisted, deduplicated by key, from every runner: one run.
        let mut replies = Vec::new();
        for sender in [&a, &b, &c] {
            replies.push(sender.client::<Where>(&id).count(7).await.unwrap());
        }
        assert!(
            replies
                .iter()
                .all(|r| *r == (owner.runner_id().to_string(), 1)),
            "{replies:?}"
        );
    }
    // A panic on a remote owner is the caller's typed error; the owner keeps serving.
    let far = (0..)
        .map(|i| format!("p-{i}"))
        .find(|id| {
            let shard = flotilla::sharding::ShardId::for_entity("default", id, SHARDS);
            !a.owned_shards().contains(&shard)
        })
        .unwrap();
    let err = a.client::<Where>(&far).boom().await.unwrap_err();
    assert!(matches!(err, ClusterError::HandlerPanicked(_)), "{err:?}");
    assert!(a.client::<Where>(&far).runner().await.is_ok());
    for r in [a, b, c] {
        assert!(r.shutdown().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_type_the_owner_does_not_register_is_a_typed_error() {
    let fx = Fixture::new();
    let (a, _) = fx.runner("a").await;
    let member = Arc::new(fx.registry.join());
    let client = fx
        .builder("client", member)
        .client_only()
        .register::<Unregistered>()
        .start()
        .await
        .unwrap();
    until("a owns every shard", Duration::from_secs(5), || {
        a.owned_shards().len() == SHARDS as usize
    })
    .await;
    until("the client sees a", Duration::from_secs(5), || {
        client.live_runners().len() == 1
    })
    .await;
    assert!(client.transport_address().is_none());
    let err = client
        .client::<Unregistered>("u")
        .hello()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClusterError::UnknownEntityType(ref t) if t == "Unregistered"),
        "{err:?}"
    );
    assert_eq!(client.client::<Where>("w").runner().await.unwrap(), "a");
    client.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_hands_every_shard_over_at_once() {
    let fx = Fixture::new();
    let (a, _) = fx.runner("a").await;
    let (b, _) = fx.runner("b").await;
    until("every shard owned by both", Duration::from_secs(5), || {
        all_owned(&[&a, &b])
    })
    .await;
    // Traffic from b to entities everywhere while a leaves.
    let sender = b.clone();
    let traffic = tokio::spawn(async move {
        let mut ok = 0;
        for round in 0..30u64 {
            for i in 0..10 {
                let reply = sender.client::<Where>(format!("t-{i}")).count(round).await;
                assert!(reply.is_ok(), "{reply:?}");
                ok += 1;
            }
        }
        ok
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let left = Instant::now();
    assert!(a.shutdown().await);
    until("b owns every shard", Duration::from_secs(2), || {
        b.owned_shards().len() == SHARDS as usize
    })
    .await;
    eprintln!("hand-over after a graceful shutdown: {:?}", left.elapsed());
    assert_eq!(traffic.await.unwrap(), 300);
    // Each entity counted each round exactly once.
    for i in 0..10 {
        let (_, seen) = b
            .client::<Where>(format!("t-{i}"))
            .count(1_000)
            .await
            .unwrap();
        assert_eq!(seen, 31);
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_lock_session_ends_stops_serving_and_comes_back() {
    let fx = Fixture::new();
    let (a, a_member) = fx.runner("a").await;
    let (b, _) = fx.runner("b").await;
    until("every shard owned by both", Duration::from_secs(5), || {
        all_owned(&[&a, &b])
    })
    .await;
    a_member.sever();
    // a notices at its next confirmation (fence_after / 4) and drops every shard;
    // b sees a gone and takes them all.
    until("a fenced", Duration::from_secs(2), || {
        a.owned_shards().is_empty()
    })
    .await;
    // a registers again and gets its share back.
    until("shared again", Duration::from_secs(5), || {
        all_owned(&[&a, &b])
    })
    .await;
    for i in 0..20 {
        assert!(a.client::<Where>(format!("x-{i}")).runner().await.is_ok());
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_runner_leads_and_leadership_moves_when_it_leaves() {
    let fx = Fixture::new();
    let (a, _) = fx.runner("a").await;
    let (b, _) = fx.runner("b").await;
    let (c, _) = fx.runner("c").await;
    until(
        "every shard owned, by all three",
        Duration::from_secs(5),
        || all_owned(&[&a, &b, &c]),
    )
    .await;
    let runners = [a, b, c];
    let leaders: Vec<&Cluster> = runners.iter().filter(|r| r.is_leader()).collect();
    assert_eq!(leaders.len(), 1, "one leader");
    let leader = leaders[0].clone();
    let others: Vec<&Cluster> = runners
        .iter()
        .filter(|r| r.runner_id() != leader.runner_id())
        .collect();
    // Handlers see it through the task-local context as well.
    let id = (0..)
        .map(|i| format!("l-{i}"))
        .find(|id| {
            let shard = flotilla::sharding::ShardId::for_entity("default", id, SHARDS);
            leader.owned_shards().contains(&shard)
        })
        .unwrap();
    assert_eq!(
        others[0].client::<Where>(&id).leads().await.unwrap(),
        Some(true)
    );
    let elsewhere = (0..)
        .map(|i| format!("f-{i}"))
        .find(|id| {
            let shard = flotilla::sharding::ShardId::for_entity("default", id, SHARDS);
            !leader.owned_shards().contains(&shard)
        })
        .unwrap();
    assert_eq!(
        leader.client::<Where>(&elsewhere).leads().await.unwrap(),
        Some(false)
    );
    assert!(leader.shutdown().await);
    until("a new leader", Duration::from_secs(2), || {
        others.iter().filter(|r| r.is_leader()).count() == 1
    })
    .await;
    for r in others {
        r.shutdown().await;
    }
}
