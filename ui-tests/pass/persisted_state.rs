//! `state = persisted`: the entity's state is encoded after each persisted
//! reply and decoded on activation.
#![deny(warnings)]

use flotilla::Entity;
use flotilla::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Ledger {
    entries: Vec<(u64, i64)>,
}

#[entity(state = persisted)]
impl Ledger {
    #[rpc(persisted, primary_key = entry_id)]
    async fn record(&mut self, entry_id: u64, amount: i64) -> usize {
        self.entries.push((entry_id, amount));
        self.entries.len()
    }

    #[rpc(persisted)]
    async fn clear(&mut self) {
        self.entries.clear();
    }

    #[rpc]
    async fn total(&self) -> i64 {
        self.entries.iter().map(|(_, amount)| amount).sum()
    }
}

#[tokio::main]
async fn main() {
    assert!(Ledger::options().persisted_state);
    // With `state = persisted` the entity encodes and decodes its state (the
    // round trip itself is the runtime codec's to test).
    let ledger = Ledger { entries: vec![(1, 5)] };
    let bytes = ledger.encode_state().expect("state = persisted").unwrap();
    assert!(!bytes.is_empty());
    assert!(Ledger::decode_state(&bytes).is_some());

    let record = LedgerRequest::Record { entry_id: 9, amount: 1 };
    let info = Ledger::describe(&record);
    assert!(info.persisted);
    assert_eq!(info.primary_key.as_deref(), Some("9"));
    let clear = Ledger::describe(&LedgerRequest::Clear {});
    assert!(clear.persisted && clear.primary_key.is_none());

    let cluster = Cluster::builder()
        .memory()
        .register::<Ledger>()
        .start()
        .await
        .unwrap();
    let client = cluster.client::<Ledger>("l-1");
    assert_eq!(client.total().await.unwrap(), 0);
    cluster.shutdown().await;
}
