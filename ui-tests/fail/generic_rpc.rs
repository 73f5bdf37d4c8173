use flotilla::prelude::*;

#[derive(Default)]
pub struct Store;

#[entity]
impl Store {
    #[rpc]
    async fn put<T: Serialize>(&self, _value: T) {}

    #[rpc]
    async fn chunk<const N: usize>(&self) -> usize {
        N
    }

    #[rpc]
    async fn name<'a>(&'a self) -> String {
        String::new()
    }

    #[rpc]
    async fn bounded(&self) -> u8
    where
        u8: Copy,
    {
        0
    }
}

fn main() {}
