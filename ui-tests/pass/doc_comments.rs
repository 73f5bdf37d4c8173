//! Every generated public item is documented, and the rpc's own `///` docs
//! are copied onto the client method: this crate denies missing docs.
#![deny(warnings, missing_docs, missing_debug_implementations)]

use flotilla::prelude::*;

/// A counter.
#[derive(Debug, Default)]
pub struct Counter {
    n: u64,
}

#[entity(name = "docs.Counter")]
impl Counter {
    /// Adds `by` and returns the new total.
    ///
    /// Saturates at `u64::MAX`.
    #[rpc]
    pub async fn add(&mut self, by: u64) -> u64 {
        self.n = self.n.saturating_add(by);
        self.n
    }

    /// The current total.
    #[rpc]
    pub async fn get(&self) -> u64 {
        self.n
    }
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::builder()
        .memory()
        .register::<Counter>()
        .start()
        .await
        .unwrap();
    let counter = cluster.client::<Counter>("c-1");
    assert_eq!(counter.add(u64::MAX).await.unwrap(), u64::MAX);
    assert_eq!(counter.add(1).await.unwrap(), u64::MAX);
    assert_eq!(counter.get().await.unwrap(), u64::MAX);
    assert_eq!(<Counter as flotilla::Entity>::NAME, "docs.Counter");
    cluster.shutdown().await;
}
