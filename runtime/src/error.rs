//! Error types, one per layer.
//!
//! [`ClusterError`] is what every client call returns. Its type parameter is the
//! handler's own error type, so an rpc declared as
//! `async fn deposit(..) -> Result<i64, AccountError>` is called as
//! `client.deposit(..).await: Result<i64, ClusterError<AccountError>>` and the
//! caller can `match` on `ClusterError::Handler(AccountError::..)`.

use std::convert::Infallible;
use std::time::Duration;

/// The error of a call to an entity.
///
/// `E` is the handler's own error type (`Infallible` for handlers that do not
/// return a `Result`). Every other variant is an infrastructure failure that the
/// runtime reports instead of panicking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError<E = Infallible> {
    /// The handler ran and returned `Err(E)`.
    #[error("handler returned an error: {0}")]
    Handler(E),
    /// No entity type of this name is registered on the cluster.
    #[error("unknown entity type `{0}`: register it with `Cluster::builder().register::<T>()`")]
    UnknownEntityType(String),
    /// The entity's mailbox is full; the volatile message was not enqueued.
    /// Retry later, or raise `#[entity(mailbox = N)]`.
    #[error(
        "mailbox of {entity_type}/{entity_id} is full ({capacity} messages); retry later or raise `mailbox`"
    )]
    MailboxFull {
        /// Entity type name.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// The mailbox capacity.
        capacity: usize,
    },
    /// No reply arrived before the call's deadline. A persisted message is
    /// still stored and will be handled; only the wait ended.
    #[error("no reply within {0:?}; a persisted message stays stored and will still be handled")]
    Timeout(Duration),
    /// The storage backend failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A payload, reply or state could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A payload, reply or state could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The encoded request is larger than `max_payload_bytes`.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes (`max_payload_bytes`)")]
    PayloadTooLarge {
        /// Encoded size of the payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The handler panicked. The entity was restarted; only this request failed.
    #[error("handler panicked: {0}")]
    HandlerPanicked(String),
    /// The handler's effects could not be committed; nothing of them was kept.
    #[error("the handler's completion could not be committed: {0}")]
    EffectsFailed(String),
    /// The runtime refused a stored message it cannot handle (its payload no
    /// longer decodes as any rpc of the entity type).
    #[error("message rejected: {0}")]
    Rejected(String),
    /// The cluster is shutting down and takes no new work.
    #[error("the cluster is shutting down")]
    ShuttingDown,
    /// No live runner owned the entity's shard before the call's deadline
    /// (no runner is up, or the shard was moving). A persisted message stays
    /// stored and is handled once a runner owns the shard.
    #[error(
        "shard {shard} of {entity_type}/{entity_id} has no owner yet; retried until the deadline"
    )]
    EntityNotAssigned {
        /// Entity type name.
        entity_type: String,
        /// Entity id.
        entity_id: String,
        /// The entity's shard.
        shard: String,
    },
    /// The runner owning the entity could not be reached before the call's
    /// deadline. A persisted message stays stored and is handled by the
    /// shard's next owner.
    #[error("runner {runner} is unavailable: {reason}")]
    RunnerUnavailable {
        /// The runner called.
        runner: String,
        /// The last transport error.
        reason: String,
    },
}

impl ClusterError<Infallible> {
    /// Turns an infrastructure error (one that carries no handler error) into
    /// a `ClusterError` of any handler error type.
    pub fn widen<E>(self) -> ClusterError<E> {
        match self {
            ClusterError::Handler(never) => match never {},
            ClusterError::UnknownEntityType(t) => ClusterError::UnknownEntityType(t),
            ClusterError::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            } => ClusterError::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            },
            ClusterError::Timeout(d) => ClusterError::Timeout(d),
            ClusterError::Storage(e) => ClusterError::Storage(e),
            ClusterError::Encode(e) => ClusterError::Encode(e),
            ClusterError::Decode(e) => ClusterError::Decode(e),
            ClusterError::PayloadTooLarge { size, limit } => {
                ClusterError::PayloadTooLarge { size, limit }
            }
            ClusterError::HandlerPanicked(m) => ClusterError::HandlerPanicked(m),
            ClusterError::EffectsFailed(m) => ClusterError::EffectsFailed(m),
            ClusterError::Rejected(m) => ClusterError::Rejected(m),
            ClusterError::ShuttingDown => ClusterError::ShuttingDown,
            ClusterError::EntityNotAssigned {
                entity_type,
                entity_id,
                shard,
            } => ClusterError::EntityNotAssigned {
                entity_type,
                entity_id,
                shard,
            },
            ClusterError::RunnerUnavailable { runner, reason } => {
                ClusterError::RunnerUnavailable { runner, reason }
            }
        }
    }
}

