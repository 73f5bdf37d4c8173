//! The lock connection of a registered runner, and the shard-lock
//! transitions run on it.

use std::collections::{HashMap, HashSet};

use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::super::shard_columns;
use super::statements::RunnerStatements;
use crate::error::StorageError;
use crate::sharding::{RunnerId, ShardId};
use crate::snowflake::now_unix_ms;
use crate::storage::Epoch;

/// The dedicated lock connection of a registered runner.
pub(super) struct LockSession {
    /// The connection, outside the pool.
    pub(super) conn: PgConnection,
    /// The runner registered on it.
    pub(super) runner: RunnerId,
    /// The cluster's first lock key.
    pub(super) namespace: i32,
    /// The shards locked on `conn`, with their lock keys and the epochs
    /// their acquisition set.
    pub(super) held: HashMap<ShardId, (i32, Epoch)>,
    /// The snowflake machine id leased on `conn`, if any.
    pub(super) machine_id: Option<u16>,
}

/// A shard read back from its columns.
fn shard_of(group: String, index: i64) -> Result<ShardId, StorageError> {
    let index = u32::try_from(index)
        .map_err(|_| StorageError::Corrupt(format!("shard index {index} out of range")))?;
    Ok(ShardId::new(group, index))
}

impl LockSession {
    /// Locks the wanted shards this session does not hold yet and bumps
    /// the epochs of those it got; returns every wanted shard it holds.
    pub(super) async fn acquire(
        &mut self,
        statements: &RunnerStatements,
        shards: &[ShardId],
    ) -> Result<Vec<(ShardId, Epoch)>, StorageError> {
        let mut seen = HashSet::new();
        let wanted: Vec<&ShardId> = shards
            .iter()
            .filter(|s| !self.held.contains_key(*s) && seen.insert(*s))
            .collect();
        if !wanted.is_empty() {
            let (groups, indexes) = shard_columns(wanted.iter().copied());
            sqlx::query(AssertSqlSafe(&*statements.insert_shards))
                .bind(&groups)
                .bind(&indexes)
                .execute(&mut self.conn)
                .await?;
            let rows = sqlx::query(AssertSqlSafe(&*statements.try_lock_shards))
                .bind(self.namespace)
                .bind(&groups)
                .bind(&indexes)
                .fetch_all(&mut self.conn)
                .await?;
            let mut keys = HashMap::new();
            for row in rows {
                if row.try_get::<bool, _>(3)? {
                    let shard = shard_of(row.try_get(0)?, row.try_get(1)?)?;
                    keys.insert(shard, row.try_get::<i32, _>(2)?);
                }
            }
            if !keys.is_empty() {
                let (groups, indexes) = shard_columns(keys.keys());
                let rows = sqlx::query(AssertSqlSafe(&*statements.bump_epochs))
                    .bind(self.runner.as_str())
                    .bind(now_unix_ms() as i64)
                    .bind(&groups)
                    .bind(&indexes)
                    .fetch_all(&mut self.conn)
                    .await?;
                for row in rows {
                    let shard = shard_of(row.try_get(0)?, row.try_get(1)?)?;
                    let epoch = Epoch(row.try_get(2)?);
                    let key = keys.get(&shard).copied().ok_or_else(|| {
                        StorageError::Corrupt(format!("epoch of {shard} bumped without its lock"))
                    })?;
                    self.held.insert(shard, (key, epoch));
                }
                if let Some(lost) = keys.keys().find(|s| !self.held.contains_key(*s)) {
                    return Err(StorageError::Corrupt(format!(
                        "{lost} was locked but its row is gone"
                    )));
                }
            }
        }
        let mut seen = HashSet::new();
        Ok(shards
            .iter()
            .filter(|s| seen.insert(*s))
            .filter_map(|s| self.held.get(s).map(|(_, epoch)| (s.clone(), *epoch)))
            .collect())
    }

    /// Unlocks the held ones of `shards` and clears their owner.
    pub(super) async fn release(
        &mut self,
        statements: &RunnerStatements,
        shards: &[ShardId],
    ) -> Result<(), StorageError> {
        let mut seen = HashSet::new();
        let releasing: Vec<(&ShardId, i32)> = shards
            .iter()
            .filter(|s| seen.insert(*s))
            .filter_map(|s| self.held.get(s).map(|(key, _)| (s, *key)))
            .collect();
        if releasing.is_empty() {
            return Ok(());
        }
        let (groups, indexes) = shard_columns(releasing.iter().map(|(s, _)| *s));
        sqlx::query(AssertSqlSafe(&*statements.disown_shards))
            .bind(self.runner.as_str())
            .bind(&groups)
            .bind(&indexes)
            .execute(&mut self.conn)
            .await?;
        let keys: Vec<i32> = releasing.iter().map(|(_, key)| *key).collect();
        let unlocked: Vec<bool> =
            sqlx::query_scalar("SELECT pg_advisory_unlock($1, k) FROM UNNEST($2::integer[]) AS k")
                .bind(self.namespace)
                .bind(&keys)
                .fetch_all(&mut self.conn)
                .await?;
        for (shard, _) in &releasing {
            self.held.remove(*shard);
        }
        if unlocked.iter().any(|u| !u) {
            return Err(StorageError::Corrupt(
                "a shard lock this runner tracked was not held by its session".to_owned(),
            ));
        }
        Ok(())
    }
}

impl LockSession {
    /// Leases a snowflake machine id on this session: the two-key advisory
    /// lock `(namespace, -1 - id)` (lock keys from the sequence are
    /// positive, so the two never meet). Candidates are tried from a random
    /// start, 64 per round trip; extra locks a round took are given back.
    pub(super) async fn lease_machine_id(&mut self) -> Result<u16, StorageError> {
        if let Some(id) = self.machine_id {
            return Ok(id);
        }
        let total = i32::from(crate::storage::runners::MACHINE_IDS);
        let mut start = [0u8; 2];
        getrandom::fill(&mut start).map_err(|e| StorageError::Io(std::io::Error::other(e)))?;
        let start = i32::from(u16::from_le_bytes(start)) % total;
        for round in 0..(total / 64) {
            let candidates: Vec<i32> = (0..64).map(|i| (start + round * 64 + i) % total).collect();
            let taken: Vec<i32> = sqlx::query_scalar(
                "SELECT m FROM UNNEST($2::int[]) AS m WHERE pg_try_advisory_lock($1, -1 - m)",
            )
            .bind(self.namespace)
            .bind(&candidates)
            .fetch_all(&mut self.conn)
            .await?;
            if let Some((&first, extra)) = taken.split_first() {
                if !extra.is_empty() {
                    sqlx::query(
                        "SELECT pg_advisory_unlock($1, -1 - m) FROM UNNEST($2::int[]) AS m",
                    )
                    .bind(self.namespace)
                    .bind(extra)
                    .execute(&mut self.conn)
                    .await?;
                }
                let id = u16::try_from(first)
                    .map_err(|_| StorageError::Corrupt(format!("machine id {first}")))?;
                self.machine_id = Some(id);
                return Ok(id);
            }
        }
        Err(StorageError::InUse(
            "all 1024 snowflake machine ids are leased by live processes".to_owned(),
        ))
    }
}
