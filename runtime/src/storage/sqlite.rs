//! SQLite storage (being written; the SQLite backend replaces this file).
use crate::error::StorageError;
/// SQLite storage.
#[derive(Debug)]
pub struct SqliteStorage;
impl SqliteStorage {
    /// Opens the database file.
    pub async fn open(_path: impl AsRef<std::path::Path>) -> Result<Self, StorageError> {
        Err(StorageError::Closed)
    }
}
#[async_trait::async_trait]
impl super::MessageStorage for SqliteStorage {
    async fn write(&self, _: super::WriteBatch) -> Result<super::WriteOutcome, StorageError> {
        Err(StorageError::Closed)
    }
    async fn unprocessed(
        &self,
        _: super::UnprocessedQuery,
    ) -> Result<Vec<super::StoredMessage>, StorageError> {
        Err(StorageError::Closed)
    }
    async fn next_delivery(
        &self,
        _: super::UnixMillis,
    ) -> Result<Option<super::UnixMillis>, StorageError> {
        Err(StorageError::Closed)
    }
    async fn reply(&self, _: super::MessageId) -> Result<Option<super::StoredReply>, StorageError> {
        Err(StorageError::Closed)
    }
    async fn load_state(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Err(StorageError::Closed)
    }
    async fn purge_processed(&self, _: super::UnixMillis) -> Result<u64, StorageError> {
        Err(StorageError::Closed)
    }
    async fn close(&self) {}
}
