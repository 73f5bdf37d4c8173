//! Quickstart: one process on the embedded SQLite default.
//!
//! Defines a bank-account entity, makes volatile and persisted calls, shows a
//! duplicate being deduplicated, and prints what happened. Run it twice: the
//! balance carries over, because the account's state is persisted.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use flotilla::prelude::*;

// ANCHOR: entity
/// A bank account. Its state is saved with every persisted reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Account {
    balance: i64,
    deposits: u32,
}

/// What can go wrong with an account, as the caller sees it.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum AccountError {
    /// Not enough money for a withdrawal.
    #[error("insufficient funds: balance {balance}, asked for {wanted}")]
    Insufficient {
        /// The balance at the time.
        balance: i64,
        /// The amount asked for.
        wanted: i64,
    },
}

#[entity(state = persisted, max_idle = "5m")]
impl Account {
    /// Adds money. Persisted (stored before it runs, survives a crash) and
    /// deduplicated by `transfer_id`: a retry with the same id runs nothing
    /// and gets the first reply.
    #[rpc(persisted, primary_key = transfer_id)]
    async fn deposit(&mut self, transfer_id: u64, amount: i64) -> Result<i64, AccountError> {
        tracing::debug!(transfer_id, amount, "deposit");
        self.balance += amount;
        self.deposits += 1;
        Ok(self.balance)
    }

    /// Takes money out, if there is enough.
    #[rpc(persisted, primary_key = transfer_id)]
    async fn withdraw(&mut self, transfer_id: u64, amount: i64) -> Result<i64, AccountError> {
        tracing::debug!(transfer_id, amount, "withdraw");
        if amount > self.balance {
            return Err(AccountError::Insufficient {
                balance: self.balance,
                wanted: amount,
            });
        }
        self.balance -= amount;
        Ok(self.balance)
    }

    /// Reads the balance. Volatile: no storage, at most once.
    #[rpc]
    async fn balance(&self, ctx: &EntityContext) -> (i64, u32, String) {
        (self.balance, self.deposits, ctx.shard_id().to_string())
    }
}
// ANCHOR_END: entity

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ANCHOR: start
    // The defaults: SQLite file `flotilla.db` in the working directory, 300 shards.
    let cluster = Cluster::builder().register::<Account>().start().await?;
    let account = cluster.client::<Account>("acct-42");
    // ANCHOR_END: start

    let (before, deposits, shard) = account.balance().await?;
    println!(
        "acct-42 lives on shard {shard}; it starts this run with balance {before} after {deposits} deposits in earlier runs."
    );

    // A run-unique transfer id, so each run deposits once more.
    let transfer = cluster.snowflake().raw();
    let after = account.deposit(transfer, 100).await?;
    println!("deposit #{transfer} of 100 ran: the balance is now {after}.");

    // ANCHOR: dedup
    let again = account.deposit(transfer, 100).await?;
    println!("the same deposit sent again was deduplicated: no second run, same reply ({again}).");
    // ANCHOR_END: dedup
    assert_eq!(after, again);

    // ANCHOR: errors
    match account.withdraw(cluster.snowflake().raw(), 1_000_000).await {
        Err(ClusterError::Handler(AccountError::Insufficient { balance, wanted })) => {
            println!(
                "withdrawing {wanted} failed with the handler's own typed error: only {balance} available."
            )
        }
        other => println!("unexpected: {other:?}"),
    }
    // ANCHOR_END: errors

    let (now, deposits, _) = account.balance().await?;
    println!("a volatile read says the balance is {now} after {deposits} deposits in all.");
    assert_eq!(now, before + 100);

    cluster.shutdown().await;
    println!("shut down cleanly; run me again and the balance carries over.");
    Ok(())
}
