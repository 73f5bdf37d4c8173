//! The untyped core of every generated `{Type}Client`.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cluster::ClusterCore;
use crate::entity::Entity;
use crate::error::ClusterError;
use crate::sharding::{EntityAddress, ShardId};

/// A reference to one entity: what a generated `{Type}Client` wraps.
///
/// Cheap to clone. Calls through it resolve the entity's shard, route the
/// request, and wait for the reply within the call's deadline.
pub struct EntityRef<E: Entity> {
    core: Arc<ClusterCore>,
    address: EntityAddress,
    timeout: Option<Duration>,
    deliver_at: Option<SystemTime>,
    _entity: PhantomData<fn() -> E>,
}

impl<E: Entity> Clone for EntityRef<E> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            address: self.address.clone(),
            timeout: self.timeout,
            deliver_at: self.deliver_at,
            _entity: PhantomData,
        }
    }
}

impl<E: Entity> fmt::Debug for EntityRef<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntityRef")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("deliver_at", &self.deliver_at)
            .finish()
    }
}

impl<E: Entity> EntityRef<E> {
    pub(crate) fn new(core: Arc<ClusterCore>, entity_id: &str) -> Self {
        let shard = ShardId::for_entity(
            crate::sharding::DEFAULT_GROUP,
            entity_id,
            core.config.shards,
        );
        Self {
            core,
            address: EntityAddress {
                entity_type: Arc::from(E::NAME),
                entity_id: Arc::from(entity_id),
                shard,
            },
            timeout: None,
            deliver_at: None,
            _entity: PhantomData,
        }
    }

    /// The entity's id.
    pub fn entity_id(&self) -> &str {
        &self.address.entity_id
    }

    /// The entity's address (type, id, shard).
    pub fn address(&self) -> &EntityAddress {
        &self.address
    }

    /// A copy whose calls wait at most `timeout` for their reply (instead of
    /// the cluster's `call_timeout`).
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// A copy whose persisted calls are delivered no earlier than `at`. The
    /// call still waits for the reply: its deadline runs from `at`. Volatile
    /// calls ignore it.
    pub fn deliver_at(&self, at: SystemTime) -> Self {
        Self {
            deliver_at: Some(at),
            ..self.clone()
        }
    }

    /// Sends `request` and waits for its reply. Generated clients call this.
    pub async fn call(&self, request: E::Request) -> Result<E::Reply, ClusterError> {
        let timeout = self.timeout.unwrap_or(self.core.config.call_timeout);
        self.core
            .call::<E>(&self.address, request, timeout, self.deliver_at)
            .await
    }
}
