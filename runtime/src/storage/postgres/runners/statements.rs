//! The SQL of the runner registry and shard locks, with the prefix filled in.

/// The SQL of the registry, with the prefix filled in.
#[derive(Debug)]
pub(super) struct RunnerStatements {
    /// Creates the row of a runner id (or touches it); returns its lock key and the namespace.
    pub(super) upsert_runner: String,
    /// Writes a runner's details once its liveness lock is held.
    pub(super) update_runner: String,
    /// Removes a runner's row (graceful leave).
    pub(super) delete_runner: String,
    /// The registered runners whose liveness lock is granted.
    pub(super) live_runners: String,
    /// Creates the missing shard rows (epoch 0).
    pub(super) insert_shards: String,
    /// Tries the lock of each wanted shard row, once each.
    pub(super) try_lock_shards: String,
    /// Bumps the epochs of freshly locked shards and records the owner.
    pub(super) bump_epochs: String,
    /// Clears the owner of released shards.
    pub(super) disown_shards: String,
    /// Clears the owner of every shard of a leaving runner.
    pub(super) disown_all: String,
    /// The cluster's lock namespace.
    pub(super) namespace: String,
}

impl RunnerStatements {
    /// The statements for tables prefixed `p` (validated by the caller).
    pub(super) fn new(p: &str) -> Self {
        Self {
            // The no-op update makes the row (and its key) come back when it
            // exists; the details are written only once the lock is held, so
            // a refused registration changes nothing a live runner relies on.
            upsert_runner: format!(
                "INSERT INTO {p}runners (runner_id, address, weight, groups, registered_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (runner_id) DO UPDATE SET runner_id = excluded.runner_id \
                 RETURNING lock_key, (SELECT lock_namespace FROM {p}cluster)"
            ),
            update_runner: format!(
                "UPDATE {p}runners SET address = $2, weight = $3, groups = $4, \
                 registered_at = $5 WHERE runner_id = $1"
            ),
            delete_runner: format!("DELETE FROM {p}runners WHERE runner_id = $1"),
            // The advisory locks are read once (materialized), not once per runner.
            live_runners: format!(
                "WITH held AS MATERIALIZED ( \
                   SELECT classid, objid FROM pg_locks \
                   WHERE locktype = 'advisory' AND objsubid = 2 AND granted \
                     AND database = (SELECT oid FROM pg_database \
                                     WHERE datname = current_database())) \
                 SELECT r.runner_id, r.address, r.weight, r.groups \
                 FROM {p}runners r CROSS JOIN {p}cluster c \
                 WHERE EXISTS (SELECT 1 FROM held h \
                               WHERE h.classid = c.lock_namespace::oid \
                                 AND h.objid = r.lock_key::oid)"
            ),
            // Only missing rows reach the insert: the key default draws from
            // the sequence for every row inserted or merely tried, and a
            // runner retrying held shards must not use up the keys.
            insert_shards: format!(
                "INSERT INTO {p}shards (shard_group, shard_index, epoch) \
                 SELECT g, i, 0 FROM UNNEST($1::text[], $2::bigint[]) AS s (g, i) \
                 WHERE NOT EXISTS (SELECT 1 FROM {p}shards x \
                                   WHERE x.shard_group = s.g AND x.shard_index = s.i) \
                 ON CONFLICT DO NOTHING"
            ),
            // The CTE yields each wanted row once, and the lock function runs
            // in the select list over it: exactly one try per wanted shard
            // (a session lock taken twice would need two unlocks).
            try_lock_shards: format!(
                "WITH wanted AS MATERIALIZED ( \
                   SELECT shard_group, shard_index, lock_key FROM {p}shards \
                   WHERE (shard_group, shard_index) IN \
                         (SELECT * FROM UNNEST($2::text[], $3::bigint[]))) \
                 SELECT shard_group, shard_index, lock_key, \
                        pg_try_advisory_lock($1, lock_key) AS taken \
                 FROM wanted"
            ),
            bump_epochs: format!(
                "UPDATE {p}shards SET epoch = epoch + 1, owner = $1, acquired_at = $2 \
                 WHERE (shard_group, shard_index) IN \
                       (SELECT * FROM UNNEST($3::text[], $4::bigint[])) \
                 RETURNING shard_group, shard_index, epoch"
            ),
            disown_shards: format!(
                "UPDATE {p}shards SET owner = NULL \
                 WHERE owner = $1 AND (shard_group, shard_index) IN \
                       (SELECT * FROM UNNEST($2::text[], $3::bigint[]))"
            ),
            disown_all: format!("UPDATE {p}shards SET owner = NULL WHERE owner = $1"),
            namespace: format!("SELECT lock_namespace FROM {p}cluster"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_the_prefix() {
        let s = RunnerStatements::new("app_");
        for sql in [
            &s.upsert_runner,
            &s.live_runners,
            &s.insert_shards,
            &s.try_lock_shards,
            &s.bump_epochs,
        ] {
            assert!(sql.contains("app_"), "{sql}");
            assert!(!sql.contains("flotilla_"), "{sql}");
        }
        assert!(s.namespace.contains("app_cluster"));
    }
}
