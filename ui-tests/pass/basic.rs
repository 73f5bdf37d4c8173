//! The model from the design: a persisted, deduplicated rpc returning a
//! `Result`, volatile ones, a method that is not an rpc. Run against an
//! in-memory cluster.
#![deny(warnings)]

use flotilla::prelude::*;

#[derive(Default, Serialize, Deserialize)]
pub struct Account {
    balance: i64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum AccountError {
    Insufficient { balance: i64 },
}

#[entity]
impl Account {
    #[rpc(persisted, primary_key = transfer_id)]
    async fn deposit(&mut self, transfer_id: u64, amount: i64) -> Result<i64, AccountError> {
        let _ = transfer_id;
        if self.balance + amount < 0 {
            return Err(AccountError::Insufficient { balance: self.balance });
        }
        self.balance += amount;
        Ok(self.balance)
    }

    #[rpc]
    async fn withdraw(&mut self, amount: i64) -> Result<i64, AccountError> {
        if self.balance < amount {
            return Err(AccountError::Insufficient { balance: self.balance });
        }
        self.balance -= amount;
        Ok(self.balance)
    }

    #[rpc]
    async fn balance(&self) -> i64 {
        self.doubled() / 2
    }

    fn doubled(&self) -> i64 {
        self.balance * 2
    }
}

#[tokio::main]
async fn main() {
    use flotilla::{Entity, RequestInfo};

    let deposit = AccountRequest::Deposit { transfer_id: 7, amount: 1 };
    assert_eq!(
        Account::describe(&deposit),
        RequestInfo { tag: "deposit", persisted: true, primary_key: Some("7".to_owned()) }
    );
    let balance = AccountRequest::Balance {};
    assert_eq!(
        Account::describe(&balance),
        RequestInfo { tag: "balance", persisted: false, primary_key: None }
    );
    assert_eq!(Account::reply_tag(&AccountReply::Balance(0)), "balance");
    assert_eq!(Account::NAME, "Account");
    assert!(!Account::options().persisted_state);

    // Persisted calls go through storage and the runtime's codec, which the
    // runtime's own tests cover; here the volatile path runs end to end.
    let cluster = Cluster::builder()
        .memory()
        .register::<Account>()
        .start()
        .await
        .unwrap();
    let account: AccountClient = cluster.client::<Account>("acct-1");
    assert_eq!(account.entity_id(), "acct-1");
    match account.withdraw(500).await {
        Err(ClusterError::Handler(AccountError::Insufficient { balance })) => assert_eq!(balance, 0),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    let balance: Result<i64, ClusterError> = account.balance().await;
    assert_eq!(balance.unwrap(), 0);
    // Client calls are `Send` futures: they can run on spawned tasks.
    let spawned = tokio::spawn({
        let account = account.clone();
        async move { account.balance().await }
    });
    assert_eq!(spawned.await.unwrap().unwrap(), 0);
    cluster.shutdown().await;
}
