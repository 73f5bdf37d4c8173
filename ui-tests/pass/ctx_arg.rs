//! `&EntityContext` is passed by the runtime in the position the user
//! declared it; it is not part of the request or of the client's signature.
#![deny(warnings)]

use flotilla::prelude::*;

#[derive(Default)]
pub struct Greeter;

#[entity]
impl Greeter {
    #[rpc]
    async fn greet(&self, greeting: String, ctx: &EntityContext, times: usize) -> String {
        format!("{greeting} from {}", ctx.entity_id()).repeat(times)
    }

    #[rpc]
    async fn whoami(&self, ctx: &flotilla::EntityContext) -> String {
        ctx.entity_id().to_owned()
    }
}

#[tokio::main]
async fn main() {
    let request = GreeterRequest::Greet { greeting: "hi".to_owned(), times: 2 };
    assert_eq!(format!("{request:?}"), "GreeterRequest::Greet { .. }");

    let cluster = Cluster::builder()
        .memory()
        .register::<Greeter>()
        .start()
        .await
        .unwrap();
    let greeter = cluster.client::<Greeter>("g-7");
    assert_eq!(greeter.greet("hi".to_owned(), 2).await.unwrap(), "hi from g-7hi from g-7");
    assert_eq!(greeter.whoami().await.unwrap(), "g-7");
    cluster.shutdown().await;
}
