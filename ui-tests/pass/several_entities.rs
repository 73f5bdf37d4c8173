//! Several entities in one module: their generated items do not collide,
//! and rpcs of different entities may share names.
#![deny(warnings)]

use flotilla::prelude::*;

#[derive(Default)]
pub struct Inventory {
    stock: u32,
}

#[derive(Default)]
pub struct Shop {
    sold: u32,
}

#[derive(Default)]
pub struct Audit;

#[derive(Debug, Serialize, Deserialize)]
pub struct OutOfStock;

#[entity]
impl Inventory {
    #[rpc]
    async fn restock(&mut self, count: u32) -> u32 {
        self.stock += count;
        self.stock
    }

    #[rpc]
    async fn take(&mut self) -> Result<u32, OutOfStock> {
        self.stock = self.stock.checked_sub(1).ok_or(OutOfStock)?;
        Ok(self.stock)
    }
}

#[entity]
impl Shop {
    #[rpc]
    async fn take(&mut self) -> u32 {
        self.sold += 1;
        self.sold
    }
}

#[entity(name = "audit")]
impl Audit {
    #[rpc]
    async fn ping(&self) {}
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::builder()
        .memory()
        .register::<Inventory>()
        .register::<Shop>()
        .register::<Audit>()
        .start()
        .await
        .unwrap();
    let inventory = cluster.client::<Inventory>("i-1");
    let shop = cluster.client::<Shop>("s-1");
    assert_eq!(inventory.restock(1).await.unwrap(), 1);
    assert_eq!(inventory.take().await.unwrap(), 0);
    match inventory.take().await {
        Err(ClusterError::Handler(OutOfStock)) => {}
        other => panic!("expected OutOfStock, got {other:?}"),
    }
    assert_eq!(shop.take().await.unwrap(), 1);
    cluster.client::<Audit>("a").ping().await.unwrap();
    cluster.shutdown().await;
}
