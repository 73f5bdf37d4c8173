//! What runners say to each other over the transport: the request and reply
//! bodies of the cluster protocol (MessagePack, named fields).
//!
//! Two requests exist. `Volatile` runs a volatile call on the owner and
//! returns its encoded reply. `Deliver` tells the owner of a shard that a
//! persisted message is stored (optionally carrying it, so the owner need not
//! read it back) and waits for its recorded reply, which is pushed back as the
//! response: a caller never polls storage for a reply in the common path.

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{ClusterError, DecodeError, EncodeError};
use crate::sharding::{EntityAddress, ShardId};
use crate::storage::{Headers, MessageId, MessageKey, StoredMessage, StoredReply, UnixMillis};
use crate::transport::frame::bin;

/// A request from one runner (or client-only process) to a shard owner.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireRequest {
    /// Run a volatile call.
    Volatile {
        /// The target entity.
        target: WireAddress,
        /// The encoded request enum.
        #[serde(with = "bin")]
        payload: Vec<u8>,
        /// The caller's trace and identity (`traceparent`, sender runner
        /// and shard); absent from senders that predate them.
        #[serde(default)]
        headers: Headers,
    },
    /// A persisted message is stored: dispatch it (if not already under
    /// way or done) and answer with its reply once recorded.
    Deliver {
        /// The target entity.
        target: WireAddress,
        /// The message id.
        id: MessageId,
        /// The message itself, when the sender just stored it.
        message: Option<WireMessage>,
    },
}

/// An entity address on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireAddress {
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) group: String,
    pub(crate) shard: u32,
}

impl WireAddress {
    pub(crate) fn new(address: &EntityAddress) -> Self {
        Self {
            entity_type: address.entity_type.to_string(),
            entity_id: address.entity_id.to_string(),
            group: address.shard.group().to_owned(),
            shard: address.shard.index(),
        }
    }

    pub(crate) fn shard(&self) -> ShardId {
        ShardId::new(self.group.as_str(), self.shard)
    }

    pub(crate) fn address(&self) -> EntityAddress {
        EntityAddress {
            entity_type: self.entity_type.as_str().into(),
            entity_id: self.entity_id.as_str().into(),
            shard: self.shard(),
        }
    }
}

/// A stored message on the wire (the parts the address does not carry).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WireMessage {
    pub(crate) tag: String,
    pub(crate) key: Option<String>,
    #[serde(with = "bin")]
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Headers,
    pub(crate) deliver_at: Option<UnixMillis>,
    pub(crate) created_at: UnixMillis,
}

impl WireMessage {
    pub(crate) fn new(message: &StoredMessage) -> Self {
        Self {
            tag: message.tag.clone(),
            key: message.key.as_ref().map(|k| k.as_str().to_owned()),
            payload: message.payload.clone(),
            headers: message.headers.clone(),
            deliver_at: message.deliver_at,
            created_at: message.created_at,
        }
    }

    pub(crate) fn into_stored(self, id: MessageId, address: EntityAddress) -> StoredMessage {
        StoredMessage {
            id,
            address,
            tag: self.tag,
            key: self.key.map(MessageKey::from_stored),
            payload: self.payload,
            headers: self.headers,
            deliver_at: self.deliver_at,
            created_at: self.created_at,
        }
    }
}

/// The owner's answer.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireReply {
    /// A volatile call's encoded reply.
    Volatile(#[serde(with = "bin")] Vec<u8>),
    /// A persisted message's recorded reply.
    Recorded(WireStoredReply),
    /// The call failed on the owner with an error the caller reports as is.
    Failed(RemoteError),
}

/// [`StoredReply`] with its bytes as MessagePack binary.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireStoredReply {
    Ok(#[serde(with = "bin")] Vec<u8>),
    Panicked(String),
    EffectsFailed(String),
    Rejected(String),
}

impl From<StoredReply> for WireStoredReply {
    fn from(reply: StoredReply) -> Self {
        match reply {
            StoredReply::Ok(bytes) => Self::Ok(bytes),
            StoredReply::Panicked(m) => Self::Panicked(m),
            StoredReply::EffectsFailed(m) => Self::EffectsFailed(m),
            StoredReply::Rejected(m) => Self::Rejected(m),
        }
    }
}

impl From<WireStoredReply> for StoredReply {
    fn from(reply: WireStoredReply) -> Self {
        match reply {
            WireStoredReply::Ok(bytes) => Self::Ok(bytes),
            WireStoredReply::Panicked(m) => Self::Panicked(m),
            WireStoredReply::EffectsFailed(m) => Self::EffectsFailed(m),
            WireStoredReply::Rejected(m) => Self::Rejected(m),
        }
    }
}

