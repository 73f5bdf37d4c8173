//! The cluster: builder, start, routing of calls, shutdown.

mod delivery;
mod group_commit;
mod membership;
mod ownership;
mod routing;
mod wire;

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
use crate::singleton::manager::{Registration as SingletonRegistration, Registry};
use crate::singleton::{SINGLETON_TYPE, Singleton, SingletonHealth};
use crate::snowflake::{Snowflake, SnowflakeGenerator, now_unix_ms};
use crate::storage::{MemoryStorage, MessageStorage, RunnerStorage};
use crate::time::{Clock, SystemClock};
use crate::transport::{ServerHandle, Transport};

pub(crate) use delivery::{InFlight, ReplyWait, ReplyWaiters};
use group_commit::GroupCommit;
use ownership::Ownership;

/// What every entity manager shares: storage, the writer, ids, shutdown.
pub(crate) struct Services {
    pub(crate) config: ClusterConfig,
    pub(crate) runner: RunnerId,
    pub(crate) ids: Arc<SnowflakeGenerator>,
    pub(crate) storage: Arc<dyn MessageStorage>,
    /// Which shards this runner owns, and where the others are served.
    pub(crate) ownership: Arc<Ownership>,
    /// The runner registry and shard locks (clusters only).
    pub(crate) runners: Option<Arc<dyn RunnerStorage>>,
    /// The link to other runners (clusters with a secret only).
    pub(crate) transport: Option<Arc<dyn Transport>>,
    pub(crate) writer: GroupCommit,
    pub(crate) waiters: Arc<ReplyWaiters>,
    pub(crate) in_flight: InFlight,
    pub(crate) wake_delivery: Notify,
    pub(crate) shutdown: CancellationToken,
    /// Stops the membership task: after the handlers finished on shutdown,
    /// so the locks stay confirmed while their completions commit.
    pub(crate) membership_stop: CancellationToken,
    /// Entity tasks: waited for first on shutdown.
    pub(crate) entity_tasks: TaskTracker,
    /// Background tasks (delivery, retention, rejections).
    pub(crate) tasks: TaskTracker,
    /// Whether this runner runs the leader singleton (`context::is_leader`).
    pub(crate) leader: Arc<crate::context::LeaderStatus>,
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
    /// The runner transport's server (cluster runners only).
    server: std::sync::Mutex<Option<ServerHandle>>,
    /// The address the transport listens on.
    transport_address: Option<std::net::SocketAddr>,
    /// The registered singletons.
    singletons: Arc<Registry>,
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
            if self.ownership.is_cluster() {
                return self
                    .call_volatile_routed(manager, address, request, timeout)
                    .await;
            }
            // One runner: straight to the mailbox, nothing encoded.
            let span = message_span(address, info.tag, "volatile", None);
            return tokio::time::timeout(timeout, manager.call_volatile(address, request, span))
                .await
                .unwrap_or(Err(ClusterError::Timeout(timeout)));
        }
        // A scheduled message's deadline runs from its delivery time.
        let delay = deliver_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        tokio::time::timeout(
            timeout + delay + Duration::from_millis(50),
            self.call_persisted_routed(manager, address, request, deliver_at, timeout),
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

    /// The services every context of this runner shares (`http` layer).
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn services(&self) -> &Arc<Services> {
        &self.core.svc
    }

    /// The configuration the cluster runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.core.config
    }

    /// The message storage.
    pub fn storage(&self) -> &Arc<dyn MessageStorage> {
        &self.core.storage
    }

    /// The shards this runner owns now, sorted (every shard on a single
    /// runner is owned implicitly: empty there).
    pub fn owned_shards(&self) -> Vec<crate::sharding::ShardId> {
        self.core.ownership.owned()
    }

    /// The live runners as last read from storage (this runner alone on a
    /// single runner).
    pub fn live_runners(&self) -> Vec<RunnerId> {
        self.core.ownership.live()
    }

    /// The address the runner transport listens on (`None` on a single
    /// runner and in client-only mode).
    pub fn transport_address(&self) -> Option<std::net::SocketAddr> {
        self.core.transport_address
    }

    /// The health of every registered singleton as this runner sees it
    /// (what health endpoints report): a cron singleton owned here with no
    /// run within twice its interval, or a plain one that is failing, is
    /// unhealthy.
    pub fn singleton_health(&self) -> Vec<SingletonHealth> {
        self.core.singletons.health(&self.core.svc)
    }

    /// Whether this runner is the cluster's leader: it owns the shard of
    /// the name `"flotilla.leader"` (always true on a single runner while
    /// it runs; never in client-only mode).
    pub fn is_leader(&self) -> bool {
        crate::singleton::manager::is_leader(&self.core.svc)
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
            core.membership_stop.cancel();
            core.tasks.wait().await;
        })
        .await
        .is_ok();
        core.membership_stop.cancel();
        if !finished {
            tracing::warn!(timeout = ?core.config.shutdown_timeout, "handlers still running at shutdown timeout");
        }
        if core.ownership.is_cluster() {
            // Completions of the handlers above are committed: give the
            // shards up at once, so others take them without waiting for a
            // lock to expire.
            core.ownership.clear_owned();
            if let Some(runners) = &core.runners
                && core.transport_address.is_some()
                && let Err(error) = runners.unregister().await
            {
                tracing::warn!(%error, "unregistering the runner failed; its locks go with its connection");
            }
            let server = core
                .server
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(server) = server {
                server.stop(Duration::from_secs(1)).await;
            }
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
    runners: Option<Arc<dyn RunnerStorage>>,
    registrations: Vec<Registration>,
    singletons: Vec<SingletonRegistration>,
    clock: Option<Arc<dyn Clock>>,
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
            .field(
                "singletons",
                &self.singletons.iter().map(|r| r.name).collect::<Vec<_>>(),
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

    /// Joins a cluster through a runner registry you opened yourself (for
    /// example [`MemoryRunners`](crate::storage::MemoryRunners) to run
    /// several runners in one process in tests). PostgreSQL storage brings
    /// its own.
    pub fn runner_storage(mut self, runners: Arc<dyn RunnerStorage>) -> Self {
        self.runners = Some(runners);
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

    /// Registers a singleton (generated by `#[singleton]`).
    pub fn singleton<T: Singleton>(mut self) -> Self {
        self.singletons.push(SingletonRegistration::of::<T>());
        self
    }

    /// The clock singletons read "now" from and sleep on (default the
    /// system clock; a [`ManualClock`](crate::time::ManualClock) in tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
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
        let mut seen = std::collections::HashSet::new();
        for registration in &self.singletons {
            if !seen.insert(registration.name) {
                return Err(StartError::DuplicateSingleton(registration.name));
            }
            if let Err(error) = registration.schedule() {
                return Err(crate::error::ConfigError::Invalid {
                    setting: "singleton",
                    reason: format!("singleton `{}`: {error}", registration.name),
                }
                .into());
            }
        }
        let singletons = Extras {
            singletons: self.singletons,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
        };
        #[cfg(feature = "postgres")]
        let mut postgres_runners: Option<Arc<dyn RunnerStorage>> = None;
        let storage: Arc<dyn MessageStorage> = match (self.storage, &config.storage) {
            (Some(storage), _) => storage,
            (None, StorageConfig::Memory) => Arc::new(MemoryStorage::new()),
            #[cfg(feature = "sqlite")]
            (None, StorageConfig::Sqlite { path }) => {
                Arc::new(crate::storage::SqliteStorage::open(path).await?)
            }
            #[cfg(feature = "postgres")]
            (None, StorageConfig::Postgres { url, prefix }) => {
                let postgres = crate::storage::PostgresStorage::connect(url, prefix).await?;
                postgres_runners = Some(Arc::new(postgres.runners(config.lock_timeout)));
                Arc::new(postgres)
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
        #[cfg(feature = "postgres")]
        let runners = self.runners.or(postgres_runners);
        #[cfg(not(feature = "postgres"))]
        let runners = self.runners;
        match runners {
            None => Self::assemble(config, storage, self.registrations, singletons, None).await,
            Some(runners) => {
                let setup = async {
                    if config.secret.is_none() && !config.client_only {
                        return Err(StartError::Config(crate::error::ConfigError::Invalid {
                            setting: "secret",
                            reason: "a cluster runner needs the cluster secret (FLOTILLA_SECRET), \
                                     which authenticates the runner transport"
                                .to_owned(),
                        }));
                    }
                    let listener = if config.client_only {
                        None
                    } else {
                        let addr = config.listen;
                        Some(
                            tokio::net::TcpListener::bind(addr)
                                .await
                                .map_err(|source| StartError::Listen { addr, source })?,
                        )
                    };
                    Ok(listener)
                };
                match setup.await {
                    Ok(listener) => {
                        Self::assemble(
                            config,
                            storage,
                            self.registrations,
                            singletons,
                            Some((runners, listener)),
                        )
                        .await
                    }
                    Err(error) => {
                        storage.close().await;
                        Err(error)
                    }
                }
            }
        }
    }

    /// Wires services, entity types and background tasks together; with
    /// `cluster`, also the transport server and the membership task.
    async fn assemble(
        config: ClusterConfig,
        storage: Arc<dyn MessageStorage>,
        registrations: Vec<Registration>,
        extras: Extras,
        cluster: Option<(Arc<dyn RunnerStorage>, Option<tokio::net::TcpListener>)>,
    ) -> Result<Cluster, StartError> {
        let writer_tasks = TaskTracker::new();
        let writer = GroupCommit::start(storage.clone(), config.max_batch, &writer_tasks);
        let leader: Arc<crate::context::LeaderStatus> = Arc::default();
        let (runner, ownership, runners, listener) = match cluster {
            None => {
                let runner = RunnerId::new(
                    config
                        .runner_id
                        .clone()
                        .unwrap_or_else(|| format!("local-{}", std::process::id())),
                );
                (
                    runner.clone(),
                    Ownership::single(runner, leader.clone()),
                    None,
                    None,
                )
            }
            Some((runners, listener)) => {
                let runner =
                    RunnerId::new(config.runner_id.clone().unwrap_or_else(default_runner_id));
                (
                    runner.clone(),
                    Ownership::cluster(runner, leader.clone(), config.shards),
                    Some(runners),
                    listener,
                )
            }
        };
        let transport: Option<Arc<dyn Transport>> = match (&runners, &config.secret) {
            (Some(_), Some(secret)) => Some(Arc::new(crate::transport::TcpTransport::new(
                secret.clone(),
                crate::transport::TransportConfig::default(),
            ))),
            _ => None,
        };
        let transport_address = match &listener {
            Some(listener) => Some(listener.local_addr().map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?),
            None => None,
        };
        let svc = Arc::new(Services {
            ids: Arc::new(SnowflakeGenerator::new(config.machine_id)),
            config,
            runner,
            storage,
            ownership: Arc::new(ownership),
            runners,
            transport,
            writer,
            waiters: Arc::default(),
            in_flight: InFlight::default(),
            wake_delivery: Notify::new(),
            shutdown: CancellationToken::new(),
            membership_stop: CancellationToken::new(),
            entity_tasks: TaskTracker::new(),
            tasks: TaskTracker::new(),
            leader,
        });
        let mut types: HashMap<&'static str, RegisteredType> = registrations
            .into_iter()
            .map(|(name, make)| (name, make(svc.clone())))
            .collect();
        let singletons = Arc::new(
            Registry::new(&extras.singletons, svc.clone(), extras.clock).map_err(
                |(name, error)| crate::error::ConfigError::Invalid {
                    setting: "singleton",
                    reason: format!("singleton `{name}`: {error}"),
                },
            )?,
        );
        if !singletons.is_empty() {
            // Ticks and state records are stored under this internal type.
            types.insert(
                SINGLETON_TYPE,
                RegisteredType {
                    typed: Box::new(()),
                    erased: singletons.clone(),
                },
            );
        }
        let core = Arc::new(ClusterCore {
            svc: svc.clone(),
            types,
            writer_tasks,
            server: std::sync::Mutex::new(None),
            transport_address,
            singletons,
        });
        if let Some(runners) = svc.runners.clone()
            && let Err(error) = Self::join(&core, runners, listener).await
        {
            core.writer.close();
            core.writer_tasks.close();
            core.writer_tasks.wait().await;
            core.storage.close().await;
            return Err(error);
        }
        if core.transport_address.is_none() && core.ownership.is_cluster() {
            // Client-only: it sends, it does not serve.
            tracing::info!(runner = %svc.runner, "flotilla client started");
            return Ok(Cluster { core });
        }
        svc.tasks.spawn(delivery::run(core.clone()));
        for registered in core.types.values() {
            svc.tasks
                .spawn(idle_sweeper(svc.clone(), registered.erased.clone()));
        }
        svc.tasks.spawn(retention(svc.clone()));
        core.singletons.start(&svc);
        tracing::info!(runner = %svc.runner, "flotilla cluster started");
        Ok(Cluster { core })
    }

    /// Joins the cluster: listens for signals, starts the transport
    /// server, registers (runners), runs a first membership round (so the
    /// routing table is filled when `start` returns) and spawns the
    /// membership task.
    async fn join(
        core: &Arc<ClusterCore>,
        runners: Arc<dyn RunnerStorage>,
        listener: Option<tokio::net::TcpListener>,
    ) -> Result<(), StartError> {
        let signals = match runners.listen().await {
            Ok(signals) => Some(signals),
            Err(error) => {
                tracing::warn!(%error, "listening for cluster signals failed; relying on polls");
                None
            }
        };
        let me = match (listener, &core.config.secret) {
            (Some(listener), Some(secret)) => {
                let advertised = match core.config.advertise {
                    Some(addr) => addr,
                    None => listener.local_addr().map_err(|source| StartError::Listen {
                        addr: core.config.listen,
                        source,
                    })?,
                };
                let server = crate::transport::serve(
                    listener,
                    secret.clone(),
                    routing::handler(Arc::downgrade(core)),
                    crate::transport::TransportConfig::default(),
                )
                .await
                .map_err(|source| StartError::Listen {
                    addr: core.config.listen,
                    source,
                })?;
                *core
                    .server
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(server);
                let me = crate::storage::RunnerInfo {
                    id: core.runner.clone(),
                    address: advertised,
                    weight: core.config.weight,
                    groups: Vec::new(),
                };
                runners.register(&me).await?;
                Some(me)
            }
            _ => None,
        };
        // Snowflake ids (message ids among them) must not collide across
        // the processes of the cluster: each leases its machine id.
        let machine_id = runners.lease_machine_id(&core.runner).await?;
        core.ids.set_machine_id(machine_id);
        tracing::debug!(runner = %core.runner, machine_id, "leased a snowflake machine id");
        let mut membership = membership::Membership::new(core.clone(), runners, me);
        membership.round().await;
        core.tasks.spawn(membership.run(signals));
        Ok(())
    }
}

/// What the builder passes to `assemble` besides entity types.
struct Extras {
    singletons: Vec<SingletonRegistration>,
    clock: Arc<dyn Clock>,
}

/// Resolves when the process is asked to stop: SIGTERM (what Kubernetes and
/// systemd send) or Ctrl-C. Serve until it, then call
/// [`Cluster::shutdown`] so the runner hands its shards over at once.
///
/// ```no_run
/// # async fn run(cluster: flotilla::Cluster) {
/// flotilla::shutdown_signal().await;
/// cluster.shutdown().await;
/// # }
/// ```
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; waiting for Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `<hostname>-<pid>`: unique per process on a host, readable in logs.
fn default_runner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "runner".to_owned());
    format!("{host}-{}", std::process::id())
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
