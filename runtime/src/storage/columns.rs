//! How SQL backends store MessagePack columns (headers, replies): shared so
//! every backend reads and writes them alike.

use serde::de::DeserializeOwned;

use super::{Headers, StoredReply};
use crate::codec;
use crate::error::StorageError;

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
