//! Runner membership and shard ownership: the storage seam of a cluster.
//!
//! A runner is live while it holds a lock on its own id; it owns a shard
//! while it holds that shard's lock. Both locks live on one dedicated
//! connection (PostgreSQL: session advisory locks), so a runner that dies, or
//! whose connection dies, loses them all at once, and the others see it at
//! their next look at the live set, not after a heartbeat expires.
//!
//! Each acquisition of a shard bumps its [`Epoch`]. Every completion written
//! for the shard carries the epoch it was made under (a [`Fence`]); storage
//! refuses it if the epoch moved on, so a runner that lost a shard and does
//! not know it yet cannot commit anything for it.

use std::fmt;
use std::net::SocketAddr;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::error::StorageError;
use crate::sharding::{RunnerId, ShardId};

/// How many snowflake machine ids a cluster can lease at once.
pub const MACHINE_IDS: u16 = 1024;

/// The ownership generation of a shard: bumped by every acquisition.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub i64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The ownership a write was made under: it commits only while `shard`'s
/// epoch in storage is still `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The shard written for.
    pub shard: ShardId,
    /// Its epoch when the writer acquired it.
    pub epoch: Epoch,
}

/// A runner as registered: where others reach it and how much it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    /// Its id, unique in the cluster.
    pub id: RunnerId,
    /// The address its transport listens on, as others reach it.
    pub address: SocketAddr,
    /// Relative share of shards (1 = one share). At least 1.
    pub weight: u32,
    /// Shard groups it serves (empty: every group).
    pub groups: Vec<String>,
}

/// A wake-up sent between processes through storage (PostgreSQL
/// `NOTIFY`), always after the commit it announces.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Signal {
    /// A runner registered or left: read the live set again.
    MembershipChanged,
    /// Messages of this shard were stored by a process that could not tell
    /// the owner directly: its owner should scan it.
    MessagesReady(ShardId),
    /// Signals may have been missed (the listening connection was lost and
    /// opened again): read the live set and scan again.
    Lagged,
}

/// Runner registry and shard locks.
///
/// One value serves one runner: [`register`](Self::register) binds it to
/// that runner and opens the dedicated lock connection; the shard calls act
/// on that connection.
#[async_trait]
pub trait RunnerStorage: Send + Sync + fmt::Debug + 'static {
    /// Registers `runner` (or updates its row) and takes its liveness lock on
    /// a newly opened lock connection; an earlier lock connection of this
    /// value is closed first, which drops every lock it held. Fails with
    /// [`StorageError::RunnerIdInUse`] if a live runner holds that id.
    async fn register(&self, runner: &RunnerInfo) -> Result<(), StorageError>;

    /// The registered runners whose liveness lock is held, in id order.
    async fn live_runners(&self) -> Result<Vec<RunnerInfo>, StorageError>;

    /// Tries to lock each of `shards` without waiting; for every lock taken,
    /// bumps the shard's epoch and records this runner as its owner. Returns
    /// the shards taken with their new epochs; a shard another runner still
    /// holds is left out. Shards this value already holds are returned with
    /// their current epoch, not locked twice.
    async fn acquire(&self, shards: &[ShardId]) -> Result<Vec<(ShardId, Epoch)>, StorageError>;

    /// Unlocks `shards` (those not held are ignored), so another runner can
    /// take them at once.
    async fn release(&self, shards: &[ShardId]) -> Result<(), StorageError>;

    /// One round trip on the lock connection. `Ok` means every lock taken
    /// through it is still held; an `Err` means they may all be lost (the
    /// connection failed or was terminated) and the runner must stop serving
    /// its shards, then [`register`](Self::register) again.
    async fn confirm(&self) -> Result<(), StorageError>;

    /// Releases every lock, removes the registry row and closes the lock
    /// connection (graceful shutdown). Signals `MembershipChanged`.
    async fn unregister(&self) -> Result<(), StorageError>;

    /// Leases a snowflake machine id (0–1023) that no other live process of
    /// the cluster holds, for as long as this value's lock session lives:
    /// the one [`register`](Self::register) opened, or, for a process that
    /// never registers (client-only), one opened here for `holder`. Returns
    /// the id already leased on the current session, if any. After the
    /// session is lost, lease again. [`StorageError::InUse`] when all 1,024
    /// are held.
    async fn lease_machine_id(&self, holder: &RunnerId) -> Result<u16, StorageError>;

    /// Sends `signal` to every listening process.
    async fn signal(&self, signal: Signal) -> Result<(), StorageError>;

    /// Starts listening: every signal sent by any process (this one
    /// included) arrives on the returned channel until the storage is closed.
    async fn listen(&self) -> Result<mpsc::Receiver<Signal>, StorageError>;
}
