use flotilla::prelude::*;

#[entity]
#[derive(Default)]
pub struct Account {
    balance: i64,
}

fn main() {
    let _ = Account::default().balance;
}
