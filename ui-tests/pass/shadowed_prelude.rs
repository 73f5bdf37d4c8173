//! The expansion names everything by absolute path: a crate's own `Result`
//! alias, `Option` or `Default` in scope does not change its meaning. Also:
//! `Self` in a signature, raw identifiers, a `#[cfg]`'d rpc, and an rpc
//! named like a method of the `Entity` trait.
#![deny(warnings)]
#![allow(dead_code)]

use flotilla::prelude::*;

type Result<T> = std::result::Result<T, String>;
struct Option;
struct Box;
trait Default {}

#[derive(Clone, ::core::default::Default, Serialize, Deserialize)]
pub struct Node {
    children: Vec<u8>,
}

#[entity]
impl Node {
    #[rpc]
    async fn snapshot(&self) -> Self {
        self.clone()
    }

    #[rpc]
    async fn r#type(&self, r#in: u8) -> Result<u8> {
        Ok(r#in)
    }

    #[rpc]
    async fn handle(&mut self, child: u8) -> Vec<Self> {
        self.children.push(child);
        vec![self.clone()]
    }

    #[cfg(any())]
    #[rpc]
    async fn compiled_out(&self, x: NotAType) {}
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::builder()
        .memory()
        .register::<Node>()
        .start()
        .await
        .unwrap();
    let node = cluster.client::<Node>("n-1");
    assert_eq!(node.handle(7).await.unwrap().len(), 1);
    assert_eq!(node.snapshot().await.unwrap().children, [7]);
    // `Result<u8>` has one type argument: it is a plain value, not a handler error.
    let typed: std::result::Result<Result<u8>, ClusterError> = node.r#type(3).await;
    assert_eq!(typed.unwrap(), Ok(3));
    cluster.shutdown().await;
}
