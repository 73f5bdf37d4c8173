use flotilla::rpc;

#[derive(Default)]
pub struct Account {
    balance: i64,
}

// `#[entity]` is missing on this block.
impl Account {
    #[rpc]
    async fn balance(&self) -> i64 {
        self.balance
    }
}

fn main() {}
