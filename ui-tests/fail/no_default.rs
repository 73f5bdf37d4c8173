use flotilla::prelude::*;

pub struct Account {
    balance: i64,
}

#[entity]
impl Account {
    #[rpc]
    async fn balance(&self) -> i64 {
        self.balance
    }
}

fn main() {}
