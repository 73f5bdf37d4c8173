use flotilla::prelude::*;

#[derive(Default)]
pub struct Mailer;

pub struct Handle;

#[derive(Debug)]
pub struct SendError;

#[entity]
impl Mailer {
    #[rpc]
    async fn open(&self) -> Handle {
        Handle
    }

    #[rpc]
    async fn send(&self) -> Result<u32, SendError> {
        Err(SendError)
    }
}

fn main() {}
