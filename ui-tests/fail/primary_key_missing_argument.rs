use flotilla::prelude::*;

#[derive(Default)]
pub struct Account;

#[entity]
impl Account {
    #[rpc(persisted, primary_key = transfer)]
    async fn deposit(&mut self, transfer_id: u64, amount: i64) -> i64 {
        let _ = transfer_id;
        amount
    }

    #[rpc(persisted, primary_key = id)]
    async fn close(&mut self) {}
}

fn main() {}
