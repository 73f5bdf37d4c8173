//! The cluster: builder, start, routing of calls, shutdown.

mod delivery;
mod group_commit;

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::EntityRef;
use crate::config::{ClusterConfig, StorageConfig};
use crate::entity::Entity;
use crate::entity::manager::{EntityManager, StoredDispatch, message_span};
use crate::error::{ClusterError, StartError};
use crate::sharding::{EntityAddress, RunnerId};
use crate::snowflake::{Snowflake, SnowflakeGenerator, now_unix_ms};
use crate::storage::{MemoryStorage, MessageStorage};

pub(crate) use delivery::{InFlight, ReplyWaiters};
use group_commit::GroupCommit;

/// What every entity manager shares: storage, the writer, ids, shutdown.
pub(crate) struct Services {
    pub(crate) config: ClusterConfig,
    pub(crate) runner: RunnerId,
    pub(crate) ids: Arc<SnowflakeGenerator>,
    pub(crate) storage: Arc<dyn MessageStorage>,
    pub(crate) writer: GroupCommit,
    pub(crate) waiters: Arc<ReplyWaiters>,
    pub(crate) in_flight: InFlight,
    pub(crate) wake_delivery: Notify,
    pub(crate) shutdown: CancellationToken,
    /// Entity tasks: waited for first on shutdown.
    pub(crate) entity_tasks: TaskTracker,
    /// Background tasks (delivery, retention, rejections).
    pub(crate) tasks: TaskTracker,
}

/// One registered entity type: typed for clients, erased for delivery.
struct RegisteredType {
    typed: Box<dyn Any + Send + Sync>,
    erased: Arc<dyn StoredDispatch>,
}

/// The shared core behind a [`Cluster`] handle and every client.
pub(crate) struct ClusterCore {
    svc: Arc<Services>,
    types: HashMap<&'static str, RegisteredType>,
    writer_tasks: TaskTracker,
}

impl Deref for ClusterCore {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.svc
    }
}

impl ClusterCore {
    fn manager<E: Entity>(&self) -> Option<&Arc<EntityManager<E>>> {
        self.types.get(E::NAME)?.typed.downcast_ref()
    }

    /// Routes one call and waits for its reply.
    pub(crate) async fn call<E: Entity>(
        &self,
        address: &EntityAddress,
        request: E::Request,
        timeout: Duration,
        deliver_at: Option<SystemTime>,
    ) -> Result<E::Reply, ClusterError> {
        if self.shutdown.is_cancelled() {
            return Err(ClusterError::ShuttingDown);
        }
        let manager = self
            .manager::<E>()
            .ok_or_else(|| ClusterError::UnknownEntityType(E::NAME.to_owned()))?;
        let info = E::describe(&request);
        if !info.persisted {
            let span = message_span(address, info.tag, "volatile", None);
            return tokio::time::timeout(timeout, manager.call_volatile(address, request, span))
                .await
                .unwrap_or(Err(ClusterError::Timeout(timeout)));
        }
        let span = message_span(address, info.tag, "persisted", None);
        // A scheduled message's deadline runs from its delivery time.
        let delay = deliver_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        tokio::time::timeout(
            timeout + delay,
            manager.call_persisted(address, info, request, deliver_at, span),
        )
        .await
        .unwrap_or(Err(ClusterError::Timeout(timeout)))
    }
}