impl<E> ClusterError<E> {
    /// The handler's own error, if that is what this is.
    pub fn handler_error(&self) -> Option<&E> {
        match self {
            ClusterError::Handler(e) => Some(e),
            _ => None,
        }
    }

    /// True when the call may succeed if retried later (timeout, full mailbox,
    /// shutdown, storage trouble).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClusterError::Timeout(_)
                | ClusterError::MailboxFull { .. }
                | ClusterError::ShuttingDown
                | ClusterError::Storage(_)
                | ClusterError::EntityNotAssigned { .. }
                | ClusterError::RunnerUnavailable { .. }
        )
    }
}

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying Flotilla's migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Another runner already holds this storage (for SQLite: another process has
    /// the database file open as a runner).
    #[error("storage is in use by another runner: {0}")]
    InUse(String),
    /// A live runner already holds this runner id (its liveness lock is
    /// taken). Give every runner its own id.
    #[error("runner id {0:?} is held by a live runner")]
    RunnerIdInUse(String),
    /// The storage was closed.
    #[error("storage is closed")]
    Closed,
    /// Data read back from storage was not what Flotilla wrote.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// An I/O error outside the database driver (lock files, directories).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// One failure shared by every item of a batch that failed as a whole.
    #[error(transparent)]
    Shared(std::sync::Arc<StorageError>),
    /// The backend could not be set up (bad table prefix, a schema from a
    /// newer Flotilla, an edited migration). Nothing was changed.
    #[error(transparent)]
    Setup(#[from] SetupError),
}

impl StorageError {
    /// The setup error inside, if that is what this is.
    pub fn setup_error(&self) -> Option<&SetupError> {
        match self {
            StorageError::Setup(e) => Some(e),
            StorageError::Shared(shared) => shared.setup_error(),
            _ => None,
        }
    }
}

/// Why a storage backend could not be set up (carried by `StorageError::Setup`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The table prefix does not follow the rule.
    #[error(
        "invalid table prefix {prefix:?}: it must match `^[a-z_][a-z0-9_]{{0,40}}$` (a lower-case letter or \
         `_`, then at most 40 lower-case letters, digits or `_`), e.g. `flotilla_`"
    )]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
    },
    /// The database was migrated by a newer Flotilla: it holds a migration
    /// this build does not know. Nothing was changed.
    #[error(
        "the database holds Flotilla migration {found}, but this build knows migrations up to \
         {known} only: it was migrated by a newer Flotilla; upgrade this runner"
    )]
    NewerSchema {
        /// The unknown version found in the database.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// An applied migration differs from this build's copy of it.
    #[error(
        "Flotilla migration {version} applied to the database differs from this build's \
         (checksum mismatch): the migration was edited after it was applied; restore it"
    )]
    ChecksumMismatch {
        /// The migration that differs.
        version: i64,
    },
}

/// A value could not be encoded as MessagePack.
#[derive(Debug, thiserror::Error)]
#[error("could not encode {what}: {message}")]
pub struct EncodeError {
    /// What was being encoded (request, reply, state).
    pub what: &'static str,
    /// The encoder's message.
    pub message: String,
}

/// Bytes could not be decoded into the expected type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a valid encoding of the type.
    #[error("malformed {what}: {message}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        message: String,
    },
    /// The value decoded but bytes were left over.
    #[error("{what} has {extra} trailing bytes after the value")]
    TrailingBytes {
        /// What was being decoded.
        what: &'static str,
        /// Number of bytes left over.
        extra: usize,
    },
    /// Nesting exceeds the depth limit.
    #[error("{what} nests deeper than {limit} levels")]
    TooDeep {
        /// What was being decoded.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// A reply of the wrong rpc came back for a request.
    #[error("reply `{got}` does not answer request `{expected}`")]
    ReplyMismatch {
        /// The rpc that was called.
        expected: &'static str,
        /// The rpc the reply belongs to.
        got: &'static str,
    },
}

/// Configuration is invalid. The message names the setting or variable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// An environment variable holds a value that does not parse.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable name.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A builder setting is invalid.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting name.
        setting: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// Starting a cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The storage could not be opened or migrated.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Two registered entity types share a name.
    #[error("entity type `{0}` is registered twice")]
    DuplicateEntityType(&'static str),
    /// Two registered singletons share a name.
    #[error("singleton `{0}` is registered twice")]
    DuplicateSingleton(&'static str),
    /// The runner transport could not listen on its address.
    #[error("the runner transport cannot listen on {addr}: {source}")]
    Listen {
        /// The address (`listen`, `FLOTILLA_LISTEN`).
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
