use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter;

#[entity(shards = 3)]
impl Counter {
    #[rpc]
    async fn get(&self) -> u64 {
        0
    }
}

#[derive(Default)]
pub struct Other;

// `persisted` alone is a common slip for `state = persisted`.
#[entity(persisted)]
impl Other {
    #[rpc]
    async fn get(&self) -> u64 {
        0
    }
}

fn main() {}
