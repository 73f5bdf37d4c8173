//! The cluster context: what a handler can read without arguments (shard,
//! runner, leader status, trace), and the trace context that travels with
//! a message in its headers, across runners and through storage.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use flotilla::context;
use flotilla::prelude::*;
use flotilla::storage::{
    Headers, MemoryRunners, MemoryStorage, MessageId, MessageStorage, ShardFilter, StoredMessage,
    StoredReply, UnixMillis, UnprocessedQuery, WriteBatch, WriteOutcome,
};
use flotilla::transport::ClusterSecret;
use flotilla::{RunnerId, StorageError};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

/// What a handler saw: from `flotilla::context` and from its `EntityContext`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    runner: Option<String>,
    shard: Option<String>,
    is_leader: Option<bool>,
    trace_id: Option<String>,
    span_id: Option<String>,
    parent_span_id: Option<String>,
    sender_runner: Option<String>,
    sender_shard: Option<String>,
    ctx_runner: String,
    ctx_shard: String,
    ctx_is_leader: Option<bool>,
    ctx_span_id: Option<String>,
}

fn seen(ctx: &EntityContext) -> Seen {
    let current = context::current();
    let trace = current.as_ref().map(|c| *c.trace());
    let sender = current.as_ref().and_then(|c| c.sender().cloned());
    Seen {
        runner: context::runner_id().map(|r| r.to_string()),
        shard: context::shard_id().map(|s| s.to_string()),
        is_leader: context::is_leader(),
        trace_id: trace.map(|t| t.trace_id().to_string()),
        span_id: trace.map(|t| t.span_id().to_string()),
        parent_span_id: trace
            .and_then(|t| t.parent_span_id())
            .map(|s| s.to_string()),
        sender_runner: sender
            .as_ref()
            .and_then(|s| s.runner.as_ref())
            .map(|r| r.to_string()),
        sender_shard: sender
            .as_ref()
            .and_then(|s| s.shard.as_ref())
            .map(|s| s.to_string()),
        ctx_runner: ctx.runner_id().to_string(),
        ctx_shard: ctx.shard_id().to_string(),
        ctx_is_leader: ctx.is_leader(),
        ctx_span_id: ctx.trace().map(|t| t.span_id().to_string()),
    }
}

/// The cluster handle a handler sends through, by a test-unique name.
static CLUSTERS: LazyLock<Mutex<HashMap<String, Cluster>>> = LazyLock::new(Default::default);

/// What `record` saw, by `entity id/key`, for runs whose caller is gone.
static RECORDED: LazyLock<Mutex<HashMap<String, Seen>>> = LazyLock::new(Default::default);

fn cluster(name: &str) -> Cluster {
    CLUSTERS.lock().unwrap()[name].clone()
}

#[derive(Default)]
struct Probe;

#[entity]
impl Probe {
    #[rpc]
    async fn look(&self, ctx: &EntityContext) -> Seen {
        seen(ctx)
    }

    #[rpc(persisted, primary_key = key)]
    async fn record(&self, ctx: &EntityContext, key: u64) -> Seen {
        let seen = seen(ctx);
        RECORDED
            .lock()
            .unwrap()
            .insert(format!("{}/{key}", ctx.entity_id()), seen.clone());
        seen
    }

    /// Calls `record` on `target` through the cluster named `via`: what this
    /// handler saw, and what the target saw.
    #[rpc]
    async fn relay(
        &self,
        ctx: &EntityContext,
        via: String,
        target: String,
        key: u64,
    ) -> (Seen, Seen) {
        let mine = seen(ctx);
        let theirs = cluster(&via)
            .client::<Probe>(&target)
            .record(key)
            .await
            .expect("relayed call");
        (mine, theirs)
    }

    /// Like `relay`, but volatile on both sides.
    #[rpc]
    async fn relay_look(&self, ctx: &EntityContext, via: String, target: String) -> (Seen, Seen) {
        let mine = seen(ctx);
        let theirs = cluster(&via)
            .client::<Probe>(&target)
            .look()
            .await
            .expect("relayed call");
        (mine, theirs)
    }

