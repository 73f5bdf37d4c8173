use flotilla::prelude::*;

#[derive(Default)]
pub struct Account;

#[derive(Serialize, Deserialize)]
pub struct TransferId([u8; 16]);

#[entity]
impl Account {
    #[rpc(persisted, primary_key = transfer_id)]
    async fn deposit(&mut self, transfer_id: TransferId, amount: i64) -> i64 {
        let _ = transfer_id;
        amount
    }
}

fn main() {}