/// A failure on the owner that is the caller's answer (not a reason to
/// retry elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RemoteError {
    UnknownEntityType(String),
    MailboxFull {
        entity_type: String,
        entity_id: String,
        capacity: usize,
    },
    HandlerPanicked(String),
    /// The request or reply did not encode or decode; the message says which.
    Codec(String),
    Storage(String),
    Timeout,
}

impl RemoteError {
    /// The owner's view of a failed call, for the wire.
    pub(crate) fn from_cluster(error: ClusterError) -> Self {
        match error {
            ClusterError::UnknownEntityType(t) => Self::UnknownEntityType(t),
            ClusterError::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            } => Self::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            },
            ClusterError::HandlerPanicked(m) => Self::HandlerPanicked(m),
            ClusterError::Encode(e) => Self::Codec(e.to_string()),
            ClusterError::Decode(e) => Self::Codec(e.to_string()),
            ClusterError::Timeout(_) => Self::Timeout,
            other => Self::Storage(other.to_string()),
        }
    }

    /// The caller's error for this failure.
    pub(crate) fn into_cluster(self, timeout: std::time::Duration) -> ClusterError {
        match self {
            Self::UnknownEntityType(t) => ClusterError::UnknownEntityType(t),
            Self::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            } => ClusterError::MailboxFull {
                entity_type,
                entity_id,
                capacity,
            },
            Self::HandlerPanicked(m) => ClusterError::HandlerPanicked(m),
            Self::Codec(m) => ClusterError::Rejected(format!("on the owner: {m}")),
            Self::Storage(m) => ClusterError::Storage(crate::error::StorageError::Corrupt(
                format!("on the owner: {m}"),
            )),
            Self::Timeout => ClusterError::Timeout(timeout),
        }
    }
}

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, EncodeError> {
    codec::encode(what, value)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    codec::decode(what, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deliver_request_round_trips() {
        let address = EntityAddress {
            entity_type: "Account".into(),
            entity_id: "acct-42".into(),
            shard: ShardId::default_group(271),
        };
        let stored = StoredMessage {
            id: MessageId(7),
            address: address.clone(),
            tag: "deposit".to_owned(),
            key: Some(MessageKey::new("Account", "acct-42", "deposit", "k1")),
            payload: vec![0x80, 0xff, 1, 2],
            headers: Headers::from([("traceparent".to_owned(), "00-ab".to_owned())]),
            deliver_at: None,
            created_at: 1_700_000_000_000,
        };
        let request = WireRequest::Deliver {
            target: WireAddress::new(&address),
            id: stored.id,
            message: Some(WireMessage::new(&stored)),
        };
        let bytes = encode("request", &request).unwrap();
        let WireRequest::Deliver {
            target,
            id,
            message: Some(message),
        } = decode::<WireRequest>("request", &bytes).unwrap()
        else {
            panic!("not a deliver request");
        };
        assert_eq!(message.into_stored(id, target.address()), stored);
    }

    #[test]
    fn a_volatile_request_carries_headers_and_accepts_none() {
        let address = EntityAddress {
            entity_type: "Account".into(),
            entity_id: "acct-42".into(),
            shard: ShardId::default_group(271),
        };
        let headers = Headers::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]);
        let request = WireRequest::Volatile {
            target: WireAddress::new(&address),
            payload: vec![1, 2],
            headers: headers.clone(),
        };
        let bytes = encode("request", &request).unwrap();
        let WireRequest::Volatile { headers: got, .. } =
            decode::<WireRequest>("request", &bytes).unwrap()
        else {
            panic!("not a volatile request");
        };
        assert_eq!(got, headers);

        // A sender from before headers existed: the same request without them.
        #[derive(Serialize)]
        enum OldRequest {
            Volatile {
                target: WireAddress,
                #[serde(with = "bin")]
                payload: Vec<u8>,
            },
        }
        let old = OldRequest::Volatile {
            target: WireAddress::new(&address),
            payload: vec![1, 2],
        };
        let bytes = encode("request", &old).unwrap();
        let WireRequest::Volatile {
            target,
            payload,
            headers,
        } = decode::<WireRequest>("request", &bytes).unwrap()
        else {
            panic!("not a volatile request");
        };
        assert_eq!(target.address(), address);
        assert_eq!(payload, vec![1, 2]);
        assert!(headers.is_empty());
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\xc1",
            b"\x92\x01",
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
        ] {
            assert!(decode::<WireRequest>("request", bytes).is_err());
        }
    }

    #[test]
    fn remote_errors_map_to_the_callers_typed_errors() {
        let e = RemoteError::from_cluster(ClusterError::UnknownEntityType("Nope".into()));
        assert!(matches!(
            e.into_cluster(std::time::Duration::from_secs(1)),
            ClusterError::UnknownEntityType(t) if t == "Nope"
        ));
    }
}
