//! An rpc without `->` replies `()`; the client returns `Result<(), ClusterError>`.
#![deny(warnings)]

use flotilla::prelude::*;

#[derive(Default)]
pub struct Switch {
    on: bool,
}

#[entity]
impl Switch {
    #[rpc]
    async fn toggle(&mut self) {
        self.on = !self.on;
    }

    #[rpc]
    async fn set(&mut self, on: bool) -> () {
        self.on = on;
    }

    #[rpc]
    async fn is_on(&self) -> bool {
        self.on
    }
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::builder()
        .memory()
        .register::<Switch>()
        .start()
        .await
        .unwrap();
    let switch = cluster.client::<Switch>("s-1");
    let toggled: Result<(), ClusterError> = switch.toggle().await;
    toggled.unwrap();
    assert!(switch.is_on().await.unwrap());
    switch.set(false).await.unwrap();
    assert!(!switch.is_on().await.unwrap());
    cluster.shutdown().await;
}
