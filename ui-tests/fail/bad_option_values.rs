use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter;

#[entity(max_idle = "ninety seconds", mailbox = 0, state = durable, name = Counter)]
impl Counter {
    #[rpc]
    async fn get(&self) -> u64 {
        0
    }
}

#[derive(Default)]
pub struct Other;

#[entity(max_idle = "0s")]
impl Other {
    #[rpc]
    async fn get(&self) -> u64 {
        0
    }
}

fn main() {}