    /// Sends `record` to `target`, due in `after_ms`, from a task that keeps
    /// this handler's context, and returns without waiting for it.
    #[rpc]
    async fn record_later(
        &self,
        ctx: &EntityContext,
        via: String,
        target: String,
        key: u64,
        after_ms: u64,
    ) -> Seen {
        let at = SystemTime::now() + Duration::from_millis(after_ms);
        let client = ProbeClient::from(cluster(&via).entity_ref::<Probe>(&target).deliver_at(at));
        let current = context::current().expect("a handler has a context");
        tokio::spawn(context::scope(current, async move {
            // The reply is not awaited by anyone: the cluster shuts down first.
            let _ = client.record(key).await;
        }));
        seen(ctx)
    }
}

/// The headers of every message written, by entity id (what storage got).
static SAVED_HEADERS: LazyLock<Mutex<HashMap<String, Headers>>> = LazyLock::new(Default::default);

/// One store shared by every runner of a test; `close` is a no-op so one
/// runner's shutdown does not close it for the others.
#[derive(Debug)]
struct Shared(Arc<MemoryStorage>);

#[async_trait]
impl MessageStorage for Shared {
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError> {
        for message in &batch.saves {
            SAVED_HEADERS.lock().unwrap().insert(
                message.address.entity_id.to_string(),
                message.headers.clone(),
            );
        }
        self.0.write(batch).await
    }
    async fn unprocessed(&self, q: UnprocessedQuery) -> Result<Vec<StoredMessage>, StorageError> {
        self.0.unprocessed(q).await
    }
    async fn next_delivery(
        &self,
        after: UnixMillis,
        shards: &ShardFilter,
    ) -> Result<Option<UnixMillis>, StorageError> {
        self.0.next_delivery(after, shards).await
    }
    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError> {
        self.0.reply(id).await
    }
    async fn load_state(&self, t: &str, id: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.load_state(t, id).await
    }
    async fn purge_processed(&self, before: UnixMillis) -> Result<u64, StorageError> {
        self.0.purge_processed(before).await
    }
    async fn close(&self) {}
}

/// Every span's name and fields (at creation and recorded later), by span id.
#[derive(Clone, Default)]
struct SpanLog(Arc<Mutex<HashMap<u64, SpanRecord>>>);

/// A span's name and its fields.
type SpanRecord = (String, HashMap<String, String>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for SpanLog {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .insert(id.into_u64(), (attrs.metadata().name().to_owned(), fields));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        if let Some((_, fields)) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

impl SpanLog {
    /// The fields of the message spans of `rpc` on entity `entity_id`.
    fn message_spans(&self, entity_id: &str, rpc: &str) -> Vec<HashMap<String, String>> {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|(name, fields)| {
                name == "flotilla.message"
                    && fields.get("entity_id").map(String::as_str) == Some(entity_id)
                    && fields.get("rpc").map(String::as_str) == Some(rpc)
            })
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

/// The span log, installed once as the global subscriber of this binary
/// (a thread-local one would miss the spans of other worker threads).
fn spans() -> SpanLog {
    static LOG: OnceLock<SpanLog> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = SpanLog::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(log.clone()))
            .expect("the only global subscriber of this binary");
        log
    })
    .clone()
}

