use flotilla::prelude::*;

#[derive(Default)]
pub struct Counter;

#[entity(mailbox = 16, mailbox = 32)]
impl Counter {
    #[rpc(persisted, persisted)]
    async fn get(&self) -> u64 {
        0
    }

    #[rpc]
    #[rpc(persisted)]
    async fn reset(&self) {}
}

fn main() {}
