use flotilla::prelude::*;

#[derive(Default)]
pub struct Account {
    balance: i64,
}

#[entity(state = persisted)]
impl Account {
    #[rpc]
    async fn balance(&self) -> i64 {
        self.balance
    }
}

fn main() {}
