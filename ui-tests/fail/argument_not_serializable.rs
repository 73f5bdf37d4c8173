use flotilla::prelude::*;

#[derive(Default)]
pub struct Mailer;

pub struct Connection;

#[entity]
impl Mailer {
    #[rpc]
    async fn send(&self, to: String, via: Connection) {
        let _ = (to, via);
    }
}

fn main() {}
