//! In-memory storage: the reference implementation of the storage semantics,
//! for tests and services that need no durability.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{
    Completion, CompletionOutcome, MessageId, MessageKey, MessageStorage, SaveOutcome, ShardFilter,
    Statement, StoredMessage, StoredReply, UnixMillis, UnprocessedQuery, WriteBatch, WriteOutcome,
};
use crate::error::StorageError;
use crate::snowflake::now_unix_ms;

#[derive(Debug, Default)]
struct Row {
    message: Option<StoredMessage>,
    processed_at: Option<UnixMillis>,
    reply: Option<StoredReply>,
}

#[derive(Debug, Default)]
struct State {
    messages: BTreeMap<MessageId, Row>,
    keys: HashMap<MessageKey, MessageId>,
    entity_state: HashMap<(String, String), Vec<u8>>,
    effects: Vec<Statement>,
}

/// Stores everything in process memory. Staged effects are not executed;
/// they are recorded and can be read back with [`MemoryStorage::effects`].
///
/// [`share`](Self::share) hands out another handle on the same data, so
/// several runners in one process (with [`MemoryRunners`](super::MemoryRunners))
/// use one store; closing a handle closes only that handle.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    state: Arc<Mutex<State>>,
    closed: AtomicBool,
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Another handle on the same data, open even if this one is closed.
    ///
    /// ```
    /// # #[tokio::main] async fn main() {
    /// use flotilla::storage::{MemoryStorage, MessageStorage};
    /// let first = MemoryStorage::new();
    /// let second = first.share();
    /// first.close().await;
    /// assert!(second.load_state("Account", "acct-42").await.is_ok());
    /// # }
    /// ```
    pub fn share(&self) -> Self {
        Self {
            state: self.state.clone(),
            closed: AtomicBool::new(false),
        }
    }

    /// The effects committed so far, in commit order.
    pub fn effects(&self) -> Vec<Statement> {
        self.lock().effects.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open(&self) -> Result<std::sync::MutexGuard<'_, State>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(self.lock())
    }
}

#[async_trait]
impl MessageStorage for MemoryStorage {
    async fn write(&self, batch: WriteBatch) -> Result<WriteOutcome, StorageError> {
        let mut state = self.open()?;
        let mut outcome = WriteOutcome::default();
        for message in batch.saves {
            if let Some(key) = &message.key
                && let Some(existing) = state.keys.get(key).copied()
            {
                let reply = state.messages.get(&existing).and_then(|r| r.reply.clone());
                outcome.saves.push(SaveOutcome::Duplicate {
                    id: existing,
                    reply,
                });
                continue;
            }
            if let Some(key) = &message.key {
                state.keys.insert(key.clone(), message.id);
            }
            state.messages.insert(
                message.id,
                Row {
                    message: Some(message),
                    processed_at: None,
                    reply: None,
                },
            );
            outcome.saves.push(SaveOutcome::Saved);
        }
        let now = now_unix_ms() as i64;
        for Completion {
            message_id,
            reply,
            state: entity_state,
            effects,
            // One process owns every shard of a memory store.
            fence: _,
        } in batch.completions
        {
            let Some(row) = state.messages.get_mut(&message_id) else {
                outcome
                    .completions
                    .push(CompletionOutcome::AlreadyProcessed(None));
                continue;
            };
            if row.processed_at.is_some() {
                outcome
                    .completions
                    .push(CompletionOutcome::AlreadyProcessed(row.reply.clone()));
                continue;
            }
            row.processed_at = Some(now);
            row.reply = Some(reply);
            if let Some(s) = entity_state {
                state
                    .entity_state
                    .insert((s.entity_type, s.entity_id), s.bytes);
            }
            state.effects.extend(effects);
            outcome.completions.push(CompletionOutcome::Recorded);
        }
        Ok(outcome)
    }

    async fn unprocessed(
        &self,
        query: UnprocessedQuery,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let state = self.open()?;
        let start = query
            .after
            .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        Ok(state
            .messages
            .range((start, std::ops::Bound::Unbounded))
            .filter(|(_, row)| row.processed_at.is_none())
            .filter_map(|(_, row)| row.message.as_ref())
            .filter(|m| m.deliver_at.is_none_or(|at| at <= query.ready_at))
            .filter(|m| query.shards.contains(&m.address.shard))
            .take(query.limit)
            .cloned()
            .collect())
    }

    async fn next_delivery(
        &self,
        after: UnixMillis,
        shards: &ShardFilter,
    ) -> Result<Option<UnixMillis>, StorageError> {
        let state = self.open()?;
        Ok(state
            .messages
            .values()
            .filter(|row| row.processed_at.is_none())
            .filter_map(|row| row.message.as_ref())
            .filter(|m| shards.contains(&m.address.shard))
            .filter_map(|m| m.deliver_at)
            .filter(|at| *at > after)
            .min())
    }

    async fn reply(&self, id: MessageId) -> Result<Option<StoredReply>, StorageError> {
        Ok(self
            .open()?
            .messages
            .get(&id)
            .and_then(|row| row.reply.clone()))
    }

    async fn load_state(
        &self,
        entity_type: &str,
        entity_id: &str,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .open()?
            .entity_state
            .get(&(entity_type.to_owned(), entity_id.to_owned()))
            .cloned())
    }

    async fn purge_processed(&self, processed_before: UnixMillis) -> Result<u64, StorageError> {
        let mut state = self.open()?;
        let old: Vec<MessageId> = state
            .messages
            .iter()
            .filter(|(_, row)| row.processed_at.is_some_and(|at| at < processed_before))
            .map(|(id, _)| *id)
            .collect();
        for id in &old {
            if let Some(row) = state.messages.remove(id)
                && let Some(key) = row.message.and_then(|m| m.key)
            {
                state.keys.remove(&key);
            }
        }
        Ok(old.len() as u64)
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}
