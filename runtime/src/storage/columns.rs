//! How SQL backends store MessagePack columns (headers, replies): shared so
//! every backend reads and writes them alike.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use sqlx::{ColumnIndex, Database, Decode, Row, Type};

use super::{Headers, MessageId, MessageKey, StoredMessage, StoredReply};
use crate::codec;
use crate::error::StorageError;
use crate::sharding::{EntityAddress, ShardId};

/// Encodes message headers for the `headers` column.
pub(super) fn encode_headers(headers: &Headers) -> Result<Vec<u8>, StorageError> {
    codec::encode("message headers", headers).map_err(|e| StorageError::Corrupt(e.to_string()))
}

/// Decodes the `headers` column of message `id`.
pub(super) fn decode_headers(id: i64, bytes: &[u8]) -> Result<Headers, StorageError> {
    decode(&format!("headers of message {id}"), bytes)
}

/// Encodes a reply for the `reply` column.
pub(super) fn encode_reply(reply: &StoredReply) -> Result<Vec<u8>, StorageError> {
    codec::encode("stored reply", reply).map_err(|e| StorageError::Corrupt(e.to_string()))
}

/// Decodes a `reply` column.
pub(super) fn decode_reply(bytes: Option<Vec<u8>>) -> Result<Option<StoredReply>, StorageError> {
    bytes.map(|b| decode("stored reply", &b)).transpose()
}

/// Decodes exactly one value (strict: no trailing bytes, bounded nesting); a
/// failure means the stored data is corrupt.
pub(super) fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StorageError> {
    codec::decode("stored value", bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// Maps a row of a backend's unprocessed-messages query back to a message.
/// The columns, in order: id, entity_type, entity_id, shard_group,
/// shard_index, tag, message_key, payload, headers, deliver_at, created_at.
pub(super) fn stored_message<R>(row: &R) -> Result<StoredMessage, StorageError>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    R::Database: Database,
{
    let id: i64 = row.try_get(0)?;
    let entity_type: String = row.try_get(1)?;
    let entity_id: String = row.try_get(2)?;
    let shard_group: String = row.try_get(3)?;
    let shard_index: i64 = row.try_get(4)?;
    let shard_index = u32::try_from(shard_index).map_err(|_| {
        StorageError::Corrupt(format!(
            "message {id} has shard index {shard_index}, outside 0..2^32"
        ))
    })?;
    let headers: Vec<u8> = row.try_get(8)?;
    Ok(StoredMessage {
        id: MessageId(id),
        address: EntityAddress {
            entity_type: Arc::from(entity_type),
            entity_id: Arc::from(entity_id),
            shard: ShardId::new(shard_group, shard_index),
        },
        tag: row.try_get(5)?,
        key: row
            .try_get::<Option<String>, _>(6)?
            .map(MessageKey::from_stored),
        payload: row.try_get(7)?,
        headers: decode_headers(id, &headers)?,
        deliver_at: row.try_get(9)?,
        created_at: row.try_get(10)?,
    })
}

/// Why a staged effect whose first keyword is not in `allowed` is refused;
/// `None` if it is allowed. Each backend passes its own list of data
/// statements (an effect runs inside the completion transaction and must not
/// end or escape it).
pub(super) fn refuse_keyword(sql: &str, allowed: &[&str]) -> Option<String> {
    let first = first_keyword(sql);
    if allowed.iter().any(|k| first.eq_ignore_ascii_case(k)) {
        return None;
    }
    let (last, rest) = allowed.split_last()?;
    Some(format!(
        "a staged effect must be one {} or {last} statement; `{first}` is not allowed inside \
         the completion transaction",
        rest.join(", ")
    ))
}

/// The first word of `sql`, after whitespace and comments.
fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.split_once("*/").map_or("", |(_, r)| r);
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_decode_strictly() {
        let reply = StoredReply::Panicked("boom".to_owned());
        let mut bytes = encode_reply(&reply).unwrap();
        assert_eq!(decode_reply(Some(bytes.clone())).unwrap(), Some(reply));
        bytes.push(0xc0);
        assert!(matches!(
            decode_reply(Some(bytes)),
            Err(StorageError::Corrupt(m)) if m.contains("1 trailing bytes")
        ));
        assert!(decode_reply(Some(vec![0xc1])).is_err());
        assert_eq!(decode_reply(None).unwrap(), None);
        let mut nested = vec![0x91_u8; 100];
        nested.push(0x01);
        assert!(decode::<serde::de::IgnoredAny>("deep", &nested).is_err());
    }

    #[test]
    fn headers_round_trip() {
        let mut headers = Headers::new();
        headers.insert("traceparent".into(), "00-abc-def-01".into());
        let bytes = encode_headers(&headers).unwrap();
        assert_eq!(decode_headers(7, &bytes).unwrap(), headers);
        assert!(matches!(
            decode_headers(7, &[0xc1]),
            Err(StorageError::Corrupt(m)) if m.contains("headers of message 7")
        ));
    }
}
