use flotilla::prelude::*;

#[derive(Default)]
pub struct Account;

#[entity]
impl Account {
    #[rpc(primary_key = transfer_id)]
    async fn deposit(&mut self, transfer_id: u64, amount: i64) -> i64 {
        let _ = transfer_id;
        amount
    }
}

fn main() {}
