//! Backends under test, and builders for the values the scenarios write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla::storage::{
    Completion, EntityState, MemoryStorage, MessageId, MessageKey, MessageStorage, NewMessage,
    SqlValue, SqliteStorage, Statement, StoredReply, UnixMillis, UnprocessedQuery, WriteBatch,
    WriteOutcome,
};
use flotilla::{EntityAddress, ShardId};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};

#[cfg(feature = "postgres")]
use super::postgres_db::TestSchema;

/// The entity type every scenario writes to.
pub(crate) const ACCOUNT: &str = "Account";

/// The application table that staged effects write to.
pub(crate) const AUDIT_TABLE: &str =
    "CREATE TABLE app_audit (message INTEGER NOT NULL, note TEXT NOT NULL UNIQUE)";

/// One backend, opened fresh for one test.
pub(crate) struct Fixture {
    storage: Arc<dyn MessageStorage>,
    kind: Kind,
}

enum Kind {
    Memory(Arc<MemoryStorage>),
    Sqlite {
        path: PathBuf,
        // Removed (with the database) when the fixture drops, even on panic.
        _dir: tempfile::TempDir,
    },
    #[cfg(feature = "postgres")]
    Postgres {
        /// The application's pool on the test schema.
        app: sqlx::PgPool,
        // Dropped (with every table in it) when the fixture drops, even on panic.
        _schema: TestSchema,
    },
}

/// A fresh in-memory backend.
pub(crate) async fn memory() -> Fixture {
    let storage = Arc::new(MemoryStorage::new());
    Fixture {
        storage: storage.clone(),
        kind: Kind::Memory(storage),
    }
}

/// A fresh SQLite backend in its own temporary directory.
pub(crate) async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("flotilla.db");
    let storage = SqliteStorage::open(&path)
        .await
        .expect("open SQLite storage");
    Fixture {
        storage: Arc::new(storage),
        kind: Kind::Sqlite { path, _dir: dir },
    }
}

/// A fresh PostgreSQL backend in a schema of its own.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres() -> Fixture {
    let schema = TestSchema::create().await;
    let storage = schema.storage(flotilla::storage::DEFAULT_PREFIX).await;
    let app = schema.pool(2).await;
    Fixture {
        storage: Arc::new(storage),
        kind: Kind::Postgres {
            app,
            _schema: schema,
        },
    }
}

impl Fixture {
    /// The storage under test.
    pub(crate) fn storage(&self) -> Arc<dyn MessageStorage> {
        self.storage.clone()
    }

    /// Creates the application's audit table, where the backend runs effects.
    pub(crate) async fn create_audit_table(&self) {
        match &self.kind {
            Kind::Memory(_) => {}
            Kind::Sqlite { path, .. } => {
                let mut conn = app_connection(path).await;
                sqlx::query(AUDIT_TABLE)
                    .execute(&mut conn)
                    .await
                    .expect("create app_audit");
                conn.close().await.expect("close app connection");
            }
            #[cfg(feature = "postgres")]
            Kind::Postgres { app, .. } => {
                sqlx::query(PG_AUDIT_TABLE)
                    .execute(app)
                    .await
                    .expect("create app_audit");
            }
        }
    }

    /// The effect that inserts one audit row, in the backend's placeholder
    /// syntax (`?` for SQLite, `$1` for PostgreSQL).
    pub(crate) fn audit(&self, message: i64, note: &str) -> Statement {
        match &self.kind {
            #[cfg(feature = "postgres")]
            Kind::Postgres { .. } => pg_audit(message, note),
            _ => audit(message, note),
        }
    }

    /// The `(message, note)` rows that committed effects wrote to the audit
    /// table, in insertion order. The memory backend does not run effects:
    /// for it, the committed effect statements are read back instead.
    pub(crate) async fn audit_rows(&self) -> Vec<(i64, String)> {
        match &self.kind {
            Kind::Memory(memory) => memory
                .effects()
                .iter()
                .map(|effect| match effect.params() {
                    [SqlValue::Int(message), SqlValue::Text(note)] => (*message, note.clone()),
                    other => panic!("unexpected effect parameters {other:?}"),
                })
                .collect(),
            Kind::Sqlite { path, .. } => {
                let mut conn = app_connection(path).await;
                let rows = sqlx::query_as("SELECT message, note FROM app_audit ORDER BY rowid")
                    .fetch_all(&mut conn)
                    .await
                    .expect("read app_audit");
                conn.close().await.expect("close app connection");
                rows
            }
            #[cfg(feature = "postgres")]
            Kind::Postgres { app, .. } => {
                sqlx::query_as("SELECT message, note FROM app_audit ORDER BY seq")
                    .fetch_all(app)
                    .await
                    .expect("read app_audit")
            }
        }
    }

    /// Closes the storage; the temporary directory goes with the fixture.
    pub(crate) async fn finish(self) {
        self.storage.close().await;
        #[cfg(feature = "postgres")]
        if let Kind::Postgres { app, .. } = &self.kind {
            app.close().await;
        }
    }
}

