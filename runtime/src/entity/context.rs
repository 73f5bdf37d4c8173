//! What a handler can see and do besides its arguments.

use std::sync::{Arc, Mutex};

use crate::context::{LeaderStatus, TraceContext};
use crate::sharding::{EntityAddress, RunnerId, ShardId};
use crate::snowflake::{Snowflake, SnowflakeGenerator};
use crate::storage::{Epoch, MessageId, Statement};

/// Handed to a handler that declares an `&EntityContext` argument.
///
/// ```
/// use flotilla::prelude::*;
///
/// #[derive(Default)]
/// struct Greeter;
///
/// #[entity]
/// impl Greeter {
///     #[rpc]
///     async fn hello(&self, ctx: &EntityContext, name: String) -> String {
///         format!("hello {name}, from {} on shard {}", ctx.entity_id(), ctx.shard_id())
///     }
/// }
/// ```
#[derive(Debug)]
pub struct EntityContext {
    address: EntityAddress,
    runner: RunnerId,
    message: Option<MessageId>,
    epoch: Option<Epoch>,
    ids: Arc<SnowflakeGenerator>,
    leader: Arc<LeaderStatus>,
    trace: Option<TraceContext>,
    staged: Option<Mutex<Vec<Statement>>>,
}

/// [`EntityContext::stage`] was called where effects cannot be committed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// Only a persisted rpc has a completion transaction to write into.
    #[error("effects can only be staged by a persisted rpc (`#[rpc(persisted)]`)")]
    NotPersisted,
}

impl EntityContext {
    pub(crate) fn new(
        address: EntityAddress,
        runner: RunnerId,
        message: Option<MessageId>,
        epoch: Option<Epoch>,
        ids: Arc<SnowflakeGenerator>,
        leader: Arc<LeaderStatus>,
        trace: Option<TraceContext>,
    ) -> Self {
        let staged = message.map(|_| Mutex::new(Vec::new()));
        Self {
            address,
            runner,
            message,
            epoch,
            ids,
            leader,
            trace,
            staged,
        }
    }

    /// The entity's id.
    pub fn entity_id(&self) -> &str {
        &self.address.entity_id
    }

    /// The entity type's wire name.
    pub fn entity_type(&self) -> &str {
        &self.address.entity_type
    }

    /// The entity's full address.
    pub fn address(&self) -> &EntityAddress {
        &self.address
    }

    /// The shard the entity lives on.
    pub fn shard_id(&self) -> &ShardId {
        &self.address.shard
    }

    /// The runner running this handler.
    pub fn runner_id(&self) -> &RunnerId {
        &self.runner
    }

    /// The id of the persisted message being handled; `None` for a volatile one.
    pub fn message_id(&self) -> Option<MessageId> {
        self.message
    }

    /// The ownership epoch of the entity's shard on this runner: bumped each
    /// time a runner acquires the shard, and checked by storage on every
    /// completion. `None` on a single runner (SQLite, memory), which owns
    /// every shard.
    pub fn epoch(&self) -> Option<Epoch> {
        self.epoch
    }

    /// A new cluster-unique, time-ordered id.
    pub fn snowflake(&self) -> Snowflake {
        self.ids.next_id()
    }

    /// Whether this runner runs the cluster's leader singleton now (read
    /// live). `None` while unknown (no leader election configured).
    pub fn is_leader(&self) -> Option<bool> {
        self.leader.get()
    }

    /// The trace of this handler run: its span id, and the sender's span id
    /// as its parent. `None` in `Entity::create` (no message is handled).
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// Stages a SQL statement to run in the transaction that records this
    /// persisted message's reply, so it takes effect exactly once: it commits
    /// together with the reply (and the entity's state), or not at all.
    ///
    /// The statement is written in the dialect of the configured storage
    /// (`?` placeholders on SQLite). If it fails, nothing of the completion is
    /// kept and the call fails with `ClusterError::EffectsFailed`.
    pub fn stage(&self, statement: Statement) -> Result<(), StageError> {
        let staged = self.staged.as_ref().ok_or(StageError::NotPersisted)?;
        staged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(statement);
        Ok(())
    }

    pub(crate) fn take_staged(&self) -> Vec<Statement> {
        match &self.staged {
            Some(staged) => std::mem::take(
                &mut *staged
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            ),
            None => Vec::new(),
        }
    }
}
