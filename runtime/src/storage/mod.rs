//! Message storage: the seam between the runtime and a database.
//!
//! [`MessageStorage`] has three implementations: [`MemoryStorage`] (tests,
//! ephemeral services), SQLite (the embedded default) and, with the cluster,
//! PostgreSQL. One conformance suite (`runtime/tests/storage_conformance`) runs
//! against each of them.
//!
//! The trait is batch-shaped on purpose: the runtime coalesces the writes of
//! concurrent callers and handlers into one [`WriteBatch`], and a backend
//! commits a batch in one transaction (group commit). One row per commit
//! cannot reach the throughput targets.

#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod columns;
mod memory;
mod memory_runners;
#[cfg(feature = "postgres")]
mod postgres;
mod runners;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;

pub use memory::MemoryStorage;
pub use memory_runners::MemoryRunners;
#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_PREFIX, PostgresRunners, PostgresStorage};
pub use runners::{Epoch, Fence, MACHINE_IDS, RunnerInfo, RunnerStorage, Signal};
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStorage;

use crate::error::StorageError;
use crate::sharding::{EntityAddress, ShardId};
use crate::snowflake::Snowflake;

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

/// The unique id of one message (a snowflake; never derived from the payload).
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct MessageId(pub i64);

impl From<Snowflake> for MessageId {
    fn from(id: Snowflake) -> Self {
        Self(id.as_i64())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// The dedup key of a message with a `primary_key`: entity type, entity id,
/// rpc tag and key, each part escaped so that no two distinct tuples share a
/// key. Stored in its own unique column.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageKey(String);

impl MessageKey {
    /// The key of `primary_key` sent with rpc `tag` to `entity_type`/`entity_id`.
    pub fn new(entity_type: &str, entity_id: &str, tag: &str, primary_key: &str) -> Self {
        let mut key = String::with_capacity(
            entity_type.len() + entity_id.len() + tag.len() + primary_key.len() + 3,
        );
        for (i, part) in [entity_type, entity_id, tag, primary_key]
            .iter()
            .enumerate()
        {
            if i > 0 {
                key.push('/');
            }
            for c in part.chars() {
                match c {
                    '%' => key.push_str("%25"),
                    '/' => key.push_str("%2F"),
                    c => key.push(c),
                }
            }
        }
        Self(key)
    }

    /// Wraps a key read back from storage.
    pub fn from_stored(key: String) -> Self {
        Self(key)
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageKey({})", self.0)
    }
}

/// Headers that travel with a message (trace context, sender).
pub type Headers = BTreeMap<String, String>;

/// A persisted message to store: the same shape as what is read back.
pub type NewMessage = StoredMessage;

/// A persisted message, as stored and as read back while unprocessed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Unique id.
    pub id: MessageId,
    /// The target entity.
    pub address: EntityAddress,
    /// The rpc name.
    pub tag: String,
    /// Dedup key.
    pub key: Option<MessageKey>,
    /// The encoded request.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Headers,
    /// Not to be handled before this instant.
    pub deliver_at: Option<UnixMillis>,
    /// When it was stored.
    pub created_at: UnixMillis,
}

/// The recorded outcome of a processed message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StoredReply {
    /// The handler returned; the encoded reply (which may itself be the
    /// handler's `Err`).
    Ok(Vec<u8>),
    /// The handler panicked; the panic message.
    Panicked(String),
    /// The handler's staged effects failed to commit; the database's message.
    EffectsFailed(String),
    /// The runtime could not handle the message (its payload does not decode).
    Rejected(String),
}

/// The state of one entity, saved with a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityState {
    /// Entity type name.
    pub entity_type: String,
    /// Entity id.
    pub entity_id: String,
    /// Encoded state.
    pub bytes: Vec<u8>,
}

/// A value bound to a staged statement's placeholder.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SqlValue {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}
impl From<i32> for SqlValue {
    fn from(v: i32) -> Self {
        Self::Int(v.into())
    }
}
impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        Self::Real(v)
    }
}
impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}
impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        Self::Text(v.to_owned())
    }
}
impl From<Vec<u8>> for SqlValue {
    fn from(v: Vec<u8>) -> Self {
        Self::Blob(v)
    }
}
impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// A SQL statement with bound values, staged by a persisted handler to run in
/// its completion transaction ([`EntityContext::stage`](crate::EntityContext::stage)).
///
/// ```
/// use flotilla::storage::Statement;
/// let audit = Statement::new("INSERT INTO audit (account, amount) VALUES (?, ?)")
///     .bind("acct-42")
///     .bind(100_i64);
/// assert_eq!(audit.params().len(), 2);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    sql: String,
    params: Vec<SqlValue>,
}

impl Statement {
    /// A statement with no bound values yet.
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Vec::new(),
        }
    }

    /// Binds the next placeholder.
    pub fn bind(mut self, value: impl Into<SqlValue>) -> Self {
        self.params.push(value.into());
        self
    }

    /// The SQL text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The bound values, in placeholder order.
    pub fn params(&self) -> &[SqlValue] {
        &self.params
    }
}