/// A running Flotilla cluster (on SQLite, one runner). Cheap to clone.
///
/// ```no_run
/// use flotilla::prelude::*;
///
/// #[derive(Default)]
/// struct Counter { n: u64 }
///
/// #[entity]
/// impl Counter {
///     #[rpc]
///     async fn add(&mut self, by: u64) -> u64 { self.n += by; self.n }
/// }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = Cluster::builder().register::<Counter>().start().await?;
/// let total = cluster.client::<Counter>("c-1").add(2).await?;
/// assert_eq!(total, 2);
/// cluster.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Cluster {
    core: Arc<ClusterCore>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("runner", &self.core.runner)
            .field("storage", &self.core.storage)
            .field("entity_types", &self.core.types.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Cluster {
    /// A builder with the defaults: SQLite at `flotilla.db`, 300 shards.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// The typed client of entity `id` of type `E`.
    pub fn client<E: Entity>(&self, id: impl AsRef<str>) -> E::Client {
        E::Client::from(self.entity_ref::<E>(id))
    }

    /// The untyped reference behind a client.
    pub fn entity_ref<E: Entity>(&self, id: impl AsRef<str>) -> EntityRef<E> {
        EntityRef::new(self.core.clone(), id.as_ref())
    }

    /// This runner's id.
    pub fn runner_id(&self) -> &RunnerId {
        &self.core.runner
    }

    /// A new cluster-unique, time-ordered id.
    pub fn snowflake(&self) -> Snowflake {
        self.core.ids.next_id()
    }

    /// The configuration the cluster runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.core.config
    }

    /// The message storage.
    pub fn storage(&self) -> &Arc<dyn MessageStorage> {
        &self.core.storage
    }

    /// Active entities of the type named `entity_type` on this runner.
    pub fn active_entities(&self, entity_type: &str) -> usize {
        self.core
            .types
            .get(entity_type)
            .map_or(0, |t| t.erased.active())
    }

    /// Stops gracefully: takes no new calls, lets every handler under way
    /// finish and record its reply (within `shutdown_timeout`), leaves queued
    /// persisted messages stored for the next start, and closes storage.
    /// Returns false if handlers were still running at the timeout.
    pub async fn shutdown(&self) -> bool {
        let core = &self.core;
        core.shutdown.cancel();
        for registered in core.types.values() {
            registered.erased.stop_all();
        }
        core.entity_tasks.close();
        core.tasks.close();
        let finished = tokio::time::timeout(core.config.shutdown_timeout, async {
            core.entity_tasks.wait().await;
            core.tasks.wait().await;
        })
        .await
        .is_ok();
        if !finished {
            tracing::warn!(timeout = ?core.config.shutdown_timeout, "handlers still running at shutdown timeout");
        }
        core.writer.close();
        core.writer_tasks.close();
        core.writer_tasks.wait().await;
        core.storage.close().await;
        finished
    }
}

/// Builds and starts a [`Cluster`].
#[derive(Default)]
pub struct ClusterBuilder {
    config: ClusterConfig,
    storage: Option<Arc<dyn MessageStorage>>,
    registrations: Vec<Registration>,
}