/// The PostgreSQL audit table; `seq` keeps the insertion order.
#[cfg(feature = "postgres")]
pub(crate) const PG_AUDIT_TABLE: &str = "CREATE TABLE app_audit \
     (seq bigserial PRIMARY KEY, message bigint NOT NULL, note text NOT NULL UNIQUE)";

/// The effect that inserts one audit row, with PostgreSQL placeholders.
#[cfg(feature = "postgres")]
pub(crate) fn pg_audit(message: i64, note: &str) -> Statement {
    Statement::new("INSERT INTO app_audit (message, note) VALUES ($1, $2)")
        .bind(message)
        .bind(note)
}

/// A connection of "the application" to the same database file.
pub(crate) async fn app_connection(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .expect("application connection")
}

/// The effect that inserts one audit row.
pub(crate) fn audit(message: i64, note: &str) -> Statement {
    Statement::new("INSERT INTO app_audit (message, note) VALUES (?, ?)")
        .bind(message)
        .bind(note)
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .expect("clock after 1970")
}

/// The address of an account.
pub(crate) fn address(entity_id: &str) -> EntityAddress {
    EntityAddress {
        entity_type: ACCOUNT.into(),
        entity_id: entity_id.into(),
        shard: ShardId::for_entity("default", entity_id, 300),
    }
}

/// A message to `entity_id` with no key, ready at once.
pub(crate) fn message(id: i64, entity_id: &str) -> NewMessage {
    NewMessage {
        id: MessageId(id),
        address: address(entity_id),
        tag: "deposit".to_owned(),
        key: None,
        payload: format!("payload of {id}").into_bytes(),
        headers: BTreeMap::new(),
        deliver_at: None,
        created_at: 1_700_000_000_000 + id,
    }
}

/// A message with the dedup key `primary_key`.
pub(crate) fn keyed(id: i64, entity_id: &str, primary_key: &str) -> NewMessage {
    NewMessage {
        key: Some(MessageKey::new(ACCOUNT, entity_id, "deposit", primary_key)),
        ..message(id, entity_id)
    }
}

/// A completion with an `Ok` reply and nothing else.
pub(crate) fn completion(id: i64, reply: &[u8]) -> Completion {
    Completion {
        message_id: MessageId(id),
        reply: StoredReply::Ok(reply.to_vec()),
        state: None,
        effects: Vec::new(),
        fence: None,
    }
}

/// The state of an account.
pub(crate) fn state(entity_id: &str, bytes: &[u8]) -> EntityState {
    EntityState {
        entity_type: ACCOUNT.to_owned(),
        entity_id: entity_id.to_owned(),
        bytes: bytes.to_vec(),
    }
}

/// Writes saves only.
pub(crate) async fn save(storage: &dyn MessageStorage, saves: Vec<NewMessage>) -> WriteOutcome {
    storage
        .write(WriteBatch {
            saves,
            completions: Vec::new(),
        })
        .await
        .expect("write saves")
}

/// Writes completions only.
pub(crate) async fn complete(
    storage: &dyn MessageStorage,
    completions: Vec<Completion>,
) -> WriteOutcome {
    storage
        .write(WriteBatch {
            saves: Vec::new(),
            completions,
        })
        .await
        .expect("write completions")
}

/// Every ready unprocessed message at `ready_at`.
pub(crate) fn all_ready_at(ready_at: UnixMillis) -> UnprocessedQuery {
    UnprocessedQuery {
        ready_at,
        after: None,
        limit: usize::MAX,
        shards: Default::default(),
    }
}

/// The ids of the ready unprocessed messages.
pub(crate) async fn unprocessed_ids(
    storage: &dyn MessageStorage,
    ready_at: UnixMillis,
) -> Vec<i64> {
    storage
        .unprocessed(all_ready_at(ready_at))
        .await
        .expect("unprocessed")
        .iter()
        .map(|m| m.id.0)
        .collect()
}

/// Opens SQLite storage at `path`.
pub(crate) async fn open_sqlite(path: &Path) -> SqliteStorage {
    SqliteStorage::open(path)
        .await
        .expect("open SQLite storage")
}

/// Creates the audit table in the database at `path`.
pub(crate) async fn create_audit_table_in(path: &Path) {
    let mut app = app_connection(path).await;
    sqlx::query(AUDIT_TABLE).execute(&mut app).await.unwrap();
    app.close().await.unwrap();
}

/// The notes of the audit table at `path`, in insertion order.
pub(crate) async fn audit_notes_in(path: &Path) -> Vec<String> {
    let mut app = app_connection(path).await;
    let notes = sqlx::query_scalar("SELECT note FROM app_audit ORDER BY rowid")
        .fetch_all(&mut app)
        .await
        .unwrap();
    app.close().await.unwrap();
    notes
}