/// The completion of one processed message: its reply, and what commits with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The message.
    pub message_id: MessageId,
    /// Its reply.
    pub reply: StoredReply,
    /// The entity's new state (`state = persisted`).
    pub state: Option<EntityState>,
    /// Statements staged by the handler.
    pub effects: Vec<Statement>,
    /// The shard ownership this completion was made under. When set, the
    /// completion commits only if the shard's epoch in storage still equals
    /// it (else [`CompletionOutcome::Fenced`]); a backend with a single
    /// runner (memory, SQLite) owns every shard and ignores it.
    pub fence: Option<Fence>,
}

/// Writes to commit in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteBatch {
    /// Messages to store.
    pub saves: Vec<NewMessage>,
    /// Messages to mark processed, with their replies.
    pub completions: Vec<Completion>,
}

impl WriteBatch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.saves.is_empty() && self.completions.is_empty()
    }
}

/// What became of one saved message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Stored as a new message.
    Saved,
    /// A message with the same key exists (stored earlier, or earlier in the
    /// same batch): its id and, if it was processed, its reply. Nothing was written.
    Duplicate {
        /// The existing message.
        id: MessageId,
        /// Its reply, if processed.
        reply: Option<StoredReply>,
    },
}

/// What became of one completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompletionOutcome {
    /// Reply, processed mark, state and effects committed together.
    Recorded,
    /// A staged effect failed: the effects and the state were rolled back and
    /// the reply `StoredReply::EffectsFailed(message)` was recorded instead.
    EffectsFailed(String),
    /// The message was already processed (or is unknown); nothing was written.
    /// Carries the reply recorded earlier, if any.
    AlreadyProcessed(Option<StoredReply>),
    /// The completion's [`Fence`] is stale: the shard was acquired again
    /// (by another runner, or by this one after losing its lock) since the
    /// handler ran. Nothing was written; the new owner runs the message.
    Fenced {
        /// The epoch the completion carried.
        stale: Epoch,
        /// The shard's epoch in storage (`None` if it was never acquired).
        current: Option<Epoch>,
    },
}

/// The result of committing a [`WriteBatch`], item for item in batch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// One per `WriteBatch::saves` entry.
    pub saves: Vec<SaveOutcome>,
    /// One per `WriteBatch::completions` entry.
    pub completions: Vec<CompletionOutcome>,
}

/// Which shards a read covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ShardFilter {
    /// Every shard (a single runner owns them all).
    #[default]
    All,
    /// Only these shards (the ones a runner of a cluster owns). Empty: none.
    Only(Vec<ShardId>),
}

impl ShardFilter {
    /// Whether `shard` passes the filter.
    pub fn contains(&self, shard: &ShardId) -> bool {
        match self {
            Self::All => true,
            Self::Only(shards) => shards.contains(shard),
        }
    }
}

/// Which unprocessed messages to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnprocessedQuery {
    /// Only messages whose `deliver_at` is absent or at or before this instant.
    pub ready_at: UnixMillis,
    /// Only messages with an id greater than this (paging).
    pub after: Option<MessageId>,
    /// At most this many, in id order.
    pub limit: usize,
    /// Only messages of these shards.
    pub shards: ShardFilter,
}

/// Durable storage of persisted messages, their replies and entity state.
#[async_trait]
pub trait MessageStorage: Send + Sync + fmt::Debug + 'static {
    /// Commits `batch` in one transaction and reports each item's outcome.
    ///
    /// Saves: a message whose key already exists (in storage or earlier in
    /// the batch) is not written; its outcome is `Duplicate`. Completions: the
    /// reply, the processed mark, the state and the effects of one completion
    /// commit together or not at all; a failing effect rolls back only its own
    /// completion (a savepoint), which is then recorded as `EffectsFailed`.
    /// An `Err` means nothing of the batch was committed.
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError>;

    /// Unprocessed messages that are ready, in id order.
    async fn unprocessed(
        &self,
        query: UnprocessedQuery,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// The earliest `deliver_at` later than `after` of an unprocessed
    /// message of the `shards`.
    async fn next_delivery(
        &self,
        after: UnixMillis,
        shards: &ShardFilter,
    ) -> Result<Option<UnixMillis>, StorageError>;

    /// The reply of a processed message; `None` while unprocessed or unknown.
    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError>;

    /// The saved state of an entity.
    async fn load_state(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Vec<u8>>, StorageError>;

    /// Deletes processed messages (and their replies) processed before
    /// `processed_before`; returns how many. This bounds the dedup window.
    async fn purge_processed(&self, processed_before: UnixMillis) -> Result<u64, StorageError>;

    /// Closes connections; later calls fail with `StorageError::Closed`.
    async fn close(&self);
}