async fn until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_the_current_context_and_nothing_is_set_outside() {
    assert!(context::current().is_none());
    assert!(context::shard_id().is_none());
    assert!(context::runner_id().is_none());
    assert!(context::is_leader().is_none());
    let cluster = Cluster::builder()
        .memory()
        .register::<Probe>()
        .start()
        .await
        .unwrap();
    let runner = cluster.runner_id().to_string();
    let volatile = cluster.client::<Probe>("p-1").look().await.unwrap();
    let persisted = cluster.client::<Probe>("p-1").record(1).await.unwrap();
    for seen in [&volatile, &persisted] {
        assert_eq!(seen.runner.as_deref(), Some(runner.as_str()));
        assert_eq!(seen.runner.as_deref(), Some(seen.ctx_runner.as_str()));
        assert_eq!(seen.shard.as_deref(), Some(seen.ctx_shard.as_str()));
        assert_eq!(
            seen.ctx_shard.parse::<ShardId>().unwrap(),
            flotilla::sharding::ShardId::for_entity("default", "p-1", 300)
        );
        // A single runner leads, in both views.
        assert_eq!(seen.is_leader, Some(true));
        assert_eq!(seen.ctx_is_leader, Some(true));
        assert!(seen.trace_id.is_some() && seen.span_id.is_some());
        assert_eq!(seen.span_id, seen.ctx_span_id);
        // Sent from outside any handler: the runner, no shard.
        assert_eq!(seen.sender_runner.as_deref(), Some(runner.as_str()));
        assert_eq!(seen.sender_shard, None);
    }
    // Still nothing outside, after handlers ran on this task's behalf.
    assert!(context::current().is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_from_a_handler_continues_its_trace_on_one_runner() {
    let spans = spans();
    let cluster = Cluster::builder()
        .memory()
        .register::<Probe>()
        .start()
        .await
        .unwrap();
    CLUSTERS
        .lock()
        .unwrap()
        .insert("single".to_owned(), cluster.clone());
    let caller = cluster.client::<Probe>("single-caller");
    let (mine, theirs) = caller
        .relay("single".into(), "single-target".into(), 1)
        .await
        .unwrap();
    assert!(mine.trace_id.is_some());
    assert_eq!(theirs.trace_id, mine.trace_id, "same trace");
    assert_eq!(
        theirs.parent_span_id, mine.span_id,
        "the caller's span is the parent"
    );
    assert_ne!(theirs.span_id, mine.span_id);
    assert_eq!(theirs.sender_shard, mine.shard);
    // The handler span records the same link.
    let recorded = spans.message_spans("single-target", "record");
    assert!(
        recorded.iter().any(|f| {
            f.get("trace_id") == mine.trace_id.as_ref()
                && f.get("parent_span_id") == mine.span_id.as_ref()
                && f.get("span_id") == theirs.span_id.as_ref()
        }),
        "{recorded:?}"
    );

    let (mine, theirs) = caller
        .relay_look("single".into(), "single-target".into())
        .await
        .unwrap();
    assert_eq!(theirs.trace_id, mine.trace_id);
    assert_eq!(theirs.parent_span_id, mine.span_id);
    cluster.shutdown().await;
}

fn secret() -> ClusterSecret {
    ClusterSecret::new("context test secret").unwrap()
}

const SHARDS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persisted_call_across_runners_is_a_child_of_the_callers_span() {
    let spans = spans();
    let storage = Arc::new(MemoryStorage::new());
    let registry = MemoryRunners::new();
    let mut runners = Vec::new();
    for id in ["ctx-a", "ctx-b", "ctx-c"] {
        let cluster = Cluster::builder()
            .storage(Arc::new(Shared(storage.clone())))
            .runner_storage(Arc::new(registry.join()))
            .runner_id(id)
            .secret(secret())
            .shards(SHARDS)
            .membership_poll(Duration::from_millis(50))
            .call_timeout(Duration::from_secs(10))
            .register::<Probe>()
            .start()
            .await
            .unwrap();
        CLUSTERS
            .lock()
            .unwrap()
            .insert(id.to_owned(), cluster.clone());
        runners.push(cluster);
    }
    until(
        "every shard owned, by all three",
        Duration::from_secs(5),
        || {
            runners
                .iter()
                .map(|c| c.owned_shards().len())
                .sum::<usize>()
                == SHARDS as usize
                && runners.iter().all(|c| !c.owned_shards().is_empty())
        },
    )
    .await;
    // Snowflakes: each runner leased its own machine id.
    let machines: std::collections::HashSet<u16> =
        runners.iter().map(|r| r.snowflake().machine_id()).collect();
    assert_eq!(machines.len(), 3, "distinct machine ids: {machines:?}");

    let owner = |id: &str| -> RunnerId {
        let shard = flotilla::sharding::ShardId::for_entity("default", id, SHARDS);
        runners
            .iter()
            .find(|r| r.owned_shards().contains(&shard))
            .unwrap()
            .runner_id()
            .clone()
    };
    // A caller on one runner, a target on another.
    let caller_id = "x-caller".to_owned();
    let target_id = (0..)
        .map(|i| format!("x-target-{i}"))
        .find(|t| owner(t) != owner(&caller_id))
        .unwrap();
    let caller_runner = owner(&caller_id);
    let via = caller_runner.to_string();
    let (mine, theirs) = runners[0]
        .client::<Probe>(&caller_id)
        .relay(via.clone(), target_id.clone(), 7)
        .await
        .unwrap();
    assert_eq!(mine.runner.as_deref(), Some(caller_runner.as_str()));
    assert_eq!(theirs.runner, Some(owner(&target_id).to_string()));
    assert_ne!(theirs.runner, mine.runner, "the call crossed runners");
    assert_eq!(theirs.trace_id, mine.trace_id, "same trace");
    assert_eq!(
        theirs.parent_span_id, mine.span_id,
        "the caller's span is the parent"
    );
    assert_eq!(theirs.sender_runner, mine.runner);
    assert_eq!(theirs.sender_shard, mine.shard);

    // The target's handler span, on the other runner, records the link.
    let recorded = spans.message_spans(&target_id, "record");
    assert!(
        recorded
            .iter()
            .any(|f| f.get("trace_id") == mine.trace_id.as_ref()
                && f.get("parent_span_id") == mine.span_id.as_ref()
                && f.get("span_id") == theirs.span_id.as_ref()),
        "{recorded:?}"
    );
    // And so does the stored message.
    let stored = SAVED_HEADERS.lock().unwrap()[&target_id].clone();
    assert_eq!(
        stored.get(context::TRACEPARENT_HEADER),
        Some(&format!(
            "00-{}-{}-01",
            mine.trace_id.as_deref().unwrap(),
            mine.span_id.as_deref().unwrap()
        ))
    );

    // Volatile calls carry it over the wire too.
    let (mine, theirs) = runners[0]
        .client::<Probe>(&caller_id)
        .relay_look(via, target_id.clone())
        .await
        .unwrap();
    assert_ne!(theirs.runner, mine.runner);
    assert_eq!(theirs.trace_id, mine.trace_id);
    assert_eq!(theirs.parent_span_id, mine.span_id);
    assert_eq!(theirs.sender_runner, mine.runner);
    assert_eq!(theirs.sender_shard, mine.shard);
    for r in runners {
        assert!(r.shutdown().await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_resumed_after_a_restart_keeps_its_traceparent() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Cluster::builder()
            .sqlite(dir.path().join("flotilla.db"))
            .register::<Probe>()
            .start()
    };
    let cluster = start().await.unwrap();
    CLUSTERS
        .lock()
        .unwrap()
        .insert("restart".to_owned(), cluster.clone());
    let sender = cluster
        .client::<Probe>("restart-caller")
        .record_later("restart".into(), "restart-target".into(), 3, 1_500)
        .await
        .unwrap();
    // Stored, not yet due: shut down before it is.
    let storage = cluster.storage().clone();
    let query = || UnprocessedQuery {
        ready_at: i64::MAX,
        after: None,
        limit: 10,
        shards: ShardFilter::All,
    };
    let started = Instant::now();
    while storage.unprocessed(query()).await.unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "never stored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cluster.shutdown().await);
    assert!(!RECORDED.lock().unwrap().contains_key("restart-target/3"));

    let restarted = start().await.unwrap();
    until("the resumed message ran", Duration::from_secs(10), || {
        RECORDED.lock().unwrap().contains_key("restart-target/3")
    })
    .await;
    let theirs = RECORDED.lock().unwrap()["restart-target/3"].clone();
    assert_eq!(
        theirs.trace_id, sender.trace_id,
        "same trace after the restart"
    );
    assert_eq!(
        theirs.parent_span_id, sender.span_id,
        "the sender's span is the parent"
    );
    assert_eq!(theirs.sender_shard, sender.shard);
    restarted.shutdown().await;
}

mod shard_id {
    use flotilla::sharding::ShardId;
    use proptest::prelude::*;

    proptest! {
        /// `ShardId`'s `Display` and `FromStr` round-trip for every non-empty
        /// group (colons included: the index is after the last one).
        #[test]
        fn display_and_from_str_round_trip(group in "\\PC{1,40}", index: u32) {
            let shard = ShardId::new(group.as_str(), index);
            let text = shard.to_string();
            prop_assert_eq!(text.parse::<ShardId>(), Ok(shard));
        }

        /// Whatever else parses is exactly what prints back.
        #[test]
        fn parsing_is_the_inverse_of_printing(text in "\\PC{0,20}(:[0-9]{0,12})?") {
            if let Ok(shard) = text.parse::<ShardId>() {
                let printed = shard.to_string();
                prop_assert_eq!(printed.parse::<ShardId>(), Ok(shard));
            }
        }
    }

    #[test]
    fn an_empty_group_or_a_bad_index_is_refused() {
        for bad in [
            "",
            ":1",
            "default",
            "default:",
            "default:-1",
            "default:x",
            "default:4294967296",
        ] {
            assert!(bad.parse::<ShardId>().is_err(), "{bad:?}");
        }
    }
}
