//! Identity of shards, runners and entities, and the fixed hash that maps an
//! entity id to its shard.

pub mod assignment;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The default shard group.
pub const DEFAULT_GROUP: &str = "default";

/// One shard: a group name and an index within the group.
///
/// `Display` and `FromStr` round-trip as `group:index`:
///
/// ```
/// use flotilla::ShardId;
/// let shard: ShardId = "default:17".parse().unwrap();
/// assert_eq!(shard.index(), 17);
/// assert_eq!(shard.to_string(), "default:17");
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId {
    group: Arc<str>,
    index: u32,
}

impl ShardId {
    /// A shard of `group`.
    pub fn new(group: impl Into<Arc<str>>, index: u32) -> Self {
        Self {
            group: group.into(),
            index,
        }
    }

    /// A shard of the default group.
    pub fn default_group(index: u32) -> Self {
        Self::new(DEFAULT_GROUP, index)
    }

    /// The shard group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The index within the group, `0..shards`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The shard that `entity_id` belongs to when the group has `shards` shards.
    ///
    /// The mapping is persisted (messages are stored with their shard), so it
    /// may never change: it is FNV-1a (64-bit) over the id's UTF-8 bytes,
    /// modulo `shards`. A golden test pins it.
    pub fn for_entity(group: impl Into<Arc<str>>, entity_id: &str, shards: u32) -> Self {
        Self::new(group, shard_index(entity_id, shards))
    }
}

/// FNV-1a, 64-bit, over `entity_id`, modulo `shards` (at least 1).
pub fn shard_index(entity_id: &str, shards: u32) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in entity_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    (hash % u64::from(shards.max(1))) as u32
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.group, self.index)
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardId({self})")
    }
}

/// `ShardId::from_str` failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid shard id {0:?}: expected `group:index`, e.g. `default:17`")]
pub struct ParseShardIdError(String);

impl FromStr for ShardId {
    type Err = ParseShardIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (group, index) = s
            .rsplit_once(':')
            .ok_or_else(|| ParseShardIdError(s.to_owned()))?;
        if group.is_empty() {
            return Err(ParseShardIdError(s.to_owned()));
        }
        let index = index
            .parse::<u32>()
            .map_err(|_| ParseShardIdError(s.to_owned()))?;
        Ok(Self::new(group, index))
    }
}

/// The identity of one runner process.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunnerId(Arc<str>);

impl RunnerId {
    /// A runner id from its name (for a cluster runner, its address).
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunnerId({})", self.0)
    }
}

/// Where an entity lives: its type, its id and its shard.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EntityAddress {
    /// The entity type's wire name (`#[entity(name = ..)]`, default the type name).
    pub entity_type: Arc<str>,
    /// The entity id.
    pub entity_id: Arc<str>,
    /// The shard the id hashes to.
    pub shard: ShardId,
}

impl fmt::Display for EntityAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.entity_type, self.entity_id, self.shard)
    }
}

impl fmt::Debug for EntityAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntityAddress({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shard hash is persisted with every message; these values may never change.
    #[test]
    fn shard_hash_is_pinned() {
        // Computed independently, with a reference FNV-1a outside Rust.
        let golden = [
            ("", 300, 137),
            ("acct-42", 300, 271),
            ("user/1", 300, 222),
            ("ö", 300, 164),
            ("acct-42", 1, 0),
        ];
        for (id, shards, expected) in golden {
            assert_eq!(shard_index(id, shards), expected, "shard of {id:?}");
        }
    }

    #[test]
    fn shard_id_round_trips_through_text() {
        for s in ["default:0", "default:299", "billing:7", "a:b:3"] {
            let id: ShardId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
        for bad in ["", "default", ":1", "default:-1", "default:x"] {
            assert!(bad.parse::<ShardId>().is_err(), "{bad:?} should not parse");
        }
    }
}
