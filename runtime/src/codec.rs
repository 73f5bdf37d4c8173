//! The wire and storage encoding: MessagePack with named fields.
//!
//! Named fields (`rmp_serde::to_vec_named`) mean a stored message still decodes
//! after a field is added to an rpc (as `Option<T>`, or with `#[serde(default)]`
//! on a request type of your own) or after fields are reordered. Decoding is
//! strict: trailing bytes and nesting deeper than [`MAX_DEPTH`] are errors.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, EncodeError};

/// The deepest nesting a decoded value may have.
pub const MAX_DEPTH: usize = 64;

/// Encodes `value` as MessagePack with named fields.
pub fn encode<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(value).map_err(|e| EncodeError {
        what,
        message: e.to_string(),
    })
}

/// Decodes exactly one `T` from `bytes`: no trailing bytes, at most
/// [`MAX_DEPTH`] levels of nesting.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let mut rest = bytes;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    de.set_max_depth(MAX_DEPTH);
    let value = T::deserialize(&mut de).map_err(|e| match e {
        rmp_serde::decode::Error::DepthLimitExceeded => DecodeError::TooDeep {
            what,
            limit: MAX_DEPTH,
        },
        other => DecodeError::Malformed {
            what,
            message: other.to_string(),
        },
    })?;
    drop(de);
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V1 {
        a: u32,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V2 {
        b: Option<String>,
        a: u32,
    }

    #[test]
    fn round_trips() {
        let bytes = encode("test", &V1 { a: 7 }).unwrap();
        assert_eq!(decode::<V1>("test", &bytes).unwrap(), V1 { a: 7 });
    }

    #[test]
    fn an_added_optional_field_reads_old_bytes() {
        let old = encode("test", &V1 { a: 3 }).unwrap();
        assert_eq!(decode::<V2>("test", &old).unwrap(), V2 { a: 3, b: None });
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode("test", &V1 { a: 1 }).unwrap();
        bytes.push(0xc0);
        assert!(matches!(
            decode::<V1>("test", &bytes),
            Err(DecodeError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn malformed_bytes_are_rejected() {
        assert!(matches!(
            decode::<V1>("test", &[0xc1, 0xff]),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(decode::<V1>("test", &[]).is_err());
    }

    #[test]
    fn nesting_past_the_limit_is_rejected() {
        // 100 nested one-element arrays around an integer.
        let mut bytes = vec![0x91u8; 100];
        bytes.push(0x01);
        let err = decode::<serde_value::Nested>("test", &bytes).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooDeep { limit: 64, .. }),
            "{err}"
        );
    }

    mod serde_value {
        /// A recursive type that accepts any nesting of arrays around an integer.
        #[derive(Debug, serde::Deserialize)]
        #[serde(untagged)]
        pub(super) enum Nested {
            Leaf(#[allow(dead_code)] u8),
            List(#[allow(dead_code)] Vec<Nested>),
        }
    }
}