type Registration = (&'static str, fn(Arc<Services>) -> RegisteredType);

impl fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("config", &self.config)
            .field(
                "entity_types",
                &self.registrations.iter().map(|r| r.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl ClusterBuilder {
    /// Replaces the whole configuration (e.g. with `ClusterConfig::from_env()?`).
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.config = config;
        self
    }

    /// Stores messages in the SQLite file at `path`.
    pub fn sqlite(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.config.storage = StorageConfig::Sqlite { path: path.into() };
        self
    }

    /// Stores messages in memory (nothing survives the process).
    pub fn memory(mut self) -> Self {
        self.config.storage = StorageConfig::Memory;
        self
    }

    /// Stores messages in PostgreSQL at `url` (the `postgres` feature): every
    /// process started this way on one database (and table prefix) forms one
    /// cluster. Needs [`secret`](Self::secret) unless [`client_only`](Self::client_only).
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.config.storage = StorageConfig::Postgres {
            url: url.into(),
            prefix: crate::config::DEFAULT_TABLE_PREFIX.to_owned(),
        };
        self
    }

    /// The table prefix on PostgreSQL (default `flotilla_`): clusters with
    /// different prefixes share a database without meeting.
    pub fn table_prefix(mut self, table_prefix: impl Into<String>) -> Self {
        if let StorageConfig::Postgres { prefix, .. } = &mut self.config.storage {
            *prefix = table_prefix.into();
        }
        self
    }

    /// The address the runner transport listens on (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }

    /// The address other runners reach this one at (default: the bound
    /// listen address).
    pub fn advertise(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.advertise = Some(addr);
        self
    }

    /// The cluster secret that authenticates the runner transport.
    pub fn secret(mut self, secret: crate::transport::ClusterSecret) -> Self {
        self.config.secret = Some(secret);
        self
    }

    /// This runner's id (default `<hostname>-<pid>`).
    pub fn runner_id(mut self, id: impl Into<String>) -> Self {
        self.config.runner_id = Some(id.into());
        self
    }

    /// This runner's share of shards relative to the others (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.config.weight = weight;
        self
    }

    /// Sends calls but owns no shards and runs no entities.
    pub fn client_only(mut self) -> Self {
        self.config.client_only = true;
        self
    }

    /// Stop handlers of shards whose locks could not be confirmed for this
    /// long (default 2 s; below `lock_timeout`).
    pub fn fence_after(mut self, after: Duration) -> Self {
        self.config.fence_after = after;
        self
    }

    /// How long PostgreSQL keeps a silent runner's locks (default 5 s).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.config.lock_timeout = timeout;
        self
    }

    /// How often the live runner set is read (default 200 ms).
    pub fn membership_poll(mut self, every: Duration) -> Self {
        self.config.membership_poll = every;
        self
    }

    /// Uses a storage backend you opened yourself.
    pub fn storage(mut self, storage: Arc<dyn MessageStorage>) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Number of shards (default 300). Fixed for the life of the data.
    pub fn shards(mut self, shards: u32) -> Self {
        self.config.shards = shards;
        self
    }

    /// Default deadline of a call (default 30 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// Largest encoded request (default 1 MiB).
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.config.max_payload_bytes = bytes;
        self
    }

    /// Interval of the safety scan for stored messages (default 2 s).
    pub fn safety_poll(mut self, interval: Duration) -> Self {
        self.config.safety_poll = interval;
        self
    }

    /// Registers an entity type.
    pub fn register<E: Entity>(mut self) -> Self {
        fn make<E: Entity>(svc: Arc<Services>) -> RegisteredType {
            let manager = EntityManager::<E>::new(svc);
            RegisteredType {
                typed: Box::new(manager.clone()),
                erased: Arc::new(manager),
            }
        }
        self.registrations.push((E::NAME, make::<E>));
        self
    }

    /// Opens storage (applying migrations), resumes every unprocessed
    /// message, and starts serving.
    pub async fn start(self) -> Result<Cluster, StartError> {
        let config = self.config;
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        for (name, _) in &self.registrations {
            if !seen.insert(*name) {
                return Err(StartError::DuplicateEntityType(name));
            }
        }
        let storage: Arc<dyn MessageStorage> = match (self.storage, &config.storage) {
            (Some(storage), _) => storage,
            (None, StorageConfig::Memory) => Arc::new(MemoryStorage::new()),
            #[cfg(feature = "sqlite")]
            (None, StorageConfig::Sqlite { path }) => {
                Arc::new(crate::storage::SqliteStorage::open(path).await?)
            }
            #[cfg(feature = "postgres")]
            (None, StorageConfig::Postgres { url, prefix }) => {
                Arc::new(crate::storage::PostgresStorage::connect(url, prefix).await?)
            }
            #[cfg(not(feature = "postgres"))]
            (None, StorageConfig::Postgres { .. }) => {
                return Err(crate::error::ConfigError::Invalid {
                    setting: "storage",
                    reason: "PostgreSQL storage needs the `postgres` feature".to_owned(),
                }
                .into());
            }
            #[cfg(not(feature = "sqlite"))]
            (None, StorageConfig::Sqlite { .. }) => {
                return Err(crate::error::ConfigError::Invalid {
                    setting: "storage",
                    reason: "SQLite storage needs the `sqlite` feature".to_owned(),
                }
                .into());
            }
        };
        let writer_tasks = TaskTracker::new();
        let writer = GroupCommit::start(storage.clone(), config.max_batch, &writer_tasks);
        let runner = RunnerId::new(format!("local-{}", std::process::id()));
        let svc = Arc::new(Services {
            ids: Arc::new(SnowflakeGenerator::new(config.machine_id)),
            config,
            runner,
            storage,
            writer,
            waiters: Arc::default(),
            in_flight: InFlight::default(),
            wake_delivery: Notify::new(),
            shutdown: CancellationToken::new(),
            entity_tasks: TaskTracker::new(),
            tasks: TaskTracker::new(),
        });
        let types = self
            .registrations
            .into_iter()
            .map(|(name, make)| (name, make(svc.clone())))
            .collect();
        let core = Arc::new(ClusterCore {
            svc: svc.clone(),
            types,
            writer_tasks,
        });
        svc.tasks.spawn(delivery::run(core.clone()));
        for registered in core.types.values() {
            svc.tasks
                .spawn(idle_sweeper(svc.clone(), registered.erased.clone()));
        }
        svc.tasks.spawn(retention(svc.clone()));
        tracing::info!(runner = %svc.runner, "flotilla cluster started");
        Ok(Cluster { core })
    }
}

/// Passivates idle entities of one type. It runs every quarter of `max_idle`
/// (at least every 10 ms, at most every 10 s), so an entity is passivated
/// between `max_idle` and `max_idle` plus that period after its last message.
async fn idle_sweeper(svc: Arc<Services>, entities: Arc<dyn StoredDispatch>) {
    let every = (entities.max_idle() / 4).clamp(Duration::from_millis(10), Duration::from_secs(10));
    loop {
        tokio::select! {
            () = svc.shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => entities.passivate_idle(),
        }
    }
}

/// Deletes processed messages older than the retention, periodically.
async fn retention(svc: Arc<Services>) {
    let every = (svc.config.retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    loop {
        tokio::select! {
            () = svc.shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let cutoff = now_unix_ms() as i64 - svc.config.retention.as_millis() as i64;
        match svc.storage.purge_processed(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(purged = n, "purged processed messages past retention"),
            Err(error) => tracing::warn!(%error, "purging processed messages failed"),
        }
    }
}
