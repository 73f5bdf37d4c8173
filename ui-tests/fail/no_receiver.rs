use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter {
    n: u64,
}

#[entity]
impl Counter {
    #[rpc]
    async fn get(&self) -> u64 {
        self.n
    }

    #[rpc]
    async fn zero() -> u64 {
        0
    }
}

fn main() {}
