//! Flotilla's own migrator for PostgreSQL.
//!
//! sqlx's migrator cannot template table names, and Flotilla's tables carry a
//! configurable prefix, so the migrations (`migrations/postgres/*.sql`, with a
//! `{prefix}` placeholder) are applied here. Each applied migration is
//! recorded as (version, checksum, applied_at) in `{prefix}migrations`.
//!
//! Everything runs in one transaction (PostgreSQL DDL is transactional), after
//! `pg_advisory_xact_lock` on a constant key: runners that start together
//! migrate one after the other, and the second finds the work done.

use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};

use crate::error::SetupError;
use crate::error::StorageError;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub(super) struct Migration {
    /// Applied in increasing order; never reused.
    pub(super) version: i64,
    /// What it does, for the record.
    pub(super) description: &'static str,
    /// The SQL, with `{prefix}` placeholders.
    pub(super) sql: &'static str,
}

/// Every migration this build knows, in order.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "messages",
        sql: include_str!("../../../../migrations/postgres/0001_messages.sql"),
    },
    Migration {
        version: 2,
        description: "entity_state",
        sql: include_str!("../../../../migrations/postgres/0002_entity_state.sql"),
    },
    Migration {
        version: 3,
        description: "runners",
        sql: include_str!("../../../../migrations/postgres/0003_runners.sql"),
    },
];

/// The advisory-lock namespace of Flotilla: ASCII `flot`. PostgreSQL's
/// two-key advisory locks (`int4, int4`) live apart from the one-key
/// (`bigint`) ones an application may use, and the first key names us.
pub(crate) const LOCK_NAMESPACE: i32 = 0x666c_6f74;

/// The second key of the migration lock in [`LOCK_NAMESPACE`].
const MIGRATION_LOCK: i32 = 0;

impl Migration {
    /// The SHA-256 of the migration as shipped (before the prefix is filled
    /// in), so one build has one checksum per version whatever the prefix.
    pub(super) fn checksum(&self) -> Vec<u8> {
        Sha256::digest(self.sql.as_bytes()).to_vec()
    }

    /// The SQL to run for tables prefixed `prefix`.
    pub(super) fn sql_for(&self, prefix: &str) -> String {
        self.sql.replace("{prefix}", prefix)
    }
}

/// Applies the migrations of `migrations` that the database lacks.
///
/// Fails with [`SetupError::NewerSchema`] when the database holds a
/// version this build does not know, and with
/// [`SetupError::ChecksumMismatch`] when an applied migration differs
/// from this build's; in both cases nothing is changed.
pub(super) async fn migrate(
    pool: &PgPool,
    prefix: &str,
    migrations: &[Migration],
) -> Result<(), StorageError> {
    let mut tx = pool.begin().await?;
    match apply(&mut tx, prefix, migrations).await {
        Ok(()) => tx.commit().await?,
        // Explicitly: a dropped transaction is rolled back only when its
        // connection is next used, and until then it holds the lock.
        Err(error) => {
            if let Err(rollback) = tx.rollback().await {
                tracing::warn!(error = %rollback, "rolling back a failed migration failed");
            }
            return Err(error);
        }
    }
    Ok(())
}

/// The migration work inside the transaction `tx`.
async fn apply(
    tx: &mut PgConnection,
    prefix: &str,
    migrations: &[Migration],
) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(LOCK_NAMESPACE)
        .bind(MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {prefix}migrations (\
         version bigint PRIMARY KEY, \
         description text NOT NULL, \
         checksum bytea NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now())"
    )))
    .execute(&mut *tx)
    .await?;
    let applied = sqlx::query(AssertSqlSafe(format!(
        "SELECT version, checksum FROM {prefix}migrations ORDER BY version"
    )))
    .fetch_all(&mut *tx)
    .await?;

    let known = migrations.iter().map(|m| m.version).max().unwrap_or(0);
    let mut done = Vec::with_capacity(applied.len());
    for row in &applied {
        let version: i64 = row.try_get(0)?;
        let checksum: Vec<u8> = row.try_get(1)?;
        let Some(migration) = migrations.iter().find(|m| m.version == version) else {
            return Err(StorageError::Setup(SetupError::NewerSchema {
                found: version,
                known,
            }));
        };
        if migration.checksum() != checksum {
            return Err(StorageError::Setup(SetupError::ChecksumMismatch {
                version,
            }));
        }
        done.push(version);
    }

    for migration in migrations.iter().filter(|m| !done.contains(&m.version)) {
        // `raw_sql`: a migration holds several statements, which the
        // extended (prepared) protocol refuses.
        sqlx::raw_sql(AssertSqlSafe(migration.sql_for(prefix)))
            .execute(&mut *tx)
            .await
            .map_err(|e| sqlx::migrate::MigrateError::ExecuteMigration(e, migration.version))?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {prefix}migrations (version, description, checksum) VALUES ($1, $2, $3)"
        )))
        .bind(migration.version)
        .bind(migration.description)
        .bind(migration.checksum())
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            version = migration.version,
            description = migration.description,
            prefix,
            "applied PostgreSQL migration"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_in_order_and_fully_templated() {
        let versions: Vec<_> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        for m in MIGRATIONS {
            let sql = m.sql_for("app_");
            assert!(!sql.contains("{prefix}"), "{}", m.version);
            assert!(
                !sql.contains("flotilla_messages") && !sql.contains("flotilla_entity"),
                "{}: a table name is not templated",
                m.version
            );
            assert_eq!(m.checksum().len(), 32);
        }
    }
}
