//! # Flotilla
//!
//! Cluster-native Rust services from plain Rust annotated with attribute
//! macros. Put `#[entity]` on an `impl` block and get a sharded, addressable
//! entity (a virtual actor) with a typed client, volatile or persisted
//! messages, dedup keys and exhaustive dispatch. One process on an embedded
//! SQLite file is the default.
//!
//! ```no_run
//! use flotilla::prelude::*;
//!
//! #[derive(Default, Serialize, Deserialize)]
//! pub struct Account {
//!     balance: i64,
//! }
//!
//! #[derive(Debug, Serialize, Deserialize, thiserror::Error)]
//! #[error("insufficient funds")]
//! pub struct Insufficient;
//!
//! #[entity(state = persisted)]
//! impl Account {
//!     /// Persisted and deduplicated by `transfer_id`.
//!     #[rpc(persisted, primary_key = transfer_id)]
//!     async fn deposit(&mut self, transfer_id: u64, amount: i64) -> Result<i64, Insufficient> {
//!         if self.balance + amount < 0 {
//!             return Err(Insufficient);
//!         }
//!         self.balance += amount;
//!         Ok(self.balance)
//!     }
//!
//!     /// Volatile: at most once, no storage.
//!     #[rpc]
//!     async fn balance(&self) -> i64 {
//!         self.balance
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = Cluster::builder().register::<Account>().start().await?;
//! let account = cluster.client::<Account>("acct-42");
//! account.deposit(1, 100).await?;
//! assert_eq!(account.balance().await?, 100);
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! The book (`book/`) explains the model; the examples (`examples/`) are real programs.

mod client;
mod cluster;
pub mod codec;
mod config;
pub mod context;
pub mod entity;
mod error;
#[cfg(feature = "http")]
pub mod http;
pub mod sharding;
pub mod singleton;
pub mod snowflake;
pub mod storage;
pub mod time;
pub mod transport;

pub use client::EntityRef;
pub use cluster::{Cluster, ClusterBuilder, shutdown_signal};
pub use config::{ClusterConfig, DEFAULT_TABLE_PREFIX, StorageConfig};
pub use entity::{Entity, EntityContext, EntityOptions, RequestInfo, StageError};
pub use error::{
    ClusterError, ConfigError, DecodeError, EncodeError, SetupError, StartError, StorageError,
};
pub use flotilla_macros::{entity, rpc, singleton};
pub use sharding::{EntityAddress, RunnerId, ShardId};
pub use singleton::{Singleton, SingletonContext, SingletonHealth, SingletonOptions};
pub use snowflake::{Snowflake, SnowflakeGenerator};

/// What most programs need: `use flotilla::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Cluster, ClusterConfig, ClusterError, EntityContext, EntityRef, ShardId, SingletonContext,
        Snowflake, entity, rpc, singleton,
    };
    pub use serde::{Deserialize, Serialize};
}

/// The one path generated code uses. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use ::rmp_serde;
    pub use ::serde;
    pub use ::std::boxed::Box;
    pub use ::std::convert::{From, Infallible};
    pub use ::std::default::Default;
    pub use ::std::option::Option;
    pub use ::std::result::Result;
    pub use ::std::string::String;
    pub use ::std::time::{Duration, SystemTime};
    pub use ::std::vec::Vec;
    pub use ::tracing;

    pub use crate::client::EntityRef;
    pub use crate::entity::{Entity, EntityContext, EntityOptions, HandlerFuture, RequestInfo};
    pub use crate::error::{ClusterError, DecodeError, EncodeError};
    pub use crate::singleton::{Singleton, SingletonContext, SingletonFuture, SingletonOptions};

    /// Renders a singleton's error for the log and the tick's record.
    pub fn singleton_error<E: ::std::fmt::Display + ?Sized>(error: &E) -> String {
        error.to_string()
    }

    /// Renders a `primary_key` argument as the dedup key.
    pub fn primary_key<T: ::std::fmt::Display + ?Sized>(value: &T) -> String {
        value.to_string()
    }

    /// Encodes `state = persisted` state.
    pub fn encode_state<T: serde::Serialize>(state: &T) -> Result<Vec<u8>, EncodeError> {
        crate::codec::encode("entity state", state)
    }

    /// Decodes `state = persisted` state.
    pub fn decode_state<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
        crate::codec::decode("entity state", bytes)
    }

    /// Generated code calls this with a type's span so that a missing serde
    /// impl is reported on the user's type.
    pub const fn assert_wire_type<T: serde::Serialize + serde::de::DeserializeOwned>() {}

    /// Reported on the entity type when it has no `Default` impl.
    pub const fn assert_default<T: Default>() {}

    /// Reported on a `primary_key` argument whose type is not `Display`.
    pub const fn assert_primary_key<T: ::std::fmt::Display>() {}

    /// The error a generated client returns when a reply belongs to another rpc.
    pub fn reply_mismatch<E>(expected: &'static str, got: &'static str) -> ClusterError<E> {
        ClusterError::Decode(DecodeError::ReplyMismatch { expected, got })
    }
}
