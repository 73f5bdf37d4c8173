use flotilla::prelude::*;

#[derive(Default)]
pub struct Session;

#[entity]
impl Session {
    #[rpc]
    async fn with_timeout(&self, seconds: u64) -> u64 {
        seconds
    }
}

fn main() {}
