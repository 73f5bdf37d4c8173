use flotilla::prelude::*;

#[derive(Default)]
pub struct Cache<T> {
    value: Option<T>,
}

#[entity]
impl<T: Clone + Send + 'static> Cache<T> {
    #[rpc]
    async fn get(&self) -> bool {
        self.value.is_some()
    }
}

fn main() {}
