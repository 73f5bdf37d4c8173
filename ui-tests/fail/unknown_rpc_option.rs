use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter;

#[entity]
impl Counter {
    #[rpc(durable, retries = 3)]
    async fn get(&self) -> u64 {
        0
    }
}

fn main() {}
