//! The generated items are `pub`, but the entity type may be private: in a
//! module, or inside a function. No warning either way, even with
//! `unreachable_pub` on.
#![deny(warnings, unreachable_pub)]

mod bank {
    use flotilla::prelude::*;

    #[derive(Default, Serialize, Deserialize)]
    struct Vault {
        gold: u32,
    }

    #[derive(Serialize, Deserialize)]
    struct Receipt {
        gold: u32,
    }

    #[entity(state = persisted)]
    impl Vault {
        #[rpc]
        async fn store(&mut self, gold: u32) -> Receipt {
            self.gold += gold;
            Receipt { gold: self.gold }
        }
    }

    pub(crate) async fn run(cluster: &Cluster) -> u32 {
        let vault: VaultClient = cluster.client::<Vault>("v-1");
        vault.store(3).await.unwrap().gold
    }

    pub(crate) fn builder() -> flotilla::ClusterBuilder {
        Cluster::builder().memory().register::<Vault>()
    }
}

fn local_entity() -> &'static str {
    use flotilla::prelude::*;

    #[derive(Default)]
    struct Local;

    #[entity]
    impl Local {
        #[rpc]
        async fn ping(&self) -> u8 {
            1
        }
    }

    <Local as flotilla::Entity>::NAME
}

#[tokio::main]
async fn main() {
    let cluster = bank::builder().start().await.unwrap();
    assert_eq!(bank::run(&cluster).await, 3);
    assert_eq!(local_entity(), "Local");
    cluster.shutdown().await;
}
