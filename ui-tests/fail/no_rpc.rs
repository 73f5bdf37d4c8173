use flotilla::prelude::*;

#[derive(Default)]
pub struct Account {
    balance: i64,
}

#[entity]
impl Account {
    async fn balance(&self) -> i64 {
        self.balance
    }
}

fn main() {}
